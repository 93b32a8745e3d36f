"""How the bytes arrive: connections, binary COPY / cursor parsing, replicas, reconnects.

* **Binary transport only.** ``COPY (SELECT tile_id, ST_AsBinary(image), ST_AsBinary(label)
  ...) TO STDOUT (FORMAT BINARY)`` (default) whose rows psycopg parses itself
  (``Copy.set_types`` + ``Copy.rows``: as fast as our own parser was, see bench_stream), or a
  binary server-side cursor fetched by bytes. Chips are fetched in the epoch's order by joining
  ``unnest(ids) WITH ORDINALITY`` (``sql/stream_chips.sql``); live tiles are computed by
  ``pggeolearn.image_tile()/label_tile()`` over READ ONLY connections (``sql/stream_live.sql``).
* **Replicas.** With several DSNs (a primary and its read replicas) each shard reads from
  ``dsn[shard % len(dsn)]`` (:func:`read_dsn`).
* **Parallel connections.** ``connections > 1`` (and live mode) fetches groups of chips
  concurrently, each thread holding one connection of a ``psycopg_pool`` pool
  (:func:`pggeolearn.db.connect.pool`) for the epoch, and still delivers them in order.
* **Faults.** A lost connection (``pg_terminate_backend``, server restart) is resumed from the
  next undelivered chip of the epoch order: no duplicate, no drop, retried with backoff over
  a :class:`pggeolearn.retry.Window`. ``statement_timeout`` (QueryCanceled) is never retried:
  :class:`~pggeolearn.errors.QueryTimeout`.

:class:`Transport` says how a stream reads; :class:`Reader` reads one epoch's chips in order
and hands each row to a sink. Only numpy and psycopg are imported here.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from pggeolearn import errors, retry
from pggeolearn.db.connect import CONNECT_TIMEOUT_S, connect, pool
from pggeolearn.db.errors import db_errors, translate
from pggeolearn.db.usersql import DEFAULT_TIMEOUT_S
from pggeolearn.db.usersql import sandbox as read_only
from pggeolearn.resources import sql_text
from pggeolearn.stream.prefetch import Stopped

__all__ = [
    "SOURCES",
    "TRANSPORTS",
    "Reader",
    "Transport",
    "probe_chips",
    "probe_live",
    "read_dsn",
]

log = logging.getLogger(__name__)

TRANSPORTS = ("copy", "cursor")
SOURCES = ("chips", "live")

def read_dsn(dsn: str | Sequence[str] | None, shard: int) -> str | None:
    """The server a reader streams from: ``dsn`` itself, or with several (a primary and its
    read replicas, all holding the same chips) the one at ``shard % len(dsn)``, so readers
    spread evenly over them."""
    if dsn is None or isinstance(dsn, str):
        return dsn
    dsns = list(dsn)
    if not dsns:
        raise errors.ConfigError("give at least one DSN")
    return dsns[shard % len(dsns)]


@dataclass(frozen=True)
class Transport:
    """How a stream reads: from ``dsn`` as ``application_name``, the ``source`` (``'chips'``:
    the chip store, ``'live'``: computed tiles) over ``kind`` (``'copy'`` or ``'cursor'``),
    ``chunk_size`` ids per statement, ``fetch_bytes`` per cursor fetch, ``connections`` in
    parallel, ``timeout_s`` as statement_timeout, reconnecting over ``reconnect_window_s``
    seconds (at most ``max_reconnects`` attempts when given)."""

    dsn: str | None
    application_name: str
    kind: str = "copy"
    source: str = "chips"
    connections: int = 1
    chunk_size: int = 1024
    fetch_bytes: int = 8 << 20
    timeout_s: float | None = None
    max_reconnects: int | None = None
    reconnect_window_s: float = retry.DEFAULT_WINDOW_S

    def connect_kwargs(self) -> dict[str, Any]:
        """Connection parameters: application_name and the statement_timeout."""
        kwargs: dict[str, Any] = {"application_name": self.application_name}
        if self.timeout_s:
            kwargs["options"] = f"-c statement_timeout={int(self.timeout_s * 1000)}"
        return kwargs

    def rows_per_fetch(self, row_bytes: int) -> int:
        return max(1, self.fetch_bytes // row_bytes)


# ----------------------------------------------------------------------------------------------
# what the chips look like (once per stream)


def probe_chips(conn: psycopg.Connection, ds: Any, splits: list[str], split: str) -> tuple:
    """``(tile_id, bands, pixel type, width, height)`` of one chip of ``splits`` with an image."""
    with db_errors("probing chips"):
        probe = conn.execute(sql_text("stream_probe"), {"dataset": ds.name, "splits": splits}).fetchone()
    if probe is None:
        raise errors.ChipError(f"dataset {ds.name}: every chip in split {split} has a NULL image")
    return probe


def probe_live(conn: psycopg.Connection, ds: Any, timeout_s: float | None) -> tuple:
    """``(tile_id, bands, pixel type, width, height)`` of one computed tile with imagery (the
    centre, then the corners)."""
    centre = (ds.nrows // 2) * ds.ncols + ds.ncols // 2
    candidates = list(dict.fromkeys([centre, 0, ds.n_tiles - 1]))
    for tile in candidates:
        try:
            with read_only(conn, timeout_s or DEFAULT_TIMEOUT_S):
                row = conn.execute(
                    "SELECT ST_NumBands(r), ST_BandPixelType(r, 1), ST_Width(r), ST_Height(r)"
                    " FROM (SELECT pggeolearn.image_tile(%s, %s) AS r) t WHERE r IS NOT NULL",
                    [ds.name, tile]).fetchone()
        except psycopg.Error as exc:
            raise translate(exc, f"live tile {tile} of {ds.name}") from exc
        if row is not None:
            return (tile, *row)
    raise errors.RecipeError(
        f"dataset {ds.name}: tiles {', '.join(map(str, candidates))} have no imagery; "
        "cannot tell the band count")


# ----------------------------------------------------------------------------------------------
# binary COPY


_COPY_TYPES = ["int4", "bytea", "bytea"]  # tile_id, ST_AsBinary(image), ST_AsBinary(label)


def _copy_statement() -> sql.Composed:
    return sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(sql.SQL(sql_text("stream_chips")))


# ----------------------------------------------------------------------------------------------
# one epoch's chips, in order


class Reader:
    """The rows of ``seq`` (tile ids in delivery order) of ``dataset``, read as ``wire`` says,
    handed to ``sink(position, tile_id, image, label)`` in exactly that order by :meth:`run`.

    Runs in the producer thread; :meth:`cancel` (from another thread) cancels its queries,
    :meth:`close` closes its connections. ``stop`` set: it unwinds with
    :class:`~pggeolearn.stream.prefetch.Stopped`. ``stats["reconnects"]`` and
    ``stats["resumed_at"]`` count the resumed connection losses."""

    def __init__(self, wire: Transport, dataset: str, seq: np.ndarray, *, batch_size: int,
                 rows_per_fetch: int, stop: threading.Event, stats: dict[str, Any]):
        self.wire, self.dataset, self.seq = wire, dataset, seq
        self.batch_size, self.rows_per_fetch = batch_size, rows_per_fetch
        self.stop, self.stats = stop, stats
        self.pos = 0  # next position of seq to deliver
        self._sink: Callable[[int, int, Any, Any], None] | None = None
        self._lock = threading.Lock()
        self._conns: list[psycopg.Connection] = []
        self._connected = False
        self._pool: Any = None  # psycopg_pool.ConnectionPool of the parallel path

    def run(self, sink: Callable[[int, int, Any, Any], None]) -> None:
        """Deliver every row of ``seq`` to ``sink``, resuming after lost connections."""
        self._sink = sink
        if self.wire.source == "chips" and self.wire.connections == 1:
            self._produce_chips()
        else:
            self._produce_parallel()

    def _deliver(self, tile_id: int, image: Any, label: Any) -> None:
        expected = int(self.seq[self.pos])
        if tile_id != expected:
            raise errors.DatabaseError(f"chip stream out of order: got tile {tile_id}, expected {expected}")
        self._sink(self.pos, tile_id, image, label)
        self.pos += 1
        if self.stop.is_set():
            raise Stopped

    # -- connections -----------------------------------------------------------------------------
    def cancel(self) -> None:
        """Cancel the running queries (from the consumer's thread)."""
        # under the lock: a connection must not be closed (freed) while it is being cancelled
        with self._lock:
            for c in self._conns:
                if c.closed:
                    continue
                try:
                    c.cancel_safe(timeout=2.0)
                except Exception:  # noqa: S110 - best effort: the producer closes it anyway
                    pass

    def close(self) -> None:
        """Close every connection and the pool (the producer thread ends)."""
        with self._lock:
            for c in self._conns:
                try:
                    c.close()
                except Exception:  # noqa: S110
                    pass
            self._conns = []
            handle, self._pool = self._pool, None
        if handle is not None:
            handle.close()

    def _connect(self) -> psycopg.Connection:
        try:
            conn = connect(self.wire.dsn, autocommit=True, **self.wire.connect_kwargs())
        except errors.DatabaseError as exc:
            if not self._connected:
                raise
            # reconnecting after a lost connection: the server may be restarting, try again
            raise errors.ConnectionLost(str(exc)) from exc
        self._connected = True
        with self._lock:
            self._conns.append(conn)
        if self.stop.is_set():
            raise Stopped
        return conn

    def _checkout(self) -> psycopg.Connection:
        """A connection of the pool, held by this thread until it is lost or the epoch ends."""
        from psycopg_pool import PoolTimeout

        try:
            conn = self._pool.getconn(timeout=CONNECT_TIMEOUT_S)
        except PoolTimeout as exc:  # the pool is reconnecting: the server may be restarting
            raise errors.ConnectionLost(f"no connection to {self.wire.dsn or 'the server'}: {exc}") from exc
        with self._lock:
            self._conns.append(conn)
        if self.stop.is_set():
            raise Stopped
        return conn

    def _discard(self, conn: psycopg.Connection | None) -> None:
        if conn is None:
            return
        with self._lock:
            if conn in self._conns:
                self._conns.remove(conn)
            try:
                conn.close()
            except Exception:  # noqa: S110
                pass
            if self._pool is not None:  # closed: the pool opens a replacement
                self._pool.putconn(conn)

    def _retry_or_raise(self, exc: BaseException, window: retry.Window, at: int | None = None) -> None:
        """Called in an except block: return to resume, or raise the error to report."""
        if self.stop.is_set():
            raise Stopped from None
        err = translate(exc, f"streaming dataset {self.dataset}") \
            if isinstance(exc, psycopg.Error) else exc
        if not isinstance(err, errors.ConnectionLost):
            if err is exc:
                raise exc
            raise err from exc
        delay = window.next_delay()
        if delay is None:
            raise errors.ConnectionLost(
                f"lost the database while streaming dataset {self.dataset} and could not resume "
                f"({window.describe()}): {str(err).splitlines()[0]}") from exc
        at = self.pos if at is None else at
        log.warning("%s; resuming at position %d of the epoch (attempt %d, %s)",
                    err, at, window.attempts, window.describe())
        self.stats["reconnects"] += 1
        self.stats["resumed_at"].append(at)
        if self.stop.wait(delay):
            raise Stopped from None

    def _window(self) -> retry.Window:
        return retry.Window(self.wire.reconnect_window_s, self.wire.max_reconnects)

    # -- one connection ----------------------------------------------------------------------------
    def _produce_chips(self) -> None:
        total = len(self.seq)
        window, conn = self._window(), None
        while self.pos < total:
            start = self.pos
            try:
                if conn is None:
                    conn = self._connect()
                while self.pos < total:
                    ids = self.seq[self.pos:self.pos + self.wire.chunk_size]
                    if self.wire.kind == "copy":
                        self._fetch_copy(conn, ids)
                    else:
                        self._fetch_cursor(conn, ids)
            except (psycopg.Error, errors.DatabaseError) as exc:
                self._discard(conn)
                conn = None
                if self.pos > start:
                    window.reset()
                self._retry_or_raise(exc, window)
        self._discard(conn)

    def _fetch_copy(self, conn: psycopg.Connection, ids: np.ndarray) -> None:
        end = self.pos + len(ids)
        params = {"ids": ids.tolist(), "dataset": self.dataset}
        with conn.cursor() as cur, cur.copy(_copy_statement(), params) as cp:
            cp.set_types(_COPY_TYPES)
            for tile_id, image, label in cp.rows():
                self._deliver(tile_id, image, label)
        if self.pos != end:
            raise errors.DatabaseError(
                f"chip COPY ended early: {self.pos - (end - len(ids))} of {len(ids)} rows")

    def _fetch_cursor(self, conn: psycopg.Connection, ids: np.ndarray) -> None:
        end = self.pos + len(ids)
        params = {"ids": ids.tolist(), "dataset": self.dataset}
        with conn.transaction():
            with conn.cursor(name="pggeolearn_stream", binary=True) as cur:
                cur.execute(sql_text("stream_chips"), params)
                while rows := cur.fetchmany(self.rows_per_fetch):
                    for tile_id, image, label in rows:
                        self._deliver(tile_id, image, label)
        if self.pos != end:
            raise errors.DatabaseError(
                f"chip cursor ended early: {self.pos - (end - len(ids))} of {len(ids)} rows")

    # -- several connections in parallel (live mode, or chips with connections > 1) ------------
    def _produce_parallel(self) -> None:
        """Groups of ids are fetched by ``connections`` threads, each on its own connection, and
        placed in order; a group is retried as a whole on a lost connection (it was not placed
        yet), so the order stays exact. At most 2 groups per connection are in flight."""
        wire = self.wire
        total = len(self.seq)
        if wire.source == "live":  # tiles are computed: small groups keep every connection busy
            group = max(1, math.ceil(self.batch_size / wire.connections))
        else:
            group = max(1, min(wire.chunk_size, self.rows_per_fetch))
        starts = iter(range(0, total, group))
        local = threading.local()
        self._pool = pool(wire.dsn, wire.connections, reconnect_s=max(1.0, wire.reconnect_window_s),
                          **wire.connect_kwargs())
        self._connected = True
        pending: collections.deque[Future] = collections.deque()
        name = f"{wire.application_name}-fetch"
        with ThreadPoolExecutor(wire.connections, thread_name_prefix=name) as executor:
            try:
                def submit() -> None:
                    s = next(starts, None)
                    if s is not None:
                        pending.append(executor.submit(self._fetch_group, local, s, self.seq[s:s + group]))

                for _ in range(2 * wire.connections):
                    submit()
                while pending:
                    rows = self._wait(pending.popleft())
                    submit()
                    for tile_id, image, label in rows:
                        self._deliver(tile_id, image, label)
            finally:
                for fut in pending:
                    fut.cancel()
                if self.stop.is_set() or pending:
                    self.cancel()

    def _wait(self, fut: Future) -> list:
        # not fut.result(timeout=...): its TimeoutError would catch our QueryTimeout too
        while not futures_wait([fut], timeout=0.2).done:
            if self.stop.is_set():
                raise Stopped
        return fut.result()

    def _fetch_group(self, local: threading.local, start: int, ids: np.ndarray) -> list:
        """Rows ``(tile_id, image, label)`` of ``ids`` on this thread's connection."""
        wire = self.wire
        params = {"ids": ids.tolist(), "dataset": self.dataset}
        window = self._window()
        while True:
            if self.stop.is_set():
                raise Stopped
            conn = getattr(local, "conn", None)
            try:
                if conn is None:
                    conn = local.conn = self._checkout()
                if wire.source == "live":
                    with read_only(conn, wire.timeout_s or DEFAULT_TIMEOUT_S), \
                            conn.cursor(binary=True) as cur:
                        return cur.execute(sql_text("stream_live"), params).fetchall()
                if wire.kind == "cursor":
                    with conn.cursor(binary=True) as cur:
                        return cur.execute(sql_text("stream_chips"), params).fetchall()
                rows = []
                with conn.cursor() as cur, cur.copy(_copy_statement(), params) as cp:
                    cp.set_types(_COPY_TYPES)
                    for row in cp.rows():
                        rows.append(row)
                        if self.stop.is_set():
                            raise Stopped
                if len(rows) != len(ids):
                    raise errors.DatabaseError(f"chip COPY ended early: {len(rows)} of {len(ids)} rows")
                return rows
            except (psycopg.Error, errors.DatabaseError) as exc:
                self._discard(conn)
                local.conn = None
                self._retry_or_raise(exc, window, start)
