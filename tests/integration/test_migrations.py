"""Schema versions: a fresh install equals an upgrade from the first revision, and functions
that the SQL files no longer define (an old signature, a removed function) are dropped."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg import sql

from pggeolearn.db import schema

CATALOG = """
SELECT 'function ' || p.oid::regprocedure::text || ' -> ' || pg_get_function_result(p.oid)
       || ' ' || p.provolatile::text || ' ' || p.prosecdef::text || ' ' || md5(p.prosrc)
FROM pg_proc p WHERE p.pronamespace = 'pggeolearn'::regnamespace
UNION ALL
SELECT 'column ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
       || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
WHERE c.relnamespace = 'pggeolearn'::regnamespace AND c.relkind IN ('r', 'v', 'p')
  AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'index ' || indexrelid::regclass::text || ' ' || pg_get_indexdef(indexrelid)
FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
WHERE c.relnamespace = 'pggeolearn'::regnamespace
UNION ALL
SELECT 'constraint ' || conrelid::regclass::text || ' ' || pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'pggeolearn'::regnamespace
ORDER BY 1
"""


def catalog(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute(CATALOG)]


@pytest.fixture
def second_empty_db_dsn(pg_admin_dsn):
    name = f"pgl_empty_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_admin_dsn, autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield psycopg.conninfo.make_conninfo(pg_admin_dsn, dbname=name)
    with psycopg.connect(pg_admin_dsn, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_fresh_install_equals_upgrade_from_the_first_revision(empty_db_dsn, second_empty_db_dsn):
    fresh, stepped = empty_db_dsn, second_empty_db_dsn
    schema.upgrade(fresh)
    assert schema.upgrade(stepped, "0001") == "0001"
    schema.upgrade(stepped)
    assert catalog(stepped) == catalog(fresh)


def test_superseded_functions_are_dropped(empty_db_dsn):
    schema.upgrade(empty_db_dsn)
    with psycopg.connect(empty_db_dsn, autocommit=True) as conn:
        # what an older version would have left: another signature of a function, a removed one
        conn.execute("CREATE FUNCTION pggeolearn.tile_ref(dataset text, tile_id bigint) "
                     "RETURNS raster LANGUAGE sql AS 'SELECT NULL::raster'")
        conn.execute("CREATE FUNCTION pggeolearn.gone() RETURNS int LANGUAGE sql AS 'SELECT 1'")
    before = len(catalog(empty_db_dsn))
    schema.upgrade(empty_db_dsn)  # at head already: the functions are reinstalled
    with psycopg.connect(empty_db_dsn) as conn:
        left = [r[0] for r in conn.execute(
            "SELECT oid::regprocedure::text FROM pg_proc WHERE pronamespace = "
            "'pggeolearn'::regnamespace AND proname IN ('tile_ref', 'gone') ORDER BY 1")]
    assert left == ["pggeolearn.tile_ref(text,integer)"]
    assert len(catalog(empty_db_dsn)) == before - 2


def test_upgrade_to_0005_makes_existing_datasets_version_1(empty_db_dsn):
    """Datasets, chips, models and runs from before versions: version 1 of their recipe."""
    assert schema.upgrade(empty_db_dsn, "0004") == "0004"
    with psycopg.connect(empty_db_dsn, autocommit=True) as conn:
        conn.execute("""INSERT INTO pggeolearn.datasets (name, srid, resolution, tile_px, minx, miny,
                            maxx, maxy, image_sql, label_sql, classes, recipe, recipe_hash)
                        VALUES ('d', 3857, 1, 16, 0, 0, 16, 16, 'SELECT 1', 'SELECT 2', '{"1": "x"}',
                                '{"tile_px": 16}', 'h1')""")
        conn.execute("INSERT INTO pggeolearn.chips (dataset, tile_id, geom, recipe_hash)"
                     " VALUES ('d', 0, ST_MakeEnvelope(0, 0, 16, 16, 3857), 'h1')")
        for model, recipe_hash in (("same", "h1"), ("older", "h0")):
            conn.execute("""INSERT INTO pggeolearn.models (name, dataset, recipe_hash, framework,
                                architecture, hyperparameters, classes, normalization, tile_px,
                                resolution, srid, bands, weights, metrics, package_version)
                            VALUES (%s, 'd', %s, 'mxnet', '{}', '{}', '{}', '{}', 16, 1, 3857, 3,
                                    'w', '{}', '0')""", [model, recipe_hash])
        conn.execute("INSERT INTO pggeolearn.runs (kind, model, dataset, status) VALUES"
                     " ('train', 'same', 'd', 'done'), ('predict', 'older', NULL, 'done'),"
                     " ('predict', 'same', NULL, 'done')")
    schema.upgrade(empty_db_dsn)
    with psycopg.connect(empty_db_dsn) as conn:
        assert conn.execute("SELECT name, version FROM pggeolearn.datasets").fetchall() == [("d", 1)]
        assert conn.execute("SELECT dataset, version, recipe_hash, recipe, dropped_at"
                            " FROM pggeolearn.dataset_versions").fetchall() == [
            ("d", 1, "h1", {"tile_px": 16}, None)]
        assert conn.execute("SELECT dataset_version FROM pggeolearn.chips").fetchall() == [(1,)]
        assert conn.execute("SELECT name, dataset_version FROM pggeolearn.models ORDER BY name"
                            ).fetchall() == [("older", None), ("same", 1)]
        assert conn.execute("SELECT kind, model, dataset_version, recipe_hash FROM pggeolearn.runs"
                            " ORDER BY run_id").fetchall() == [
            ("train", "same", 1, "h1"), ("predict", "older", None, "h0"), ("predict", "same", 1, "h1")]
        # the new version column has no default: only datasets.create writes it
        assert conn.execute("SELECT column_default FROM information_schema.columns WHERE table_schema ="
                            " 'pggeolearn' AND table_name = 'datasets' AND column_name = 'version'"
                            ).fetchone() == (None,)
