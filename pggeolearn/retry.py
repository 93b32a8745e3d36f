"""How long to keep trying after a lost database connection: :class:`Window`.

A database restart takes seconds to a minute; a few quick retries all fall inside it. A
:class:`Window` spaces attempts with exponential backoff (0.1 s doubling, at most 5 s apart)
until ``window_s`` seconds have passed since the connection was first lost, then gives up.
The default window is 60 s; ``PGGEOLEARN_RECONNECT_S`` changes it for every command.

:func:`connect` opens a connection the same way: to a server this process has reached before,
a refused connection is a server restarting (retried over the window); to one it never reached,
it is a wrong DSN or a stopped server (one line at once).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import psycopg

from pggeolearn import errors

__all__ = ["DEFAULT_WINDOW_S", "ENV", "Window", "connect", "default_window"]

log = logging.getLogger(__name__)
_reached: set[str] = set()  # DSNs this process has connected to: failing later means "lost"

DEFAULT_WINDOW_S = 60.0
ENV = "PGGEOLEARN_RECONNECT_S"
FIRST_DELAY_S = 0.1
MAX_DELAY_S = 5.0


def default_window() -> float:
    """``PGGEOLEARN_RECONNECT_S`` when set, else 60 seconds."""
    text = os.environ.get(ENV)
    if not text:
        return DEFAULT_WINDOW_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise errors.ConfigError(f"{ENV} must be a number of seconds >= 0, not {text!r}")
    return value


class Window:
    """The retries of one streak of lost connections (see the module docstring).

    ``max_attempts`` also bounds the number of attempts (None: only the window does)."""

    def __init__(self, window_s: float | None = None, max_attempts: int | None = None):
        self.window_s = default_window() if window_s is None else float(window_s)
        if not self.window_s >= 0:
            raise errors.ConfigError(f"reconnect window must be >= 0 seconds, not {window_s!r}")
        self.max_attempts = max_attempts
        self.attempts = 0
        self.since: float | None = None

    def next_delay(self) -> float | None:
        """Seconds to wait before the next attempt, or None: give up now."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
        if self.max_attempts is not None and self.attempts >= self.max_attempts:
            return None
        left = self.since + self.window_s - now
        if left <= 0:
            return None
        delay = min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** self.attempts, left)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """The connection works again: the next loss starts a new streak."""
        self.attempts, self.since = 0, None

    def describe(self) -> str:
        waited = time.monotonic() - self.since if self.since is not None else 0.0
        return f"{self.attempts} attempts in {waited:.0f} s (window {self.window_s:g} s, {ENV})"


def connect(dsn: str | None, *, window_s: float | None = None, max_attempts: int | None = None,
            **kwargs: Any) -> psycopg.Connection:
    """:func:`pggeolearn.db.connect.connect`, retried over a :class:`Window` when this process
    reached the server before (see the module docstring)."""
    from pggeolearn.db.connect import connect as db_connect

    key = dsn or ""
    window: Window | None = None
    while True:
        try:
            conn = db_connect(dsn, **kwargs)
        except errors.DatabaseError as exc:
            if key not in _reached:
                raise
            window = window or Window(window_s, max_attempts)
            delay = window.next_delay()
            if delay is None:
                raise errors.ConnectionLost(f"{exc} (could not reconnect: {window.describe()})") from exc
            log.warning("%s; retrying in %.1f s", exc, delay)
            time.sleep(delay)
            continue
        _reached.add(key)
        return conn
