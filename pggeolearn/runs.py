"""Runs end: start, heartbeat, finish, fail. The only writer of ``pggeolearn.runs``.

A run (``predict``, ``evaluate``, ``train``) is a row that says ``running`` until its process
says ``done`` or ``failed``. A process can die without saying either (kill -9, a crash, the
server restarting under it), so liveness is not a flag in the row but a lock:

* :meth:`Run.start` inserts the row and takes the session advisory lock ``(LOCK_CLASS, run_id)``
  on the run's own connection, in one transaction: nobody ever sees the row without the lock.
* :func:`reap`, called by every command that starts a run (and by :func:`list_runs`), marks
  ``failed`` each ``running`` row whose lock is free: its session is gone.
* A training run reserves its model name (a partial unique index on the running training
  runs): a second ``train --model X`` is refused at once, not after training, and a dead one's
  reservation ends when it is reaped.
* The run's connection reconnects after a lost connection (backoff over
  :mod:`pggeolearn.retry`'s window), takes its lock again and marks itself running again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors as pge
from psycopg.types.json import Jsonb

from pggeolearn import errors, retry
from pggeolearn.db.errors import db_errors, first_line, translate
from pggeolearn.resources import sql_text

__all__ = ["LOCK_CLASS", "Run", "RunInfo", "drop_checkpoints", "finish", "list_runs", "reap"]

LOCK_CLASS = 0x70676C72  # 'pglr': the first key of the runs' advisory locks
FAIL_WINDOW_S = 10.0  # how long fail() tries to reach the server to record a failure


def _key(run_id: int) -> tuple[int, int]:
    return LOCK_CLASS, run_id % 2147483648


def reap(conn: psycopg.Connection, by: str = "pggeolearn") -> list[int]:
    """Mark failed the running runs whose process is gone; return their ids."""
    with db_errors("checking for runs whose process died"):
        rows = conn.execute(sql_text("runs_reap"), {"by": by, "lock_class": LOCK_CLASS}).fetchall()
    return [r[0] for r in rows]


def finish(conn: psycopg.Connection, run_id: int, outputs: dict[str, Any]) -> None:
    """Mark ``run_id`` done with its outputs, on ``conn`` (e.g. inside the transaction that
    commits the outputs themselves, so the row and the tables appear together)."""
    with db_errors(f"closing run {run_id}"):
        conn.execute("UPDATE pggeolearn.runs SET status = 'done', outputs = %s, error = NULL,"
                     " finished_at = now(), heartbeat_at = now() WHERE run_id = %s",
                     [Jsonb(outputs), run_id])


def drop_checkpoints(conn: psycopg.Connection, model: str) -> None:
    """Forget the resumable checkpoints of ``model``'s training runs (the runs stay, as history)."""
    conn.execute("UPDATE pggeolearn.runs SET checkpoint = NULL WHERE kind = 'train' AND model = %s"
                 " AND checkpoint IS NOT NULL", [model])


@dataclass
class RunInfo:
    run_id: int
    kind: str
    model: str | None
    dataset: str | None
    status: str
    error: str | None
    started_at: Any
    finished_at: Any
    heartbeat_at: Any
    dataset_version: int | None = None  # of the dataset it read, else of the model's dataset
    recipe_hash: str | None = None

    def __str__(self) -> str:
        when = self.started_at.strftime("%Y-%m-%d %H:%M:%S") if self.started_at else "?"
        what = " ".join(x for x in (self.kind, self.model or "", f"on {self.dataset}" if self.dataset else "") if x)
        line = f"run {self.run_id}: {what}, started {when}, {self.status}"
        return line + (f": {self.error}" if self.error else "")


def list_runs(conn: psycopg.Connection, *, model: str | None = None, limit: int = 20) -> list[RunInfo]:
    """The latest runs (newest first), after marking the dead ones failed."""
    reap(conn, "pggeolearn runs")
    with db_errors("listing runs"):
        rows = conn.execute(
            "SELECT run_id, kind, model, dataset, status, error, started_at, finished_at, heartbeat_at,"
            " dataset_version, recipe_hash FROM pggeolearn.runs WHERE %(model)s::text IS NULL OR model = %(model)s"
            " ORDER BY run_id DESC LIMIT %(limit)s", {"model": model, "limit": limit}).fetchall()
    return [RunInfo(*r) for r in rows]


