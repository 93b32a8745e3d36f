"""Output tables never destroy inputs or the catalog: the one guard every writing command calls.

``predict``, ``evaluate``, ``import raster`` and ``import vector`` call :func:`check` at their
entry, before any work, with every table they will write and every table they read:

* every output name is valid and fits in 63 bytes (raster outputs: with the longest overview
  prefix ``o_<factor>_`` in front), and no two outputs are the same table;
* nothing is ever written into schema ``pggeolearn`` (the catalog) or a system schema, nor over a
  table that belongs to an extension (``spatial_ref_sys``) — not even with ``--force``;
* an output may not be a table the same command reads (``--out`` equal to ``--imagery``);
* an existing table is replaced only with ``--overwrite``, and only when pggeolearn created it
  (its ``COMMENT`` starts with ``pggeolearn``, written by :func:`mark`), unless ``--force``;
  ``--append`` adds to an existing table (never to one the command reads).

:func:`mark` is called by each command on the tables it creates.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from pggeolearn import errors
from pggeolearn.db import usersql
from pggeolearn.db.tables import TableName, overview_prefix

__all__ = ["MARK", "Output", "check", "is_ours", "mark", "refuse_reads", "tables_read"]

MARK = "pggeolearn "  # the start of the COMMENT of every table pggeolearn creates
CATALOG_SCHEMA = "pggeolearn"
SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast", "topology")


@dataclass(frozen=True)
class Output:
    """A table a command will write; ``overviews``: the raster overview factors built for it."""

    table: TableName
    overviews: Sequence[int] = ()
    what: str = "output"

    @classmethod
    def parse(cls, text: str | TableName, default_schema: str = "public", *,
              overviews: Sequence[int] = (), what: str = "output") -> Output:
        t = TableName.parse(text, default_schema, reserve=overview_prefix(overviews))
        return cls(t, tuple(overviews), what)


def _state(conn: psycopg.Connection, t: TableName) -> tuple[str, str | None, bool] | None:
    """(relkind, comment, owned by an extension) of ``t``, or None when it does not exist."""
    return conn.execute(
        "SELECT c.relkind::text, obj_description(c.oid, 'pg_class'),"
        " EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass"
        "         AND d.objid = c.oid AND d.deptype = 'e')"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s", [t.schema, t.name]).fetchone()


def is_ours(conn: psycopg.Connection, table: TableName) -> bool:
    """True when ``table`` exists and carries pggeolearn's mark."""
    st = _state(conn, table)
    return bool(st and (st[1] or "").startswith(MARK))


def check(conn: psycopg.Connection, outputs: Iterable[Output], *, reads: Iterable[TableName] = (),
          overwrite: bool = False, append: bool = False, force: bool = False,
          can_append: bool = True) -> None:
    """Refuse (one-line errors, nothing changed) any output that would destroy something it
    must not; see the module docstring. Call it at command entry, before any work."""
    if overwrite and append:
        raise errors.ConfigError("--overwrite and --append exclude each other: choose one")
    outs = list(outputs)
    refuse_reads(outs, reads)
    seen: dict[TableName, str] = {}
    for o in outs:
        t = o.table
        if t in seen:
            raise errors.ConfigError(f"{o.what} and {seen[t]} are the same table {t}: give each its own name")
        seen[t] = o.what
        if t.schema == CATALOG_SCHEMA:
            raise errors.ConfigError(f"{o.what} {t}: schema {CATALOG_SCHEMA} holds pggeolearn's catalog; "
                                     "write outputs into another schema")
        if t.schema in SYSTEM_SCHEMAS or t.schema.startswith(("pg_temp", "pg_toast")):
            raise errors.ConfigError(f"{o.what} {t}: {t.schema} is a system schema")
        st = _state(conn, t)
        if st is None:
            continue
        kind, comment, extension = st
        if extension:
            raise errors.ConfigError(f"{o.what} {t} belongs to an extension: never replaced")
        if kind not in ("r", "p"):
            raise errors.AlreadyExists(f"{t} exists and is not a table (relkind {kind!r})")
        if append:
            continue
        if not overwrite:
            raise errors.AlreadyExists(f"table {t} already exists: pass --overwrite to replace it"
                                       + (" or --append to add to it" if can_append else ""))
        if not (comment or "").startswith(MARK) and not force:
            raise errors.AlreadyExists(
                f"table {t} was not created by pggeolearn: --overwrite replaces only pggeolearn's "
                "outputs (add --force to replace it anyway)")


def refuse_reads(outputs: Iterable[Output], reads: Iterable[TableName]) -> None:
    """A ConfigError when an output is one of the tables the command reads."""
    read = set(reads)
    for o in outputs:
        if o.table in read:
            raise errors.ConfigError(f"{o.what} {o.table} is also an input of this command: "
                                     "write the output to another table")


def mark(conn: psycopg.Connection, table: TableName, text: str) -> None:
    """Record that pggeolearn created ``table``: ``COMMENT ON TABLE`` starting with :data:`MARK`."""
    conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(
        table.ident, sql.Literal(MARK.rstrip() + " " + text)))


def tables_read(conn: psycopg.Connection, query: sql.Composable,
                params: dict | None = None) -> set[TableName]:
    """The tables a query scans (from its plan, without running it, as the recipe sandbox role:
    :func:`pggeolearn.db.usersql.tables_read`). Call inside ``usersql.sandbox``."""
    return {TableName(s, t) for s, t in usersql.tables_read(conn, query, params)}
