"""Helpers both importers share: target-table checks, SRID checks, index names."""

from __future__ import annotations

import psycopg
from psycopg import sql

from pggeolearn import errors, outputs
from pggeolearn.db.tables import TableName

MAX_IDENT = 63  # PostgreSQL truncates longer identifiers (NAMEDATALEN - 1)


def target(table: str) -> tuple[str, str, sql.Identifier, str]:
    """``(schema, name, quoted identifier, display name)`` for a user's table name (validated:
    an invalid or over-long name is refused before any work)."""
    t = TableName.parse(table)
    return t.schema, t.name, t.ident, str(t)


def relkind(conn: psycopg.Connection, schema: str, name: str) -> str | None:
    """``pg_class.relkind`` of ``schema.name`` ('r' table, 'v' view, ...) or None when absent."""
    row = conn.execute(
        "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s",
        [schema, name],
    ).fetchone()
    return row[0] if row else None


def check_mode(overwrite: bool, append: bool) -> None:
    if overwrite and append:
        raise errors.ConfigError("--overwrite and --append exclude each other: choose one")


def prepare_target(
    conn: psycopg.Connection, schema: str, name: str, ident: sql.Identifier, display: str,
    *, overwrite: bool, append: bool, force: bool = False,
) -> bool:
    """Drop the table for ``overwrite``; return True when it exists and rows are to be appended.

    :func:`pggeolearn.outputs.check` decides first: an existing table without either flag is an
    :class:`~pggeolearn.errors.AlreadyExists`, a view or other relation is never dropped, nor
    the catalog, nor a table pggeolearn did not create (unless ``force``).
    """
    t = TableName(schema, name)
    outputs.check(conn, [outputs.Output(t, what="--table")], overwrite=overwrite, append=append,
                  force=force)
    if relkind(conn, schema, name) is None:
        return False
    if append:
        return True
    conn.execute(sql.SQL("DROP TABLE {}").format(ident))
    return False


def mark(conn: psycopg.Connection, schema: str, name: str, what: str) -> None:
    """Mark a table the importer created as pggeolearn's (so --overwrite may replace it later)."""
    outputs.mark(conn, TableName(schema, name), what)


def check_srid(conn: psycopg.Connection, srid: int) -> None:
    """Fail with one line when ``srid`` is not in spatial_ref_sys (ST_Transform would fail)."""
    found = conn.execute("SELECT 1 FROM spatial_ref_sys WHERE srid = %s", [srid]).fetchone()
    if not found:
        raise errors.ConfigError(f"SRID {srid} is not in spatial_ref_sys of this database")


def index_name(table: str, suffix: str) -> sql.Identifier:
    """``<table>_<suffix>``, the name PostgreSQL itself would pick, shortened to fit 63 bytes."""
    room = MAX_IDENT - len(suffix.encode()) - 1
    head = table.encode()[:room].decode("utf-8", "ignore")
    return sql.Identifier(f"{head}_{suffix}")
