"""Shared fixtures: a real PostgreSQL + PostGIS for the session, an isolated database per test.

PGGEOLEARN_TEST_DSN names a server to use (its role must be a superuser: it creates roles);
otherwise the embedded cluster is started in a temporary directory, through the same code
users run (as root, that also exercises the unprivileged-server-user path). Without
PostgreSQL binaries the database tests skip locally and fail under CI=true.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from pggeolearn import errors
from pggeolearn.db import cluster as cl
from pggeolearn.db import schema
from pggeolearn.demo import ROADS_AND_BUILDINGS

BANEPA = Path(__file__).resolve().parents[2] / "shared" / "data" / "banepa"
TEST_SETTINGS = {"fsync": "off", "full_page_writes": "off", "synchronous_commit": "off"}


def _with_dbname(dsn: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(dsn, dbname=dbname)


@pytest.fixture(scope="session")
def pg_admin_dsn(tmp_path_factory) -> str:
    """DSN of a maintenance database on a live server (session-wide)."""
    dsn = os.environ.get("PGGEOLEARN_TEST_DSN")
    if dsn:
        yield dsn
        return
    cluster = cl.Cluster(tmp_path_factory.mktemp("pg") / "pgdata", settings=TEST_SETTINGS)
    try:
        cluster.up(dbname="pggeolearn")
    except errors.MissingDependency as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL/PostGIS required under CI: {exc}")
        pytest.skip(f"no PostgreSQL: {exc}")
    yield cluster.dsn("postgres")
    cluster.destroy()


USER = "pgl_test_user"  # the pipeline's tests run as this non-superuser (pggeolearn_maintainer)
ATTACKER = "pgl_test_attacker"  # a colleague who may log in and create in public, nothing more
READER = "pgl_test_reader"  # made a pggeolearn_reader by the tests that need one
PASSWORD = "pgl-test-only"


def as_role(dsn: str, role: str) -> str:
    return psycopg.conninfo.make_conninfo(dsn, user=role, password=PASSWORD)


@pytest.fixture(scope="session")
def pg_test_roles(pg_admin_dsn) -> None:
    """Login roles (cluster-wide): the pipeline user and an attacker, neither a superuser."""
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        for role in (USER, ATTACKER, READER):
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone():
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(PASSWORD)))


@pytest.fixture(scope="session")
def template_dsn(pg_admin_dsn, pg_test_roles) -> str:
    """A database with PostGIS and schema pggeolearn installed, used as a template."""
    name = f"pgl_template_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = _with_dbname(pg_admin_dsn, name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS postgis")
        conn.execute("CREATE EXTENSION IF NOT EXISTS postgis_raster")
    schema.upgrade(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # what a DBA does for a maintainer on a shared server (README "Security of recipe SQL")
        conn.execute(f"GRANT pggeolearn_maintainer TO {USER}")
        conn.execute(f"GRANT CREATE ON SCHEMA public TO {USER}, {ATTACKER}")
        conn.execute("GRANT USAGE ON SCHEMA public TO pggeolearn_recipe")
        conn.execute(f"ALTER DEFAULT PRIVILEGES FOR ROLE {USER} IN SCHEMA public "
                     "GRANT SELECT ON TABLES TO pggeolearn_recipe")
    yield dsn
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _clone(admin_dsn: str, template: str) -> str:
    name = f"pgl_test_{uuid.uuid4().hex[:10]}"
    tmpl = psycopg.conninfo.conninfo_to_dict(template)["dbname"]
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(tmpl)))
    return name


def _drop(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _grant_database(admin_dsn: str, name: str) -> None:
    """The DBA lets the pipeline role create schemas for its outputs (predict, evaluate)."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
            sql.Identifier(name), sql.Identifier(USER)))


@pytest.fixture
def admin_db_dsn(pg_admin_dsn, template_dsn) -> str:
    """Superuser DSN of a fresh database (a clone of the template) that this test alone uses."""
    name = _clone(pg_admin_dsn, template_dsn)
    _grant_database(pg_admin_dsn, name)
    yield _with_dbname(pg_admin_dsn, name)
    _drop(pg_admin_dsn, name)


@pytest.fixture
def db_dsn(admin_db_dsn) -> str:
    """The same database as the non-superuser pipeline role (pggeolearn_maintainer)."""
    return as_role(admin_db_dsn, USER)


