"""Where to connect: --dsn, PGGEOLEARN_DSN, libpq PG* variables, else the embedded cluster."""

from __future__ import annotations

import os

import psycopg

from pggeolearn import errors
from pggeolearn.db.errors import first_line

# libpq variables that mean "the user configured a server" (see libpq-envars).
LIBPQ_VARS = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")


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


def connect(dsn: str | None = None, *, autocommit: bool = False, **kwargs) -> psycopg.Connection:
    """Open a psycopg connection with pggeolearn's settings; errors become one clear line."""
    target = resolve_dsn(dsn)
    kwargs.setdefault("application_name", "pggeolearn")
    kwargs.setdefault("connect_timeout", 10)
    try:
        return psycopg.connect(target, autocommit=autocommit, **kwargs)
    except psycopg.OperationalError as exc:
        where = target or "the server named by the PG* environment variables"
        raise errors.DatabaseError(f"cannot connect to {where}: {first_line(exc)}") from exc
