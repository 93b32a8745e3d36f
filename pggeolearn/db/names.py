"""Table names given by users: ``schema.name`` or ``name``, always quoted as identifiers."""

from __future__ import annotations

import re

from psycopg import sql

from pggeolearn import errors

_PART = r'(?:"[^"]+"|[A-Za-z_][A-Za-z0-9_$]*)'
_NAME = re.compile(rf"^({_PART})(?:\.({_PART}))?$")


def split_table(name: str, default_schema: str = "public") -> tuple[str, str]:
    """``'a.b'`` -> ``('a', 'b')``; ``'b'`` -> ``(default_schema, 'b')``; quotes are removed."""
    m = _NAME.match(name.strip())
    if not m:
        raise errors.ConfigError(f"not a table name: {name!r} (expected SCHEMA.NAME or NAME)")
    first, second = (p.strip('"') if p else p for p in m.groups())
    return (first, second) if second else (default_schema, first)


def table_ident(name: str, default_schema: str = "public") -> sql.Identifier:
    """A quoted, schema-qualified identifier for ``name``; never string-formatted SQL."""
    return sql.Identifier(*split_table(name, default_schema))
