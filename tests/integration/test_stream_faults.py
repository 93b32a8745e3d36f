"""GeoStream under faults: a backend killed mid-epoch, statement timeouts, bad chips, and
leaving nothing behind on the server after close / with / GC / KeyboardInterrupt."""

from __future__ import annotations

import gc
import signal
import threading
import time

import numpy as np
import psycopg
import pytest
import test_stream
from psycopg import sql
from test_stream import BIG_PX, delivered, tile_arrays

from pggeolearn import errors, wkb
from pggeolearn.stream import GeoStream

# the chip-store fixtures of test_stream (a template with datasets tiny and big, cloned per test)
chips_template_dsn = test_stream.chips_template_dsn
chips_dsn, conn = test_stream.chips_dsn, test_stream.conn
tiny, big = test_stream.tiny, test_stream.big


def backends(conn: psycopg.Connection, app: str) -> list[int]:
    return [r[0] for r in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s", [app])]


def wait_no_backend(conn: psycopg.Connection, app: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while backends(conn, app):
        assert time.monotonic() < deadline, f"backends of {app} still open: {backends(conn, app)}"
        time.sleep(0.05)


def wait_for_backend(conn: psycopg.Connection, app: str, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while not (pids := backends(conn, app)):
        assert time.monotonic() < deadline, f"no backend of {app}"
        time.sleep(0.02)
    return pids


# ------------------------------------------------------------------------- lost connections


@pytest.mark.parametrize("transport", ["copy", "cursor"])
def test_resume_after_backend_terminated_mid_epoch(big, conn, transport):
    dsn, ds = big
    s = GeoStream(dsn, ds.name, batch_size=4, seed=3, prefetch=1, transport=transport,
                  chunk_size=1000, fetch_bytes=64 << 10)
    expected = s.plan(0)
    it = iter(s)
    batches = [next(it)]  # the producer is now blocked on the full queue, mid-query
    pids = wait_for_backend(conn, s.application_name)
    time.sleep(0.2)
    assert conn.execute("SELECT bool_and(pg_terminate_backend(p)) FROM unnest(%s::int[]) p",
                        [pids]).fetchone()[0]
    batches += list(it)
    assert [b["tile_id"].tolist() for b in batches] == expected[0].tolist()  # order, no dup, no drop
    assert [b["pad"] for b in batches] == expected[1].tolist()
    assert s.reconnects == 1
    # it resumed in the middle of the single chunk, at the first chip not yet delivered
    assert 0 < s.resumed_at[0] < len(expected[0].reshape(-1))
    for b in batches:
        for i, t in enumerate(b["tile_id"]):
            image, label = tile_arrays(int(t), BIG_PX)
            assert np.array_equal(b["image"][i], image) and np.array_equal(b["label"][i], label)
    assert sorted(delivered(batches)) == list(range(37))
    wait_no_backend(conn, s.application_name)


def test_resume_between_chunks_parallel_and_live(tiny, conn):
    dsn, ds = tiny
    for make in (lambda: GeoStream(dsn, ds.name, batch_size=4, prefetch=1, chunk_size=4),
                 lambda: GeoStream(dsn, ds.name, batch_size=4, prefetch=1, connections=2,
                                   fetch_bytes=2000),
                 lambda: GeoStream.live(dsn, ds.name, batch_size=4, prefetch=1, connections=1)):
        s = make()
        expected = s.plan(0)[0].tolist()
        it = iter(s)
        got = [next(it)["tile_id"].tolist()]
        for pid in wait_for_backend(conn, s.application_name):
            conn.execute("SELECT pg_terminate_backend(%s)", [pid])
        got += [b["tile_id"].tolist() for b in it]
        assert got == expected
        assert s.reconnects >= 1


def test_reconnects_are_bounded(tiny, conn, pg_admin_dsn):
    """The server goes away for good: a few attempts, then one clear error."""
    dsn, ds = tiny
    dbname = conn.info.dbname
    admin = psycopg.connect(pg_admin_dsn, autocommit=True)
    s = GeoStream(dsn, ds.name, batch_size=4, prefetch=1, chunk_size=4, max_reconnects=2)
    it = iter(s)
    next(it)
    admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(dbname)))
    try:
        for pid in wait_for_backend(conn, s.application_name):
            conn.execute("SELECT pg_terminate_backend(%s)", [pid])
        started = time.monotonic()
        with pytest.raises(errors.ConnectionLost, match="cannot connect"):
            for _ in it:
                pass
        assert time.monotonic() - started < 10
    finally:
        admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(
            sql.Identifier(dbname)))
        admin.close()
    assert s.reconnects == 2


# ------------------------------------------------------------------------- timeouts


