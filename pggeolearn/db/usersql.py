"""The one place SQL written by users is embedded and run (image/label SQL, ``--where``, imagery).

The boundary is not the READ ONLY transaction (PostgreSQL never meant it as one) but the role
the SQL runs as: every user query executes *inside* a SECURITY DEFINER function owned by the
NOLOGIN role ``pggeolearn_recipe`` (``pggeolearn.recipe_rows``, ``image_tile``, ``label_tile``),
so it has only what that role was granted (USAGE/SELECT given by ``pggeolearn grant``), and,
because it runs in a security-definer context, nothing it calls can change role or session
authorization (``SET ROLE`` / ``set_config('role', ...)`` are refused there, unlike after a plain
``SET LOCAL ROLE``, which the session user may undo). Around it, the transaction is READ ONLY
with a ``statement_timeout`` and a pinned ``search_path``; user text is embedded as one
subquery (never a statement string), so a second statement is a syntax error.

Column types of a recipe query are learned by *describing* a prepared statement: parsed and
analysed, never planned or executed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.numeric import FloatDumper

from pggeolearn import errors

RECIPE_ROLE = "pggeolearn_recipe"
DEFAULT_TIMEOUT_S = 60.0
MAX_BUFFER_M = 100_000.0  # a label buffer beyond 100 km is a mistake, not a road

_SETUP = """SELECT pg_catalog.set_config('statement_timeout', %(timeout)s, true),
       pg_catalog.set_config('search_path', pggeolearn.pinned_search_path(), true),
       (SELECT p.prosecdef AND p.proowner = r.oid
        FROM pg_catalog.pg_proc p, pg_catalog.pg_roles r
        WHERE p.oid = pg_catalog.to_regprocedure('pggeolearn.recipe_rows(text)')
          AND r.rolname = %(role)s)"""


def text(user_sql: str, what: str = "SQL") -> str:
    """User SQL made safe to embed as a subquery ``( ... )``: trailing ``;`` removed, ``%``
    escaped for psycopg, and a newline appended so a trailing ``-- comment`` cannot swallow
    the closing parenthesis."""
    body = (user_sql or "").strip()
    while body.endswith(";"):
        body = body[:-1].rstrip()
    if not body:
        raise errors.RecipeError(f"empty {what}")
    return body.replace("%", "%%") + "\n"


def stored(user_sql: str) -> str:
    """The form a recipe's SQL is stored in the catalog (image_tile/label_tile embed it)."""
    body = (user_sql or "").strip()
    while body.endswith(";"):
        body = body[:-1].rstrip()
    return body


def embed(template: str, parts: Mapping[str, sql.Composable] | None = None, /,
          **user: str) -> sql.Composed:
    """``template`` (psycopg ``{name}`` placeholders) with each user SQL embedded via
    :func:`text`, and our own ``parts`` (identifiers, literals) in theirs."""
    return sql.SQL(template).format(**{k: sql.SQL(text(v)) for k, v in user.items()},
                                    **(parts or {}))


@contextlib.contextmanager
def sandbox(conn: psycopg.Connection, timeout_s: float | None = DEFAULT_TIMEOUT_S,
            *, require: bool = True) -> Iterator[None]:
    """A READ ONLY transaction with ``statement_timeout`` and a pinned ``search_path`` in which
    user SQL may be run through :func:`rows` (or image_tile/label_tile). ``require``: refuse
    when the sandbox role is not set up in this database (``pggeolearn db init``)."""
    with conn.transaction():
        conn.execute("SET TRANSACTION READ ONLY")
        ms = f"{int(max(timeout_s or DEFAULT_TIMEOUT_S, 0.001) * 1000)}ms"
        try:
            row = conn.execute(_SETUP, {"timeout": ms, "role": RECIPE_ROLE}).fetchone()
        except psycopg.errors.UndefinedFunction as exc:
            raise errors.SchemaError(
                "schema pggeolearn here lacks the recipe sandbox (run: pggeolearn db upgrade)") from exc
        if require and not row[2]:
            raise errors.SchemaError(
                f"the recipe sandbox is not set up in this database: role {RECIPE_ROLE} missing or "
                "pggeolearn.recipe_rows not owned by it (run pggeolearn db init as a role with "
                "CREATEROLE; pggeolearn db check lists what is missing)")
        yield


def rows(conn: psycopg.Connection, query: sql.Composable, params: Mapping[str, Any] | None,
         columns: Sequence[tuple[str, str]], *, binary: bool = False) -> list[tuple]:
    """Run ``query`` (ours, with user SQL embedded by :func:`embed`) as role pggeolearn_recipe
    inside a security-definer context and return its rows; ``columns`` are its (name, type)s.
    Call inside :func:`sandbox`."""
    inner = render(conn, query, params)
    coldefs = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t))
                                 for n, t in columns)
    outer = sql.SQL("SELECT * FROM pggeolearn.recipe_rows(%s) AS r({})").format(coldefs)
    with conn.cursor(binary=binary) as cur:
        cur.execute(outer, [inner])
        return cur.fetchall()


