"""One exception tree for the whole package.

Every error a user can cause is a :class:`PggeolearnError`; subclasses also inherit the
builtin they resemble so ``except LookupError`` keeps working. The CLI catches
``PggeolearnError`` in one place and prints ``str(exc)`` as one line.
"""

from __future__ import annotations


class PggeolearnError(Exception):
    """Root of every error pggeolearn raises on purpose."""


class ConfigError(PggeolearnError, ValueError):
    """Bad option, bad recipe, bad argument."""


class MissingDependency(PggeolearnError, RuntimeError):
    """A system program or optional Python package is not installed."""


class DatabaseError(PggeolearnError, RuntimeError):
    """The database refused or failed an operation."""


class ConnectionLost(DatabaseError, ConnectionError):
    """The connection dropped (server restart, pg_terminate_backend, network)."""


class QueryTimeout(DatabaseError, TimeoutError):
    """statement_timeout or a client deadline cancelled a query; never retried."""


class DiskFull(DatabaseError, OSError):
    """The server (or the client) ran out of disk space."""


class SchemaError(DatabaseError):
    """The pggeolearn schema is missing, too old, or failed to upgrade."""


class ClusterError(PggeolearnError, RuntimeError):
    """The embedded PostgreSQL cluster could not be started, stopped or found."""


class NotFound(PggeolearnError, LookupError):
    """A named thing (dataset, model, table, split) does not exist."""


class DatasetNotFound(NotFound):
    """No dataset recipe of that name."""


class ModelNotFound(NotFound):
    """No model of that name in the registry."""


class AlreadyExists(PggeolearnError, FileExistsError):
    """A name or table is taken; pass --overwrite to replace it."""


class RecipeError(ConfigError):
    """A dataset recipe's SQL fails, returns the wrong columns, or breaks a rule."""


class SridMismatch(ConfigError):
    """Two inputs are in different coordinate systems where they must agree."""


class RasterFormatError(PggeolearnError, ValueError):
    """Bytes that are not a raster WKB we can decode (truncated, out-db, unknown version)."""


class ChipError(PggeolearnError, ValueError):
    """A stored chip is NULL, of the wrong size, or otherwise unusable; names the tile id."""


class NotBuilt(PggeolearnError, LookupError):
    """A dataset has no chips (or no chips in a split) yet."""


class WorkerFailed(PggeolearnError, RuntimeError):
    """One process of a multi-process training (``train --nproc``) failed or died; the
    others were stopped."""


class PermissionDenied(DatabaseError, PermissionError):
    """The connected role lacks a privilege; the message names it and the GRANT that fixes it."""
