"""Map psycopg errors onto the pggeolearn exception tree at the database boundary."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg
from psycopg import errors as pge

from pggeolearn import errors


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (psycopg adds LINE/HINT lines)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def translate(exc: psycopg.Error, context: str = "") -> errors.PggeolearnError:
    """Return the pggeolearn error for a psycopg error; the caller raises it ``from exc``."""
    prefix = f"{context}: " if context else ""
    msg = prefix + first_line(exc)
    if isinstance(exc, pge.QueryCanceled):
        return errors.QueryTimeout(msg)
    if isinstance(exc, pge.InsufficientPrivilege):
        from pggeolearn.db.usersql import permission_hint

        return errors.PermissionDenied(prefix + (permission_hint(exc) or first_line(exc)))
    if isinstance(exc, pge.DiskFull):
        return errors.DiskFull(msg)
    if isinstance(exc, pge.UndefinedTable | pge.UndefinedObject | pge.InvalidSchemaName):
        return errors.NotFound(msg)
    if isinstance(exc, pge.UniqueViolation | pge.DuplicateTable | pge.DuplicateObject):
        return errors.AlreadyExists(msg)
    if isinstance(exc, pge.AdminShutdown | pge.CrashShutdown | pge.CannotConnectNow):
        return errors.ConnectionLost(msg)
    if isinstance(exc, psycopg.OperationalError) and getattr(exc, "sqlstate", None) is None:
        # no SQLSTATE: the client lost the server (socket closed, server gone)
        return errors.ConnectionLost(prefix + "connection lost: " + first_line(exc))
    return errors.DatabaseError(msg)


@contextlib.contextmanager
def db_errors(context: str = "") -> Iterator[None]:
    """Re-raise psycopg errors inside the block as pggeolearn errors, keeping the cause."""
    try:
        yield
    except psycopg.Error as exc:
        raise translate(exc, context) from exc
