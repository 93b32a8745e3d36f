"""The one connection handle: where to connect (--dsn, PGGEOLEARN_DSN, libpq PG* variables, else
the embedded cluster), one connection (:func:`connect`) and a pool of several (:func:`pool`), both
with pggeolearn's settings (application_name, connect_timeout, a pinned search_path)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import psycopg

from pggeolearn import errors
from pggeolearn.db.errors import db_errors, first_line

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

# libpq variables that mean "the user configured a server" (see libpq-envars).
LIBPQ_VARS = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")
CONNECT_TIMEOUT_S = 10


def resolve_dsn(dsn: str | None = None) -> str:
    """Return the DSN to use.

    Order: an explicit ``dsn``; ``PGGEOLEARN_DSN``; ``""`` when any libpq ``PG*`` variable is set
    (libpq reads them itself); otherwise the embedded cluster's DSN (it must be up).
    """
    if dsn:
        return dsn
    env = os.environ.get("PGGEOLEARN_DSN")
    if env:
        return env
    if any(os.environ.get(v) for v in LIBPQ_VARS):
        return ""
    from pggeolearn.db.cluster import Cluster

    return Cluster.default().dsn()


def _settings(kwargs: dict) -> dict:
    return {"application_name": "pggeolearn", "connect_timeout": CONNECT_TIMEOUT_S} | kwargs


def _where(target: str) -> str:
    return target or "the server named by the PG* environment variables"


def connect(dsn: str | None = None, *, autocommit: bool = False, **kwargs) -> psycopg.Connection:
    """Open a psycopg connection with pggeolearn's settings; errors become one clear line."""
    target = resolve_dsn(dsn)
    try:
        conn = psycopg.connect(target, autocommit=autocommit, **_settings(kwargs))
    except psycopg.OperationalError as exc:
        raise errors.DatabaseError(f"cannot connect to {_where(target)}: {first_line(exc)}") from exc
    try:
        pin_search_path(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def pool(dsn: str | None, size: int, *, autocommit: bool = True, reconnect_s: float = 60.0,
         configure: Callable[[psycopg.Connection], None] | None = None, **kwargs) -> ConnectionPool:
    """An open ``psycopg_pool.ConnectionPool`` of exactly ``size`` connections made like
    :func:`connect`'s (then ``configure``d), connected side by side and all open before it
    returns (else one clear line); the pool replaces a lost connection in the background, trying
    for ``reconnect_s`` seconds. Close it after use."""
    from psycopg_pool import ConnectionPool, PoolTimeout

    def setup(conn: psycopg.Connection) -> None:
        pin_search_path(conn)
        if configure is not None:
            configure(conn)

    target = resolve_dsn(dsn)
    settings = _settings(kwargs)
    handle = ConnectionPool(target, kwargs=settings | {"autocommit": autocommit}, min_size=size,
                            max_size=size, open=False, configure=setup, num_workers=size,
                            name=settings["application_name"], reconnect_timeout=reconnect_s)
    try:
        handle.open(wait=True, timeout=settings["connect_timeout"])
    except PoolTimeout as exc:
        handle.close()
        with connect(target, autocommit=autocommit, **kwargs) as conn:  # the pool only logs why
            with db_errors(f"setting up a connection of pool {settings['application_name']}"):
                setup(conn)  # ... it failed: this says it in one line
        raise errors.DatabaseError(f"cannot open {size} connections to {_where(target)} within "
                                   f"{settings['connect_timeout']} s (max_connections?)") from exc
    return handle


def pin_search_path(conn: psycopg.Connection) -> None:
    """An explicit search_path: (pg_catalog,) where PostGIS lives, then public; never ``"$user"``
    (CVE-2018-1058: a schema named after the user would shadow every unqualified call)."""
    try:
        conn.execute(PIN_SEARCH_PATH)
        if not conn.autocommit:
            conn.commit()  # a later rollback must not undo it
    except psycopg.Error as exc:
        raise errors.DatabaseError(f"cannot set search_path: {first_line(exc)}") from exc


# pg_catalog is searched first whenever it is not named (and naming it first would make it the
# schema CREATE EXTENSION/TABLE write into)
PIN_SEARCH_PATH = """SELECT pg_catalog.set_config('search_path', pg_catalog.concat_ws(', ',
    (SELECT pg_catalog.string_agg(DISTINCT pg_catalog.quote_ident(n.nspname), ', ')
     FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname IN ('postgis', 'postgis_raster') AND n.nspname <> 'public'),
    'public'), false)"""


def dsn_of(dsn_or_conn: psycopg.Connection | str | None) -> str | None:
    """A DSN that reaches the same database as a connection (password included), or the DSN
    given: for work that opens connections of its own (workers, readers, writers)."""
    if isinstance(dsn_or_conn, psycopg.Connection):
        password = dsn_or_conn.info.password
        dsn = dsn_or_conn.info.dsn
        return psycopg.conninfo.make_conninfo(dsn, password=password) if password else dsn
    return dsn_or_conn
