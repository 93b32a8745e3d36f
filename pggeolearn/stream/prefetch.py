"""Prefetch: one background thread produces an epoch's batches into a bounded queue.

Memory does not grow with the dataset (at most ``size`` batches wait in the queue); the
producer's exceptions are re-raised in the consumer; :meth:`Prefetch.close` (and
:class:`BatchIterator`'s ``close()``, garbage collection, KeyboardInterrupt in the consumer)
sets the stop event, cancels what the producer is waiting on and joins the thread.
Only the standard library is imported here (and :mod:`pggeolearn.errors`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from pggeolearn import errors

__all__ = ["BatchIterator", "Prefetch", "Stopped"]

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Stopped(Exception):
    """The consumer closed the iterator; the producer unwinds quietly."""


class Prefetch:
    """``produce(put)`` run once in a daemon thread named ``name``, started by the first
    :meth:`get`; ``put`` blocks while ``size`` items wait and raises :class:`Stopped` once
    ``stop`` is set. ``cancel`` (called from the consumer on close) interrupts whatever the
    producer waits on; ``cleanup`` runs in the thread when it ends."""

    def __init__(self, produce: Callable[[Callable[[Any], None]], None], *, size: int, name: str,
                 stop: threading.Event | None = None, cancel: Callable[[], None] | None = None,
                 cleanup: Callable[[], None] | None = None):
        self.queue: queue.Queue = queue.Queue(maxsize=size)
        self.stop = stop if stop is not None else threading.Event()
        self.name = name
        self._produce, self._cancel, self._cleanup = produce, cancel, cleanup
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- consumer side -------------------------------------------------------------------------
    def get(self) -> Any:
        """The next item (the end marker after the producer's last); re-raises its exception."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, daemon=True, name=self.name)
            self._thread.start()
        while True:
            try:
                item = self.queue.get(timeout=0.5)
            except queue.Empty:
                if not self._thread.is_alive() and self.queue.empty():
                    raise errors.DatabaseError("the stream's prefetch thread stopped unexpectedly") from None
                continue
            if isinstance(item, _Failure):
                raise item.exc
            return item

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        self.stop.set()
        if self._cancel is not None:
            self._cancel()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        while True:  # drop prefetched batches now
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break

    # -- producer side -------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._produce(self.put)
            self.put(_END)
        except Stopped:
            pass
        except BaseException as exc:  # re-raised in the consumer
            try:
                self.put(_Failure(exc))
            except Stopped:
                pass
        finally:
            if self._cleanup is not None:
                self._cleanup()

    def put(self, item: Any) -> None:
        while True:
            if self.stop.is_set():
                raise Stopped
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue


class BatchIterator:
    """The batches of one epoch of one shard; runs a prefetch thread; close() stops it."""

    def __init__(self, run: Prefetch, *, batches: int, epoch: int, application_name: str,
                 on_done: Callable[[int], None] | None = None):
        self._run = run
        self._epoch = epoch
        self._application_name = application_name
        self._on_done = on_done
        self._remaining = batches
        self._finished = False

    def __iter__(self) -> BatchIterator:
        return self

    def __len__(self) -> int:
        return self._remaining

    @property
    def application_name(self) -> str:
        return self._application_name

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        try:
            item = self._run.get()
        except BaseException:
            self._finished = True
            self._run.close()
            raise
        if item is _END:
            self._finished = True
            self._run.close()
            if self._on_done is not None:
                self._on_done(self._epoch)
            raise StopIteration
        self._remaining -= 1
        return item

    def close(self) -> None:
        """Stop prefetching and close the connections (idempotent)."""
        self._finished = True
        self._run.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: S110 - never raise from a finalizer
            pass
