"""Helpers both importers share: target-table checks, SRID checks, index names."""

from __future__ import annotations

import psycopg
from psycopg import sql

from pggeolearn import errors
from pggeolearn.db.names import split_table

MAX_IDENT = 63  # PostgreSQL truncates longer identifiers (NAMEDATALEN - 1)


def target(table: str) -> tuple[str, str, sql.Identifier, str]:
    """``(schema, name, quoted identifier, display name)`` for a user's table name."""
    schema, name = split_table(table)
    return schema, name, sql.Identifier(schema, name), f"{schema}.{name}"


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
    *, overwrite: bool, append: bool,
) -> bool:
    """Drop the table for ``overwrite``; return True when it exists and rows are to be appended.

    An existing table without either flag is an :class:`~pggeolearn.errors.AlreadyExists`;
    a view or other relation of that name is never dropped.
    """
    kind = relkind(conn, schema, name)
    if kind is None:
        return False
    if kind not in ("r", "p"):
        raise errors.AlreadyExists(f"{display} exists and is not a table (relkind {kind!r})")
    if append:
        return True
    if not overwrite:
        raise errors.AlreadyExists(f"table {display} already exists: pass --overwrite to "
                                   "replace it or --append to add to it")
    conn.execute(sql.SQL("DROP TABLE {}").format(ident))
    return False


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
