"""Attacks on the recipe sandbox (issue 11), each tried by a NON-superuser: the pipeline role
(pggeolearn_maintainer) writing hostile recipe SQL, or a colleague who may only log in and
CREATE in schema public. After every attack: canary table, large objects, roles and the
superuser bit unchanged.

Never pass NaN to ST_Buffer in a test: PostGIS 3.3 segfaults and the whole server restarts.
"""

from __future__ import annotations

import psycopg
import pytest
from conftest import ATTACKER, USER, as_role

from pggeolearn import chips, datasets, errors
from pggeolearn.db import security, usersql

UL = (9519900.0, 3202900.0)
PX = 32
EXTENT = (UL[0], UL[1] - 2 * PX, UL[0] + 2 * PX, UL[1])
IMAGE_SQL = "SELECT rast FROM public.img WHERE ST_Intersects(rast, tile_geom)"
LABEL_SQL = "SELECT geom, class_id FROM public.shapes WHERE geom && tile_geom"


def make_data(conn: psycopg.Connection) -> None:
    """2 x 2 tiles of 32 px: one 1-band raster, a strip of class 1 across all tiles."""
    conn.execute("CREATE TABLE public.img (rid serial PRIMARY KEY, rast raster)")
    conn.execute("INSERT INTO public.img (rast) SELECT ST_AddBand(ST_MakeEmptyRaster(%s, %s, %s, %s, 1, -1, 0, 0,"
                 " 3857), '8BUI'::text, 7, 0)", [2 * PX, 2 * PX, UL[0], UL[1]])
    conn.execute("CREATE TABLE public.shapes (id serial PRIMARY KEY, class_id int, buf float8,"
                 " geom geometry(Geometry, 3857))")
    conn.execute("INSERT INTO public.shapes (class_id, buf, geom) VALUES (1, 1, ST_MakeEnvelope(%s, %s, %s, %s, 3857))",
                 [EXTENT[0], UL[1] - 40, EXTENT[2], UL[1] - 20])


def recipe(name="sec", **kw) -> datasets.Recipe:
    r = dict(name=name, srid=3857, resolution=1.0, tile_px=PX, extent=EXTENT, image_sql=IMAGE_SQL,
             label_sql=LABEL_SQL, classes={1: "strip"})
    r.update(kw)
    return datasets.Recipe(**r)


def state(admin: psycopg.Connection) -> tuple:
    return (admin.execute("SELECT array_agg(n) FROM public.canary").fetchone()[0],
            admin.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone()[0],
            admin.execute("SELECT array_agg(rolname ORDER BY rolname) FROM pg_roles").fetchone()[0],
            admin.execute("SELECT array_agg(rolname ORDER BY rolname) FROM pg_roles WHERE rolsuper").fetchone()[0])


@pytest.fixture
def data(conn, admin_conn):
    make_data(conn)
    admin_conn.execute("CREATE TABLE public.canary (n int)")  # the DBA's, never granted to recipes
    admin_conn.execute("INSERT INTO public.canary VALUES (42)")
    admin_conn.execute(f"GRANT INSERT ON public.canary TO {USER}")
    before = state(admin_conn)
    yield before
    assert state(admin_conn) == before