def tables_read(conn: psycopg.Connection, query: sql.Composable,
                params: Mapping[str, Any] | None = None) -> set[tuple[str, str]]:
    """``(schema, table)`` of every relation ``query`` (ours, with user SQL embedded) scans,
    views resolved to their tables: its ``EXPLAIN (VERBOSE, FORMAT JSON)`` plan, made as role
    pggeolearn_recipe by ``pggeolearn.recipe_plan`` (planning may already run functions the
    user SQL calls), never executed. Call inside :func:`sandbox`."""
    plan = conn.execute("SELECT pggeolearn.recipe_plan(%s)",
                        [render(conn, query, params)]).fetchone()[0]
    found: set[tuple[str, str]] = set()
    stack: list[Any] = [plan]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "Relation Name" in node and "Schema" in node:
                found.add((node["Schema"], node["Relation Name"]))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def render(conn: psycopg.Connection, query: sql.Composable, params: Mapping[str, Any] | None) -> str:
    """The query text with its parameters inlined as literals (it travels as one text value)."""
    cur = psycopg.ClientCursor(conn)
    cur.adapters.register_dumper(float, _Float8Dumper)  # typed: no numeric overload may win
    try:
        return cur.mogrify(query, params or {})
    finally:
        cur.close()


class _Float8Dumper(FloatDumper):
    def quote(self, obj: float) -> bytes:
        return b"(" + super().quote(obj) + b")::pg_catalog.float8"


def describe(conn: psycopg.Connection, query: sql.Composable,
             params: Mapping[str, Any] | None) -> list[tuple[str, int]]:
    """(name, type oid) of each column of ``query``: parsed and analysed by the server, never
    planned or run (a prepared statement's description)."""
    text_ = render(conn, query, params)
    pgconn = conn.pgconn
    res = pgconn.prepare(b"", text_.encode())
    if res.status != psycopg.pq.ExecStatus.COMMAND_OK:
        raise psycopg.errors.error_from_result(res, encoding=conn.info.encoding)
    res = pgconn.describe_prepared(b"")
    if res.status != psycopg.pq.ExecStatus.COMMAND_OK:
        raise psycopg.errors.error_from_result(res, encoding=conn.info.encoding)
    return [(res.fname(i).decode(), res.ftype(i)) for i in range(res.nfields)]


def check_buffer(value: float, where: str) -> None:
    """A label buffer must be a finite number of metres in 0..MAX_BUFFER_M (``ST_Buffer`` with NaN
    crashes PostGIS 3.3, the whole server with it)."""
    if value is None:
        return
    v = float(value)
    if math.isnan(v) or math.isinf(v) or v < 0 or v > MAX_BUFFER_M:
        raise errors.RecipeError(
            f"buffer_m = {value!r} {where}: it must be a finite number of metres in "
            f"0..{MAX_BUFFER_M:g}")


_CATALOG_LEVEL = {"models": "trainer", "runs": "trainer", "datasets": "maintainer",
                  "chips": "maintainer"}


def permission_hint(exc: BaseException, user: str | None = None) -> str | None:
    """For a 'permission denied' error, one line naming the privilege and the GRANT that fixes it."""
    if getattr(exc, "sqlstate", None) != "42501":
        return None
    msg = str(exc).splitlines()[0] if str(exc) else "permission denied"
    if user is None:
        pgconn = getattr(exc, "pgconn", None)
        try:
            user = pgconn.user.decode() if pgconn is not None and pgconn.user else None
        except Exception:  # noqa: BLE001 - only a nicer message
            user = None
    who = user or "<your role>"
    low = msg.lower()
    obj = msg.rsplit(" ", 1)[-1].strip('"')
    if "schema pggeolearn" in low:
        return f"{msg} (a DBA fixes it: GRANT pggeolearn_reader TO {who})"
    if ("for table" in low or "for view" in low) and obj in _CATALOG_LEVEL:
        return f"{msg} (a DBA fixes it: GRANT pggeolearn_{_CATALOG_LEVEL[obj]} TO {who})"
    if "for sequence" in low:
        return f"{msg} (a DBA fixes it: GRANT pggeolearn_trainer TO {who})"
    if "for function" in low and obj in ("image_tile", "label_tile", "recipe_rows"):
        return f"{msg} (a DBA fixes it: GRANT pggeolearn_reader TO {who})"
    if "for table" in low or "for view" in low:
        return (f"{msg} (recipe SQL runs as {RECIPE_ROLE}; a DBA fixes it: pggeolearn grant "
                f"SCHEMA.{obj}, i.e. GRANT SELECT ON SCHEMA.{obj} TO {RECIPE_ROLE})")
    if "for schema" in low:
        return f"{msg} (a DBA fixes it: GRANT USAGE ON SCHEMA {obj} TO {who}, or CREATE to write there)"
    if "for database" in low or "create schema" in low:
        return f"{msg} (a DBA fixes it: GRANT CREATE ON DATABASE {obj} TO {who}, or name an existing schema)"
    return f"{msg} (the connected role {who} lacks it; see README \"Security of recipe SQL\")"
