"""Schema install/upgrade through Alembic: idempotent, atomic, matching the declarations."""

from __future__ import annotations

import re

import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from pggeolearn import __version__, errors
from pggeolearn.catalog import metadata
from pggeolearn.db import connect, schema
from pggeolearn.resources import schema_files


def test_init_on_empty_database_then_again(empty_db_dsn):
    assert schema.upgrade(empty_db_dsn) == schema.head_revision()
    assert schema.upgrade(empty_db_dsn) == schema.head_revision()  # idempotent
    info = schema.version_info(empty_db_dsn)
    assert info.up_to_date and info.sql_version == __version__
    with psycopg.connect(empty_db_dsn) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'pggeolearn'")}
    assert {"datasets", "chips", "models", "runs", "alembic_version"} <= tables


def test_failed_upgrade_changes_nothing(empty_db_dsn):
    with psycopg.connect(empty_db_dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION postgis; CREATE EXTENSION postgis_raster")
        conn.execute("CREATE SCHEMA pggeolearn; CREATE TABLE pggeolearn.runs (mine int)")
        conn.execute("INSERT INTO pggeolearn.runs VALUES (42)")
    with pytest.raises(errors.SchemaError, match="nothing changed.*runs"):
        schema.upgrade(empty_db_dsn)
    with psycopg.connect(empty_db_dsn) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'pggeolearn'")}
        assert tables == {"runs"}
        assert conn.execute("SELECT mine FROM pggeolearn.runs").fetchall() == [(42,)]
    assert schema.current_revision(empty_db_dsn) is None


def test_declarations_match_migrations(db_dsn):
    engine = sa.create_engine("postgresql+psycopg://", creator=lambda: connect(db_dsn))
    with engine.connect() as c:
        ctx = MigrationContext.configure(c, opts={
            "include_schemas": True,
            "include_name": lambda name, type_, parent: type_ != "schema" or name == "pggeolearn",
            "version_table_schema": "pggeolearn",
        })
        diff = [d for d in compare_metadata(ctx, metadata)
                if not (d[0] == "remove_table" and d[1].name == "alembic_version")]
    engine.dispose()
    assert diff == []


def test_every_function_has_volatility_and_comment(conn):
    for path in schema_files():
        text = path.read_text()
        for m in re.finditer(r"CREATE OR REPLACE FUNCTION\s+([\w.]+)\((.*?)\)\s*RETURNS(.*?)\$\$",
                             text, re.S | re.I):
            header = m.group(3)
            assert re.search(r"\b(IMMUTABLE|STABLE|VOLATILE)\b", header), f"{m.group(1)} volatility"
    missing = conn.execute("""
        SELECT p.oid::regprocedure::text FROM pg_proc p
        WHERE p.pronamespace = 'pggeolearn'::regnamespace
          AND obj_description(p.oid, 'pg_proc') IS NULL""").fetchall()
    assert missing == []


def test_require_schema(empty_db_dsn):
    with psycopg.connect(empty_db_dsn) as conn, pytest.raises(errors.SchemaError, match="db init"):
        schema.require_schema(conn)


def test_bad_dsn_is_one_clear_line():
    with pytest.raises(errors.DatabaseError, match="cannot connect") as info:
        connect("host=/nonexistent/socket/dir dbname=x user=y connect_timeout=2")
    assert "\n" not in str(info.value)