@pytest.fixture
def admin_conn(admin_db_dsn) -> psycopg.Connection:
    with psycopg.connect(admin_db_dsn, autocommit=True) as connection:
        yield connection


@pytest.fixture
def conn(db_dsn) -> psycopg.Connection:
    """An autocommit connection to this test's own database, as the pipeline role."""
    with psycopg.connect(db_dsn, autocommit=True) as connection:
        yield connection


@pytest.fixture
def empty_db_dsn(pg_admin_dsn) -> str:
    """DSN of a new database with nothing installed (for schema install tests)."""
    name = f"pgl_empty_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_admin_dsn, autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield _with_dbname(pg_admin_dsn, name)
    _drop(pg_admin_dsn, name)


@pytest.fixture(scope="session")
def banepa() -> Path:
    """The real Banepa data in ../shared/data/banepa, or a skip when it is absent."""
    if not (BANEPA / "imagery").is_dir():
        pytest.skip(f"real data not present at {BANEPA}")
    return BANEPA


# -- a synthetic scene loaded into PostGIS, the way a DBA would load OSM with osm2pgsql -------

ROAD_BUFFER_SQL = ROADS_AND_BUILDINGS  # the demo's recipe: roads buffered by class, buildings
IMAGE_SQL = "SELECT rast FROM public.imagery WHERE ST_Intersects(rast, tile_geom)"


@pytest.fixture(scope="session")
def scene(tmp_path_factory):
    """A seeded 1024 x 1024 synthetic scene (16 tiles of 256 px) on disk."""
    from pggeolearn.synthetic import make_scene

    return make_scene(tmp_path_factory.mktemp("scene"), size_px=1024, seed=7)


@pytest.fixture(scope="session")
def scene_template_dsn(pg_admin_dsn, template_dsn, scene) -> str:
    """A template database with the scene loaded: public.imagery (raster), and osm2pgsql-style
    public.planet_osm_line (roads, column way, EPSG:3857) and public.planet_osm_polygon."""
    from pggeolearn.importers import import_raster, import_vector

    name = _clone(pg_admin_dsn, template_dsn)
    dsn = _with_dbname(pg_admin_dsn, name)
    with psycopg.connect(as_role(dsn, USER), autocommit=True) as conn:
        import_raster(conn, [scene.image_path], "public.imagery", progress=False)
        import_vector(conn, scene.roads_path, "public.planet_osm_line", srid=3857,
                      geom_column="way", progress=False)
        import_vector(conn, scene.buildings_path, "public.planet_osm_polygon", srid=3857,
                      geom_column="way", progress=False)
    yield dsn
    _drop(pg_admin_dsn, name)


@pytest.fixture
def scene_admin_dsn(pg_admin_dsn, scene_template_dsn) -> str:
    """A fresh clone of the scene database for one test (superuser DSN)."""
    tmpl = psycopg.conninfo.conninfo_to_dict(scene_template_dsn)["dbname"]
    name = f"pgl_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(tmpl)))
    _grant_database(pg_admin_dsn, name)
    yield _with_dbname(pg_admin_dsn, name)
    _drop(pg_admin_dsn, name)


@pytest.fixture
def scene_dsn(scene_admin_dsn) -> str:
    """The scene clone as the non-superuser pipeline role."""
    return as_role(scene_admin_dsn, USER)


@pytest.fixture
def scene_conn(scene_dsn) -> psycopg.Connection:
    with psycopg.connect(scene_dsn, autocommit=True) as connection:
        yield connection


@pytest.fixture
def scene_recipe(scene):
    """The road + building recipe over the whole scene, on the imagery's own grid."""
    from pggeolearn.datasets import Recipe

    return Recipe(name="scene", srid=3857, resolution=scene.resolution, extent=scene.bounds,
                  image_sql=IMAGE_SQL, label_sql=ROAD_BUFFER_SQL,
                  classes={1: "road", 2: "building"})


# -- torch is optional ------------------------------------------------------------------------
def pytest_collection_modifyitems(config, items):
    """Tests marked ``torch`` skip, with the reason, where PyTorch (an optional extra) does not
    import; tests that only sometimes need it call ``pytest.importorskip("torch")``."""
    marked = [item for item in items if item.get_closest_marker("torch")]
    if marked and importlib.util.find_spec("torch") is None:  # found, not imported
        skip = pytest.mark.skip(reason="PyTorch is not installed (optional: pggeolearn[torch])")
        for item in marked:
            item.add_marker(skip)