class Run:
    """A run this process owns: it holds the run's lock on its own connection until
    :meth:`close`. Use :meth:`start`; ``with Run.start(...) as run:`` fails the run on an
    exception (a ``psycopg.Error`` leaves translated into :mod:`pggeolearn.errors`) and always
    closes it."""

    def __init__(self, dsn: str | None, run_id: int, kind: str, model: str | None,
                 conn: psycopg.Connection, window_s: float | None):
        self.dsn, self.run_id, self.kind, self.model = dsn, run_id, kind, model
        self._conn: psycopg.Connection | None = conn
        self.window_s = window_s
        self.ended = False

    # -- start -------------------------------------------------------------------------------
    @classmethod
    def start(cls, dsn: str | None, kind: str, *, model: str | None = None, dataset: str | None = None,
              params: dict[str, Any] | None = None,
              extent: Sequence[float] | None = None, srid: int | None = None,
              window_s: float | None = None) -> Run:
        """Record a new running run (after reaping the dead ones). ``extent``: (minx, miny, maxx,
        maxy) in ``srid``. A ``train`` run of a model that another live process is training is
        an :class:`~pggeolearn.errors.AlreadyExists`."""
        conn = retry.connect(dsn, autocommit=True, application_name=f"pggeolearn {kind} run"[:63])
        try:
            reap(conn, f"pggeolearn {kind}")
            minx, miny, maxx, maxy = extent if extent is not None else (None,) * 4
            args = {"kind": kind, "model": model, "dataset": dataset, "params": Jsonb(params or {}),
                    "minx": minx, "miny": miny, "maxx": maxx, "maxy": maxy,
                    "srid": srid if extent is not None else None}
            try:
                with conn.transaction():
                    run_id = conn.execute(sql_text("runs_start"), args).fetchone()[0]
                    conn.execute("SELECT pg_advisory_lock(%s::integer, %s::integer)", _key(run_id))
            except pge.UniqueViolation:
                raise _busy(conn, model) from None
            except psycopg.Error as exc:
                raise translate(exc, f"recording the {kind} run") from exc
        except BaseException:
            conn.close()
            raise
        return cls(dsn, run_id, kind, model, conn, window_s)

    # -- while it runs -----------------------------------------------------------------------
    def connection(self) -> psycopg.Connection:
        """The run's live connection (reconnected, lock retaken, when it was lost)."""
        return self._write(lambda c: c)

    def heartbeat(self, outputs: dict[str, Any] | None = None, checkpoint: bytes | None = None) -> None:
        """The process is alive; store the progress so far. A ``checkpoint`` replaces those of the
        model's earlier runs (one resumable state per model)."""
        def write(c: psycopg.Connection) -> None:
            with c.transaction():
                found = c.execute(sql_text("runs_heartbeat"), {
                    "run_id": self.run_id, "outputs": Jsonb(outputs) if outputs is not None else None,
                    "checkpoint": checkpoint}).fetchone()
                if found is None:
                    raise errors.NotFound(f"run {self.run_id} was deleted while it ran")
                if checkpoint is not None and self.model is not None:
                    c.execute("UPDATE pggeolearn.runs SET checkpoint = NULL WHERE kind = %s AND model = %s"
                              " AND run_id <> %s AND checkpoint IS NOT NULL",
                              [self.kind, self.model, self.run_id])

        self._write(write, f"saving the progress of run {self.run_id}")

    # -- end ---------------------------------------------------------------------------------
    def finish(self, outputs: dict[str, Any]) -> None:
        self._write(lambda c: finish(c, self.run_id, outputs), f"closing run {self.run_id}")
        self.ended = True

    def fail(self, error: str, outputs: dict[str, Any] | None = None) -> bool:
        """Mark the run failed with the first line of ``error``; True when recorded. When the
        server stays unreachable, the run is marked failed by the next command that looks."""
        line = (error or "failed").strip().splitlines()[0] if (error or "").strip() else "failed"

        def write(c: psycopg.Connection) -> None:
            c.execute("UPDATE pggeolearn.runs SET status = 'failed', error = %s, finished_at = now(),"
                      " outputs = coalesce(%s, outputs) WHERE run_id = %s",
                      [line, Jsonb(outputs) if outputs is not None else None, self.run_id])

        try:
            self._write(write, f"recording the failure of run {self.run_id}",
                        window_s=min(FAIL_WINDOW_S, retry.Window(self.window_s).window_s))
        except errors.PggeolearnError:
            return False
        finally:
            self.ended = True
        return True

    def close(self) -> None:
        """Release the run (its lock goes with the connection)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: S110 - best effort, the session ends anyway
                pass

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc is not None and not self.ended:
                # the database gone: the next command that looks marks the run failed
                self.fail("interrupted" if isinstance(exc, KeyboardInterrupt) else (str(exc) or exc_type.__name__))
        finally:
            self.close()
        if isinstance(exc, psycopg.Error):  # a driver error leaves as one line of the error tree
            raise translate(exc, f"{self.kind} run {self.run_id}") from exc

    # -- the connection ----------------------------------------------------------------------
    def _write(self, fn, context: str = "", *, window_s: float | None = None):
        window = retry.Window(self.window_s if window_s is None else window_s)
        while True:
            try:
                conn = self._conn
                if conn is None or conn.closed or conn.broken:
                    self._drop()
                    conn = self._reconnect()
                return fn(conn)
            except (psycopg.Error, errors.DatabaseError) as exc:
                err = translate(exc, context) if isinstance(exc, psycopg.Error) else exc
                lost = isinstance(err, errors.ConnectionLost) or (
                    isinstance(err, errors.DatabaseError) and self._conn is None)
                if not lost:
                    if err is exc:
                        raise
                    raise err from exc
                self._drop()
                delay = window.next_delay()
                if delay is None:
                    raise errors.ConnectionLost(f"{context or f'run {self.run_id}'}: lost the database and "
                                                f"could not reconnect ({window.describe()}): {first_line(exc)}"
                                                ) from exc
                time.sleep(delay)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: S110
                pass

    def _reconnect(self) -> psycopg.Connection:
        conn = retry.connect(self.dsn, window_s=0, autocommit=True,
                             application_name=f"pggeolearn {self.kind} run"[:63])
        try:
            conn.execute("SELECT pg_advisory_lock(%s::integer, %s::integer)", _key(self.run_id))
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn


def _busy(conn: psycopg.Connection, model: str | None) -> errors.AlreadyExists:
    row = conn.execute("SELECT run_id, started_at FROM pggeolearn.runs WHERE kind = 'train' AND model = %s"
                       " AND status = 'running'", [model]).fetchone()
    who = f"run {row[0]}, started {row[1]:%Y-%m-%d %H:%M:%S %Z}" if row else "another run"
    return errors.AlreadyExists(f"model {model} is being trained right now ({who}): wait for it to "
                                "end, or train under another --model name")
