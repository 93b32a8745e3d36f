"""Run SQL written by users: one statement, in a READ ONLY transaction, under a deadline."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg

DEFAULT_TIMEOUT_S = 60.0


@contextlib.contextmanager
def read_only(conn: psycopg.Connection, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """A READ ONLY transaction with ``statement_timeout``; rolled back or committed on exit.

    Inside it PostgreSQL refuses every write (INSERT/UPDATE/DDL, also from volatile functions
    a query calls), except into temporary tables. Queries sent with bound parameters use the
    extended protocol, which refuses a string of several statements.
    """
    with conn.transaction():
        conn.execute("SET TRANSACTION READ ONLY")
        if timeout_s:
            conn.execute("SELECT set_config('statement_timeout', %s, true)",
                         [f"{int(timeout_s * 1000)}ms"])
        yield
