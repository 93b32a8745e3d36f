"""The one connection handle (pggeolearn.db.connect): a pool of connections made like connect()'s,
its failures in one line, and a lost connection replaced."""

from __future__ import annotations

import psycopg
import pytest

from pggeolearn import errors
from pggeolearn.db.connect import connect, pool


def test_pool_connections_are_set_up_like_connect(db_dsn):
    seen = []
    handle = pool(db_dsn, 3, application_name="pgl pool test",
                  configure=lambda c: seen.append(c.execute("SELECT pg_backend_pid()").fetchone()[0]))
    try:
        conns = [handle.getconn() for _ in range(3)]
        assert len({c.info.backend_pid for c in conns}) == 3
        assert sorted(seen) == sorted(c.info.backend_pid for c in conns)
        with connect(db_dsn) as one:
            expected = one.execute("SHOW search_path").fetchone()[0]
        for c in conns:
            assert c.autocommit
            assert c.execute("SHOW search_path").fetchone()[0] == expected
            assert c.execute("SHOW application_name").fetchone()[0] == "pgl pool test"
            assert "$user" not in expected
    finally:
        handle.close()


def test_pool_replaces_a_lost_connection(db_dsn, admin_conn):
    handle = pool(db_dsn, 1, application_name="pgl pool lost")
    try:
        conn = handle.getconn()
        admin_conn.execute("SELECT pg_terminate_backend(%s)", [conn.info.backend_pid])
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        lost = conn.info.backend_pid
        conn.close()
        handle.putconn(conn)
        again = handle.getconn(timeout=10)
        assert again.execute("SELECT 1").fetchone()[0] == 1
        assert again.info.backend_pid != lost
    finally:
        handle.close()


def test_pool_to_a_wrong_server_is_one_line(tmp_path):
    dsn = f"host={tmp_path} port=1 dbname=nothing user=nobody"
    with pytest.raises(errors.DatabaseError, match="cannot connect to") as info:
        pool(dsn, 2, connect_timeout=1)
    assert "\n" not in str(info.value)


def test_pool_whose_setup_fails_names_the_failure(db_dsn):
    def setup(conn: psycopg.Connection) -> None:
        conn.execute("SELECT 1 / 0")

    with pytest.raises(errors.PggeolearnError, match="division by zero") as info:
        pool(db_dsn, 2, configure=setup, connect_timeout=1)
    assert "\n" not in str(info.value)