ATTACKS = [
    "SELECT lo_from_bytea(424242, 'x'::bytea)",
    "SELECT lo_create(424243)",
    "SELECT lo_import('/etc/passwd')",
    "SELECT lo_export(1, '/tmp/pggeolearn-pwned')",
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT count(*) FROM pg_ls_dir('.')",
    "SELECT (pg_stat_file('postgresql.conf')).size",
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
    "SELECT set_config('role', 'none', true)",
    "SELECT set_config('role', '" + USER + "', true)",
    "SELECT set_config('session_authorization', 'postgres', true)",
    "SELECT query_to_xml('SELECT set_config(''role'', ''none'', true)', true, false, '')",
    "SELECT n FROM public.canary",  # not granted: recipes read only what the DBA grants
    "SELECT count(*) FROM pggeolearn.models",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_recipe_sql_attacks_are_refused(conn, data, attack):
    query = usersql.embed("SELECT 1 AS one FROM ({user}) AS q", user=attack)
    with pytest.raises(psycopg.Error) as info:
        with usersql.sandbox(conn):
            usersql.rows(conn, query, None, [("one", "integer")])
    assert info.value.sqlstate in ("42501", "42883", "55P02", "0A000"), str(info.value)


@pytest.mark.parametrize("attack", [a for a in ATTACKS if "canary" not in a])
def test_attacks_in_label_sql_fail_dataset_create_and_chips_build(conn, data, attack):
    label = f"SELECT geom, class_id FROM public.shapes, ({attack}) AS evil WHERE geom && tile_geom"
    with pytest.raises(errors.PggeolearnError):
        datasets.create(conn, recipe(label_sql=label))
    assert conn.execute("SELECT count(*) FROM pggeolearn.datasets").fetchone()[0] == 0


def test_function_turned_malicious_after_create_runs_as_the_recipe_role(conn, admin_conn, data):
    conn.execute("CREATE FUNCTION public.helper() RETURNS int LANGUAGE plpgsql VOLATILE AS "
                 "$$ BEGIN RETURN 1; END $$")
    datasets.create(conn, recipe(label_sql=LABEL_SQL + " AND public.helper() = 1"))
    for body in ("PERFORM lo_from_bytea(424242, 'x'::bytea)",
                 "COPY (SELECT 1) TO PROGRAM 'id'",
                 "COPY public.canary FROM '/etc/hostname'",
                 "SET ROLE NONE",
                 "EXECUTE 'RESET ROLE'",
                 "PERFORM pg_read_file('/etc/passwd')"):
        conn.execute(f"CREATE OR REPLACE FUNCTION public.helper() RETURNS int LANGUAGE plpgsql VOLATILE AS "
                     f"$$ BEGIN {body}; RETURN 1; END $$")
        with pytest.raises(errors.PggeolearnError):
            chips.build(conn, "sec", progress=False, force=True)


def test_recipe_reads_what_the_dba_grants(conn, admin_conn, data):
    ds = datasets.create(conn, recipe(label_sql=LABEL_SQL + " AND EXISTS (SELECT 1 FROM public.shapes)"))
    assert ds.n_tiles == 4
    admin_conn.execute("REVOKE SELECT ON public.shapes FROM pggeolearn_recipe")
    with pytest.raises(errors.RecipeError, match="permission denied for table shapes.*pggeolearn grant"):
        chips.build(conn, "sec", progress=False)
    print(security.grant(admin_conn, "public.shapes"))
    assert chips.build(conn, "sec", progress=False).built == 4


# -- search_path: a "$user" schema and a public shadow never run -------------------------------

def test_user_schema_and_public_shadow_never_run(conn, admin_db_dsn, data, tmp_path):
    # the attacker gets a schema named like the pipeline's login role ("$user")
    with psycopg.connect(admin_db_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {USER} AUTHORIZATION {ATTACKER}")
    with psycopg.connect(as_role(admin_db_dsn, ATTACKER), autocommit=True) as att:
        att.execute("CREATE TABLE public.hits (fn text)")
        att.execute("GRANT INSERT ON public.hits TO PUBLIC")
        for schema in (USER, "public"):
            for fn, args, ret, val in (("st_numbands", "raster", "integer", "1"),
                                       ("st_rastfromwkb", "bytea", "raster", "NULL"),
                                       ("st_buffer", "geometry, integer", "geometry", "NULL"),
                                       ("st_makeenvelope", "numeric, numeric, numeric, numeric, integer",
                                        "geometry", "NULL"),
                                       ("st_transform", "geometry, bigint", "geometry", "NULL")):
                try:
                    att.execute(f"CREATE FUNCTION {schema}.{fn}({args}) RETURNS {ret} LANGUAGE plpgsql "
                                f"AS $$ BEGIN INSERT INTO public.hits VALUES ('{schema}.{fn}'); "
                                f"RETURN {val}; END $$")
                except psycopg.errors.DuplicateFunction:
                    pass
    ds = datasets.create(conn, recipe(label_sql="SELECT geom, class_id, buf AS buffer_m FROM public.shapes"
                                               " WHERE geom && tile_geom"))
    report = chips.build(conn, ds.name, progress=False, force=True)
    assert report.built == 4
    from pggeolearn.stream import GeoStream

    with GeoStream(conn.info.dsn and as_role(admin_db_dsn, USER), ds.name, split="all",
                   batch_size=2, shuffle=False, normalize=False) as s:
        assert sum(len(b["tile_id"]) for b in s) > 0
    # import and predict (a model that needs no framework) under the same planted functions
    import sys
    from pathlib import Path

    import numpy as np
    import rasterio

    from pggeolearn import predict
    from pggeolearn.importers import import_raster

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
    from test_predict import BrightnessPredictor

    tif = tmp_path / "img.tif"
    with rasterio.open(tif, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8", crs="EPSG:3857",
                       transform=rasterio.transform.from_origin(UL[0], UL[1], 1.0, 1.0)) as dst:
        dst.write(np.full((3, 64, 64), 200, np.uint8))
    import_raster(conn, [tif], "public.img2", progress=False)
    rep = predict.predict(as_role(admin_db_dsn, USER), BrightnessPredictor(resolution=1.0, tile_px=32),
                          out="public.pred", imagery="public.img2", extent=EXTENT, tile_px=32,
                          progress=False)
    assert rep.tiles >= 1
    from pggeolearn.evaluate import evaluate

    split = conn.execute("SELECT split FROM pggeolearn.chips WHERE dataset = %s AND split <> 'excluded'"
                         " ORDER BY tile_id LIMIT 1", [ds.name]).fetchone()[0]
    evaluate(as_role(admin_db_dsn, USER), BrightnessPredictor(resolution=1.0, tile_px=32, bands=1,
                                                              names=("background", "strip")),
             dataset=ds.name, split=split, out_layer="public.ev", progress=False)
    with psycopg.connect(admin_db_dsn, autocommit=True) as admin:
        assert admin.execute("SELECT count(*) FROM public.hits").fetchone()[0] == 0
        assert not admin.execute(f"SELECT rolsuper FROM pg_roles WHERE rolname = '{ATTACKER}'").fetchone()[0]


def test_connections_pin_search_path(db_dsn):
    from pggeolearn.db import connect

    with connect(db_dsn) as c:
        path = c.execute("SHOW search_path").fetchone()[0]
    assert "$user" not in path and path.split(",")[0].strip() == "public"


def test_every_pggeolearn_function_has_a_pinned_search_path(admin_conn):
    rows = admin_conn.execute(
        "SELECT p.oid::regprocedure::text, p.proconfig FROM pg_proc p"
        " WHERE p.pronamespace = 'pggeolearn'::regnamespace").fetchall()
    assert rows
    for fn, config in rows:
        assert config and any(c.startswith("search_path=pg_catalog") for c in config), fn
    holes = security.check(admin_conn)
    # the test setup grants CREATE on public (where PostGIS lives) to two roles: reported
    assert holes and all("may CREATE in schema public" in h for h in holes), holes


# -- numbers and class ids from user SQL ------------------------------------------------------

@pytest.mark.parametrize("value", ["'NaN'::float8", "'Infinity'::float8", "'-Infinity'::float8", "-1",
                                   "1e9"])
def test_bad_buffer_is_refused_before_postgis(conn, data, value):
    label = f"SELECT geom, class_id, {value} AS buffer_m FROM public.shapes WHERE geom && tile_geom"
    with pytest.raises(errors.RecipeError, match=r"buffer_m = .* dataset sec.*tile \d") as info:
        datasets.create(conn, recipe(label_sql=label))
    assert "\n" not in str(info.value)


def test_bad_buffer_in_stored_recipe_is_refused_at_chips_build(conn, admin_conn, data):
    datasets.create(conn, recipe(label_sql="SELECT geom, class_id, buf AS buffer_m FROM public.shapes"
                                           " WHERE geom && tile_geom"))
    admin_conn.execute("UPDATE public.shapes SET buf = 'NaN'")
    with pytest.raises(errors.RecipeError, match=r"buffer_m = NaN on tile \d+ of dataset sec") as info:
        chips.build(conn, "sec", progress=False)
    assert "\n" not in str(info.value)


def test_undeclared_class_ids_are_refused(conn, admin_conn, data):
    admin_conn.execute("INSERT INTO public.shapes (class_id, geom) VALUES (7, ST_MakeEnvelope(%s, %s, %s, %s, 3857))",
                       [EXTENT[2] - 5, EXTENT[1], EXTENT[2], EXTENT[1] + 5])
    with pytest.raises(errors.RecipeError, match="class_id 7, not declared"):
        datasets.create(conn, recipe())  # the sample tile (the centre) has no class 7
    admin_conn.execute("UPDATE public.shapes SET class_id = 1 WHERE class_id = 7")
    datasets.create(conn, recipe())
    admin_conn.execute("UPDATE public.shapes SET class_id = 255 WHERE geom && ST_MakeEnvelope(%s, %s, %s, %s, 3857)"
                       " AND ST_Area(geom) < 100", [EXTENT[2] - 5, EXTENT[1], EXTENT[2], EXTENT[1] + 5])
    with pytest.raises(errors.RecipeError, match="class_id 255 on tile .* not declared"):
        chips.build(conn, "sec", progress=False)


def test_z_and_m_geometries_are_forced_2d(conn, admin_conn, data):
    admin_conn.execute("ALTER TABLE public.shapes ALTER COLUMN geom TYPE geometry(GeometryZM, 3857)"
                       " USING ST_Force4D(geom, 5, 7)")
    datasets.create(conn, recipe())
    assert chips.build(conn, "sec", progress=False).built == 4


def test_recipe_sql_ending_in_a_comment_works(conn, data):
    ds = datasets.create(conn, recipe(image_sql=IMAGE_SQL + "  -- the imagery",
                                      label_sql=LABEL_SQL + " -- roads;"))
    assert chips.build(conn, ds.name, progress=False, where="tile_id < 2 -- first row").built == 2


# -- least privilege: a role without USAGE on schema pggeolearn gets one line ------------------

def test_role_without_privileges_gets_one_line(admin_db_dsn, data, capsys):
    from pggeolearn.cli.main import main

    dsn = as_role(admin_db_dsn, ATTACKER)
    for args in (["chips", "build", "sec"], ["dataset", "show", "sec"], ["train", "sec", "--model", "m"],
                 ["show-batch", "sec"]):
        with pytest.raises(SystemExit) as info:
            main(["--dsn", dsn, *args])
        assert info.value.code not in (0, None)
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert err.count("\n") == 1 and "GRANT pggeolearn_" in err, (args, err)


def test_least_privilege_roles(conn, admin_conn, admin_db_dsn, data, capsys):
    """reader: show and stream, no dataset/chips writes; each refusal names the GRANT."""
    from pggeolearn.cli.main import main
    from pggeolearn.stream import GeoStream

    datasets.create(conn, recipe())
    chips.build(conn, "sec", progress=False)
    security.grant_role(admin_conn, "reader", "pgl_test_reader")
    reader = as_role(admin_db_dsn, "pgl_test_reader")
    with psycopg.connect(reader, autocommit=True) as rconn:
        assert datasets.get(rconn, "sec").n_tiles == 4
    with GeoStream(reader, "sec", split="all", batch_size=4, shuffle=False, normalize=False) as s:
        assert sum(len(b["tile_id"]) for b in s) >= 1
    with GeoStream.live(reader, "sec", batch_size=4, shuffle=False, normalize=False) as s:
        assert sum(len(b["tile_id"]) for b in s) == 4
    for args, grant in ((["chips", "build", "sec", "--force"], "GRANT pggeolearn_maintainer TO"),
                        (["dataset", "drop", "sec", "--yes"], "GRANT pggeolearn_maintainer TO")):
        with pytest.raises(SystemExit):
            main(["--dsn", reader, *args])
        err = capsys.readouterr().err
        assert grant in err and err.count("\n") == 1 and "Traceback" not in err, (args, err)


def test_db_check_reports_each_hole_in_one_line(admin_db_dsn, admin_conn, capsys):
    from pggeolearn.cli.main import main

    admin_conn.execute("GRANT EXECUTE ON FUNCTION lo_from_bytea(oid, bytea) TO PUBLIC")  # a hole
    with pytest.raises(SystemExit) as info:
        main(["--dsn", admin_db_dsn, "db", "check"])
    assert info.value.code == 1
    out = capsys.readouterr().out.splitlines()
    assert any("lo_from_bytea" in line and "REVOKE EXECUTE" in line for line in out), out
    assert any(f"{ATTACKER} may CREATE in schema public" in line for line in out), out
    assert all(line.startswith("hole: ") for line in out)
    admin_conn.execute("REVOKE EXECUTE ON FUNCTION lo_from_bytea(oid, bytea) FROM PUBLIC")
