"""Table names given by users, as tuples: a thin compatibility layer over
:class:`pggeolearn.db.tables.TableName` (new code uses TableName directly)."""

from __future__ import annotations

from psycopg import sql

from pggeolearn.db.tables import TableName


def split_table(name: str, default_schema: str = "public") -> tuple[str, str]:
    """``'a.b'`` -> ``('a', 'b')``; ``'b'`` -> ``(default_schema, 'b')``; quotes are removed."""
    return TableName.parse(name, default_schema).parts


def table_ident(name: str, default_schema: str = "public") -> sql.Identifier:
    """A quoted, schema-qualified identifier for ``name``; never string-formatted SQL."""
    return TableName.parse(name, default_schema).ident
