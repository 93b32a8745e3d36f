"""The chip store: one chip per tile, orphans/empties, resume, stale rebuild, read-only recipes,
errors, statistics. Small hand-made data: an 8 x 6 grid of 32 px tiles (1 m, EPSG:3857)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psycopg
import pytest
from psycopg import errors as pge

from pggeolearn import chips, datasets, errors, wkb
from pggeolearn.db.errors import translate

UL = (9519900.0, 3202900.0)  # upper-left corner (EPSG:3857)
PX, NCOLS, NROWS = 32, 8, 6
N_TILES = NCOLS * NROWS
ORPHANS, EMPTY, MOSTLY_NODATA, SOME_NODATA = (0, 1), (2,), (3,), (4,)
EXTENT = (UL[0], UL[1] - NROWS * PX, UL[0] + NCOLS * PX, UL[1])
LABEL_SQL = "SELECT geom, class_id FROM public.shapes WHERE geom && tile_geom"
IMAGE_SQL = "SELECT rast FROM public.img WHERE ST_Intersects(rast, tile_geom)"


def tile_ul(t: int) -> tuple[float, float]:
    r, c = divmod(t, NCOLS)
    return UL[0] + c * PX, UL[1] - r * PX


def make_data(conn: psycopg.Connection, *, seed: int = 0) -> None:
    """public.img: one 3-band uint8 raster (NODATA 0) per tile except the orphans; public.shapes:
    class 1 a horizontal strip over rows 2-3, class 2 small squares in three tiles."""
    rng = np.random.default_rng(seed)
    conn.execute("CREATE TABLE public.img (rid serial PRIMARY KEY, rast raster)")
    for t in range(N_TILES):
        if t in ORPHANS:
            continue
        data = rng.integers(1, 256, (3, PX, PX), dtype=np.uint8)
        if t in EMPTY:
            data[:] = 0
        if t in MOSTLY_NODATA:
            data[:, :20, :] = 0  # 62.5 %
        if t in SOME_NODATA:
            data[:, :8, :] = 0  # 25 %
        x0, y0 = tile_ul(t)
        tile = wkb.from_array(data, geotransform=(x0, 1.0, 0.0, y0, 0.0, -1.0), srid=3857, nodata=0)
        conn.execute("INSERT INTO public.img (rast) VALUES (ST_RastFromWKB(%b))", [wkb.encode(tile)])
    conn.execute("CREATE TABLE public.shapes (id serial PRIMARY KEY, class_id int, "
                 "geom geometry(Polygon, 3857))")
    conn.execute("INSERT INTO public.shapes (class_id, geom) VALUES "
                 "(1, ST_MakeEnvelope(%s, %s, %s, %s, 3857))",
                 [EXTENT[0], UL[1] - 100, EXTENT[2], UL[1] - 70])
    for t in (9, 30, 46):
        x0, y0 = tile_ul(t)
        conn.execute("INSERT INTO public.shapes (class_id, geom) VALUES "
                     "(2, ST_MakeEnvelope(%s, %s, %s, %s, 3857))", [x0 + 8, y0 - 20, x0 + 18, y0 - 10])


# sleeps once per tile (a function in FROM runs once per query), whatever the tile holds
SLOW_LABEL_SQL = ("SELECT geom, class_id FROM public.shapes WHERE geom && tile_geom "
                  "UNION ALL SELECT 'SRID=3857;POLYGON EMPTY'::geometry, 1 FROM pg_sleep(0.04)")


def make_dataset(conn: psycopg.Connection, name: str = "small", **kw) -> datasets.Dataset:
    recipe = dict(name=name, srid=3857, resolution=1.0, tile_px=PX, extent=EXTENT,
                  image_sql=IMAGE_SQL, label_sql=LABEL_SQL, classes={1: "strip", 2: "square"})
    recipe.update(kw)
    return datasets.create(conn, datasets.Recipe(**recipe))


@pytest.fixture
def small(conn):
    make_data(conn)
    return make_dataset(conn)


def chip_rows(conn, dataset="small"):
    return conn.execute(
        "SELECT tile_id, split, ST_AsBinary(image), ST_AsBinary(label), nodata_frac, class_counts, "
        "recipe_hash FROM pggeolearn.chips WHERE dataset = %s ORDER BY tile_id", [dataset]).fetchall()


def test_build_one_chip_per_tile_with_orphans_and_empties(conn, small):
    assert "none built yet" in chips.summary(conn, "small")
    report = chips.build(conn, "small", progress=False)
    assert (report.built, report.skipped, report.selected, report.tiles) == (48, 0, 48, 48)
    rows = chip_rows(conn)
    assert [r[0] for r in rows] == list(range(N_TILES))
    by_id = {r[0]: r for r in rows}
    for t in ORPHANS:
        assert by_id[t][2] is None and by_id[t][3] is None and by_id[t][4] == 1.0
        assert by_id[t][1] == "excluded"
    assert by_id[2][4] == 1.0 and by_id[2][1] == "excluded"  # all NODATA
    assert by_id[3][4] == pytest.approx(0.625) and by_id[3][1] == "excluded"
    assert by_id[4][4] == pytest.approx(0.25)
    assert by_id[5][4] == 0.0
    env = conn.execute("SELECT bool_and(ST_Equals(c.geom, g.geom)) FROM pggeolearn.chips c "
                       "JOIN pggeolearn.tile_grid('small') g USING (tile_id)").fetchone()[0]
    assert env
    for t, _, image, label, _, counts, digest in rows:
        assert digest == small.recipe_hash
        if image is None:
            continue
        img, lab = wkb.decode(image), wkb.decode(label)
        assert img.data.shape == (3, PX, PX) and lab.data.shape == (1, PX, PX)
        assert lab.upper_left == pytest.approx(tile_ul(t))
        assert counts == np.bincount(lab.band(0)[img.valid()], minlength=3).tolist()  # NODATA: no class
    assert any(r[5][2] > 0 for r in rows if r[5])  # the squares are there
    s = report.stats
    assert (s["orphans"], s["empties"], s["nodata_excluded"]) == (2, 1, 4)
    assert s["chips"] == 48 and sum(s["splits"].values()) == 48
    assert s["leakage"] == 0
    text = chips.summary(conn, "small")
    assert "2 orphans" in text and "1 empties" in text and "leakage 0" in text


def test_rerun_skips_and_stale_chips_are_rebuilt(conn, small):
    chips.build(conn, "small", progress=False)
    before = conn.execute("SELECT tile_id, built_at FROM pggeolearn.chips ORDER BY 1").fetchall()
    again = chips.build(conn, "small", progress=False)
    assert (again.built, again.skipped, again.stale_rebuilt) == (0, 48, 0)
    assert conn.execute("SELECT tile_id, built_at FROM pggeolearn.chips ORDER BY 1").fetchall() == before

    # the recipe changes (class 1 now everything the strip touches, as class 2): chips are stale
    conn.execute("UPDATE pggeolearn.datasets SET label_sql = %s, recipe_hash = 'changed' "
                 "WHERE name = 'small'", ["SELECT geom, 2 AS class_id FROM public.shapes "
                                          "WHERE geom && tile_geom"])
    kept = chips.build(conn, "small", progress=False, rebuild_stale=False)
    assert (kept.built, kept.stale_left) == (0, 48)
    assert kept.stats["stale"] == 48
    rebuilt = chips.build(conn, "small", progress=False)
    assert (rebuilt.built, rebuilt.stale_rebuilt, rebuilt.skipped) == (48, 48, 0)
    rows = chip_rows(conn)
    assert {r[6] for r in rows} == {"changed"}
    assert all(r[5][1] == 0 for r in rows if r[5])  # no class 1 pixel left
    assert rebuilt.stats["stale"] == 0


def test_where_selects_tiles_and_a_later_build_completes(conn, small):
    part = chips.build(conn, "small", where="tile_id < 10 AND tile_id::text LIKE '%' AND ST_Area(geom) > 0",
                       progress=False)
    assert part.built == 10
    assert [r[0] for r in conn.execute("SELECT tile_id FROM pggeolearn.chips ORDER BY 1")] == list(range(10))
    rest = chips.build(conn, "small", progress=False, jobs=2)
    assert (rest.built, rest.skipped) == (38, 10)
    with pytest.raises(errors.ConfigError, match="--where fails"):
        chips.build(conn, "small", where="no_such_column = 1", progress=False)
    with pytest.raises(errors.ConfigError, match="--where fails"):
        chips.build(conn, "small", where="tile_id IN (SELECT 1 FROM pg_class); DELETE FROM public.img",
                    progress=False)
    assert conn.execute("SELECT count(*) FROM public.img").fetchone()[0] == N_TILES - 2


def test_jobs_give_the_same_chips(conn, small):
    def digest():
        return conn.execute(
            "SELECT md5(string_agg(tile_id || coalesce(md5(ST_AsBinary(image)), '-') || "
            "coalesce(md5(ST_AsBinary(label)), '-') || nodata_frac || coalesce(class_counts::text, '-') "
            "|| split, ',' ORDER BY tile_id)) FROM pggeolearn.chips").fetchone()[0]

    chips.build(conn, "small", progress=False, jobs=1)
    one = digest()
    stats1 = datasets.get(conn, "small").stats
    three = chips.build(conn, "small", progress=False, jobs=3, force=True, batch_size=2)
    assert three.built == 48
    assert digest() == one
    stats3 = datasets.get(conn, "small").stats
    for key in ("bands", "class_pixels", "splits", "split_params"):
        assert stats3[key] == stats1[key]


def test_stats_match_numpy_over_train_chips(conn, small):
    chips.build(conn, "small", progress=False)
    stats = datasets.get(conn, "small").stats
    rows = [r for r in chip_rows(conn) if r[1] == "train"]
    assert rows
    images = np.stack([wkb.decode(r[2]).data for r in rows])
    for b, band in enumerate(stats["bands"]):
        v = images[:, b][images[:, b] != 0].astype(np.float64)  # NODATA is 0
        assert band["count"] == v.size
        assert band["mean"] == pytest.approx(v.mean(), rel=1e-9)
        assert band["std"] == pytest.approx(v.std(), rel=1e-6)
        assert (band["min"], band["max"]) == (v.min(), v.max())
    labels = np.stack([wkb.decode(r[3]).band(0) for r in rows])
    valid = np.stack([wkb.decode(r[2]).valid() for r in rows])
    expect = np.bincount(labels[valid], minlength=3)  # class frequencies leave NODATA out
    assert stats["class_pixels"] == {str(k): int(n) for k, n in enumerate(expect)}
    assert sum(stats["class_freq"].values()) == pytest.approx(1.0)
    counts = dict(conn.execute("SELECT split, count(*) FROM pggeolearn.chips GROUP BY 1").fetchall())
    assert stats["splits"] == {k: counts.get(k, 0) for k in ("train", "val", "test", "excluded")} | {
        "unassigned": 0}
    assert json.loads(json.dumps(stats)) == stats


def test_recipe_sql_that_writes_fails_and_writes_nothing(conn):
    make_data(conn)
    conn.execute("CREATE TABLE public.stolen (n int)")
    conn.execute("CREATE FUNCTION public.sneaky() RETURNS int LANGUAGE plpgsql VOLATILE AS "
                 "$$ BEGIN RETURN 1; END $$")
    make_dataset(conn, label_sql="SELECT geom, class_id FROM public.shapes "
                                 "WHERE geom && tile_geom AND public.sneaky() = 1")
    # after the recipe was checked, the function turns malicious
    conn.execute("CREATE OR REPLACE FUNCTION public.sneaky() RETURNS int LANGUAGE plpgsql VOLATILE AS "
                 "$$ BEGIN INSERT INTO public.stolen VALUES (1); RETURN 1; END $$")
    with pytest.raises(errors.RecipeError, match=r"label SQL .* fails on tile (\d+): cannot execute "
                                                 r"INSERT in a read-only transaction") as info:
        chips.build(conn, "small", progress=False, jobs=2)
    assert conn.execute("SELECT count(*) FROM public.stolen").fetchone()[0] == 0
    # tiles without shapes never call the function: chips of batches done before stay (whole
    # and valid, a rerun resumes); the failing tile's batch wrote nothing
    tile = int(re.search(r"on tile (\d+)", str(info.value)).group(1))
    stored = [r[0] for r in conn.execute("SELECT tile_id FROM pggeolearn.chips")]
    assert tile not in stored and len(stored) < N_TILES


def test_missing_imagery_table_is_a_recipe_error_without_rows(conn, small):
    conn.execute("DROP TABLE public.img")
    with pytest.raises(errors.RecipeError, match='image SQL .* tile 0: relation "public.img" does not exist'):
        chips.build(conn, "small", progress=False)
    assert conn.execute("SELECT count(*) FROM pggeolearn.chips").fetchone()[0] == 0


def test_statement_timeout_is_query_timeout_without_rows(conn):
    make_data(conn)
    make_dataset(conn, label_sql=SLOW_LABEL_SQL.replace("0.04", "0.4"))
    with pytest.raises(errors.QueryTimeout, match="statement timeout.*0.15 s per tile"):
        chips.build(conn, "small", progress=False, statement_timeout_s=0.15)
    # the first tile is built alone first: when it is an orphan (no label SQL runs) it may land
    stored = {r[0] for r in conn.execute("SELECT tile_id FROM pggeolearn.chips")}
    assert stored <= {ORPHANS[0]}


def test_unknown_dataset_and_bad_options(conn):
    with pytest.raises(errors.DatasetNotFound):
        chips.build(conn, "nope", progress=False)
    with pytest.raises(errors.ConfigError):
        chips.build(conn, "nope", jobs=0)




def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def n_chips(conn) -> int:
    return conn.execute("SELECT count(*) FROM pggeolearn.chips").fetchone()[0]


def test_killed_build_resumes_with_one_chip_per_tile(conn, db_dsn):
    make_data(conn)
    make_dataset(conn, label_sql=SLOW_LABEL_SQL)
    code = ("import sys; from pggeolearn import chips; "
            "chips.build(sys.argv[1], 'small', progress=False, jobs=2, batch_size=2)")
    proc = subprocess.Popen([sys.executable, "-c", code, db_dsn], env=os.environ.copy())
    try:
        wait_for(lambda: n_chips(conn) >= 6)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    landed = n_chips(conn)
    assert 6 <= landed < N_TILES
    # the killed build's sessions go away (its advisory lock with them)
    wait_for(lambda: conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name "
                                  "LIKE 'pggeolearn chips%%'").fetchone()[0] == 0)
    report = chips.build(conn, "small", progress=False, jobs=2)
    assert report.skipped >= landed - 2 and report.built + report.skipped == N_TILES
    assert conn.execute("SELECT count(*), count(DISTINCT tile_id), min(tile_id), max(tile_id) "
                        "FROM pggeolearn.chips").fetchone() == (N_TILES, N_TILES, 0, N_TILES - 1)
    assert conn.execute("SELECT count(*) FROM pggeolearn.chips WHERE split IS NULL").fetchone()[0] == 0


def test_terminated_worker_is_connection_lost_then_rerun_completes(conn, db_dsn):
    make_data(conn)
    make_dataset(conn, label_sql=SLOW_LABEL_SQL)
    failure: list[BaseException] = []

    def run():
        try:
            chips.build(db_dsn, "small", progress=False, batch_size=2)
        except BaseException as exc:  # noqa: BLE001
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: n_chips(conn) >= 3)
    killed = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE application_name = 'pggeolearn chips build 0'").fetchall()
    thread.join(30)
    assert killed == [(True,)]
    assert len(failure) == 1 and isinstance(failure[0], errors.ConnectionLost), failure
    report = chips.build(conn, "small", progress=False)
    assert report.skipped >= 3
    assert n_chips(conn) == N_TILES


def test_server_errors_keep_their_class():
    assert not chips._stage_failure(pge.DiskFull("could not extend file: No space left on device"))
    assert isinstance(translate(pge.DiskFull("no space")), errors.DiskFull)
    assert not chips._stage_failure(pge.QueryCanceled("canceling statement"))
    assert not chips._stage_failure(pge.AdminShutdown("terminating connection"))
    assert chips._stage_failure(pge.UndefinedTable('relation "x" does not exist'))
    assert chips._stage_failure(pge.ReadOnlySqlTransaction("cannot execute INSERT"))


def test_one_build_per_dataset_at_a_time(conn, small, db_dsn):
    with psycopg.connect(db_dsn, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtextextended('pggeolearn chips ' || 'small', 0))")
        with pytest.raises(errors.DatabaseError, match="another chips build of small is running"):
            chips.build(conn, "small", progress=False)
    assert chips.build(conn, "small", progress=False).built == N_TILES


def test_show_and_map(conn, small, tmp_path):
    from PIL import Image

    with pytest.raises(errors.NotBuilt):
        chips.show(conn, "small", tmp_path / "none.png")
    chips.build(conn, "small", progress=False)
    out = chips.show(conn, "small", tmp_path / "sheet.png", n=9)
    img = Image.open(out)
    assert img.size[0] == 3 * (PX + 8) and img.size[1] > 3 * PX
    assert chips.show(conn, "small", tmp_path / "train.png", n=4, split="train").exists()
    view = chips.map_view(conn, "small")
    assert view.name == "chips_map_small" and view.chips == N_TILES
    geom = conn.execute("SELECT type, srid FROM geometry_columns WHERE f_table_schema = 'pggeolearn' "
                        "AND f_table_name = 'chips_map_small'").fetchone()
    assert geom == ("POLYGON", 3857)
    rows = conn.execute('SELECT tile_id, split, orphan, frac_background, frac_strip, frac_square '
                        'FROM pggeolearn."chips_map_small" ORDER BY tile_id').fetchall()
    assert len(rows) == N_TILES and rows[0][2] is True and rows[0][3] is None
    assert all(abs(r[3] + r[4] + r[5] - 1) < 1e-9 for r in rows if not r[2] and r[0] != 2)
    assert rows[2][3] is None  # all NODATA (an empty): no class pixels at all
    assert "QGIS" in view.describe()
    chips.map_view(conn, "small")  # refresh: idempotent


@pytest.mark.banepa
def test_banepa_build(conn, banepa):
    from pggeolearn.importers import import_raster

    import_raster(conn, [banepa / "imagery" / "banepa_train_mosaic_epsg3857.tif"], "public.banepa",
                  progress=False)
    conn.execute("CREATE TABLE public.buildings (id serial PRIMARY KEY, geom geometry(Polygon, 4326))")
    features = json.loads((banepa / "labels" / "osm_features_ac7e343eb1faacd2.geojson").read_text())
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO public.buildings (geom) VALUES (ST_SetSRID(ST_GeomFromGeoJSON(%s), 4326))",
                        [(json.dumps(f["geometry"]),) for f in features["features"]])
    datasets.create(conn, datasets.Recipe(
        name="banepa", srid=3857, resolution=0.14929107086948487, extent_from="public.banepa",
        image_sql="SELECT rast FROM public.banepa WHERE ST_Intersects(rast, tile_geom)",
        label_sql="SELECT geom, 1 AS class_id FROM public.buildings WHERE geom && ST_Transform(tile_geom, 4326)",
        classes={1: "building"}))
    report = chips.build(conn, "banepa", jobs=2, progress=False)
    assert report.built == 192
    s = report.stats
    assert s["orphans"] == 0 and s["empties"] == 0 and s["leakage"] == 0
    assert all(s["splits"][k] > 0 for k in ("train", "val", "test"))
    assert 0.05 < s["class_freq"]["1"] < 0.6
    assert chips.leakage(conn, "banepa") == 0
