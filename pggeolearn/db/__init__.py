"""Database access: connections, the embedded cluster, schema install and error mapping."""

from pggeolearn.db.connect import connect, resolve_dsn
from pggeolearn.db.errors import db_errors

__all__ = ["connect", "db_errors", "resolve_dsn"]