@pytest.mark.parametrize("transport", ["copy", "cursor"])
def test_statement_timeout_is_never_retried(tiny, conn, transport):
    dsn, ds = tiny
    s = GeoStream(dsn, ds.name, batch_size=8, timeout_s=1.0, transport=transport)
    with psycopg.connect(dsn) as locker:  # hold a lock the stream's query must wait for
        locker.execute("LOCK TABLE pggeolearn.chips IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(errors.QueryTimeout, match="statement timeout"):
            list(s)
        assert time.monotonic() - started < 5
        locker.rollback()
    assert s.reconnects == 0
    wait_no_backend(conn, s.application_name)


def test_live_mode_timeout_is_never_retried(tiny, conn):
    dsn, ds = tiny
    s = GeoStream.live(dsn, ds.name, batch_size=8, timeout_s=1.0)
    with psycopg.connect(dsn) as locker:
        locker.execute("LOCK TABLE public.img_tiny IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(errors.QueryTimeout):
            list(s)
        locker.rollback()
    assert s.reconnects == 0
    wait_no_backend(conn, s.application_name)


# ------------------------------------------------------------------------- bad chips


def test_null_chip_names_the_tile(tiny, conn):
    dsn, ds = tiny
    conn.execute("UPDATE pggeolearn.chips SET image = NULL WHERE tile_id = 30")
    s = GeoStream(dsn, ds.name, batch_size=8, shuffle=False, prefetch=1)
    it = iter(s)
    got = [next(it) for _ in range(3)]  # tiles 0..23 are fine
    with pytest.raises(errors.ChipError, match=r"chip 30 of dataset tiny has no image"):
        for b in it:
            got.append(b)
    assert len(got) == 3
    wait_no_backend(conn, s.application_name)


def test_wrong_size_chip_names_the_tile(tiny, conn):
    dsn, ds = tiny
    small = wkb.encode(wkb.from_array(np.zeros((3, 8, 8), np.uint8),
                                      geotransform=(0, 2, 0, 16, 0, -2), srid=3857))
    conn.execute("UPDATE pggeolearn.chips SET image = ST_RastFromWKB(%b) WHERE tile_id = 5", [small])
    with pytest.raises(errors.ChipError, match=r"chip 5 of dataset tiny: image is 3 band\(s\) "
                                               r"of 8BUI/8BUI/8BUI 8x8, expected 3 band"):
        list(GeoStream(dsn, ds.name, batch_size=8))
    one_band = wkb.encode(wkb.from_array(np.zeros((1, 16, 16), np.uint16),
                                         geotransform=(0, 1, 0, 16, 0, -1), srid=3857))
    conn.execute("UPDATE pggeolearn.chips SET label = ST_RastFromWKB(%b) WHERE tile_id = 1",
                 [one_band])
    with pytest.raises(errors.ChipError, match=r"chip 1 of dataset tiny: label is 1 band\(s\) of 16BUI"):
        list(GeoStream(dsn, ds.name, batch_size=8, split="train", shuffle=False, max_batches=1))


def test_chip_deleted_after_the_ids_were_read(tiny, conn):
    dsn, ds = tiny
    s = GeoStream(dsn, ds.name, batch_size=8)
    conn.execute("DELETE FROM pggeolearn.chips WHERE tile_id = 12")
    with pytest.raises(errors.ChipError, match="chip 12 .*missing"):
        list(s)


# ------------------------------------------------------------------------- cleanup


def test_close_leaves_no_backend(tiny, conn):
    dsn, ds = tiny
    s = GeoStream(dsn, ds.name, batch_size=2, prefetch=1)
    it = iter(s)
    next(it)
    wait_for_backend(conn, s.application_name)
    s.close()
    wait_no_backend(conn, s.application_name)
    with pytest.raises(StopIteration):
        next(it)


def test_context_manager_and_break_leave_no_backend(tiny, conn):
    dsn, ds = tiny
    with GeoStream(dsn, ds.name, batch_size=2, prefetch=1) as s:
        for _ in s:
            wait_for_backend(conn, s.application_name)
            break
    wait_no_backend(conn, s.application_name)


def test_garbage_collection_leaves_no_backend(tiny, conn):
    dsn, ds = tiny
    s = GeoStream(dsn, ds.name, batch_size=2, prefetch=1)
    app = s.application_name
    it = iter(s)
    next(it)
    wait_for_backend(conn, app)
    del it, s
    gc.collect()
    wait_no_backend(conn, app)
    # a stream used inline (no variable) still works: the iterator does not need it alive
    assert len(delivered(list(GeoStream(dsn, ds.name, batch_size=8)))) == 37


def test_exception_in_the_loop_body_leaves_no_backend(tiny, conn):
    dsn, ds = tiny
    with pytest.raises(KeyboardInterrupt):
        with GeoStream(dsn, ds.name, batch_size=2, prefetch=1) as s:
            for _ in s:
                wait_for_backend(conn, s.application_name)
                raise KeyboardInterrupt
    wait_no_backend(conn, s.application_name)


def test_sigint_while_waiting_for_a_blocked_query(tiny, conn):
    """Ctrl-C while the consumer waits on a query stuck behind a lock: the query is cancelled
    and the connection closed."""
    dsn, ds = tiny
    s = GeoStream(dsn, ds.name, batch_size=8)
    main = threading.get_ident()
    with psycopg.connect(dsn) as locker:
        locker.execute("LOCK TABLE pggeolearn.chips IN ACCESS EXCLUSIVE MODE")

        def interrupt():
            wait_for_backend(conn, s.application_name)
            time.sleep(0.3)
            signal.pthread_kill(main, signal.SIGINT)

        t = threading.Thread(target=interrupt)
        t.start()
        with pytest.raises(KeyboardInterrupt):
            for _ in s:
                pass
        t.join()
        wait_no_backend(conn, s.application_name)  # while the lock is still held
        locker.rollback()


def test_producer_failure_does_not_hang_with_a_full_queue(tiny, conn):
    dsn, ds = tiny
    conn.execute("UPDATE pggeolearn.chips SET label = NULL WHERE tile_id = 36")
    s = GeoStream(dsn, ds.name, batch_size=1, prefetch=1, shuffle=False)
    it = iter(s)
    next(it)
    time.sleep(0.3)  # the producer fills the queue and blocks; the failure comes after
    started = time.monotonic()
    with pytest.raises(errors.ChipError, match="chip 36"):
        for _ in it:
            pass
    assert time.monotonic() - started < 10
