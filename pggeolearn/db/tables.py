"""Table names given by users, parsed and checked once: :class:`TableName`.

``schema.name`` or ``name`` (schema ``public`` by default), each part either a plain SQL
identifier or a double-quoted one. A name is at most 63 bytes (PostgreSQL's NAMEDATALEN - 1;
longer names would be truncated silently), and a raster output also leaves room for the
overview tables PostGIS derives from it (``o_<factor>_<name>``). SQL only ever sees a name
through :attr:`TableName.ident` (``psycopg.sql.Identifier``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from psycopg import sql

from pggeolearn import errors

__all__ = ["MAX_BYTES", "TableName", "overview_prefix"]

MAX_BYTES = 63  # NAMEDATALEN - 1
_PART = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_NAME = re.compile(rf"^({_PART})(?:\.({_PART}))?$")


def _unquote(part: str) -> str:
    if part.startswith('"'):
        return part[1:-1].replace('""', '"')
    return part  # kept as typed, like db/names.split_table (no case folding)


def overview_prefix(factors: Iterable[int]) -> str:
    """The longest ``o_<factor>_`` prefix ST_CreateOverview gives the overviews of a table."""
    return max((f"o_{int(f)}_" for f in factors), key=len, default="")


@dataclass(frozen=True, order=True)
class TableName:
    """A schema-qualified table name (unquoted parts); build with :meth:`parse`."""

    schema: str
    name: str

    def __post_init__(self) -> None:
        for part in (self.schema, self.name):
            if not part or "\x00" in part:
                raise errors.ConfigError(f"not a table name: {self.schema!r}.{self.name!r}")
            if len(part.encode()) > MAX_BYTES:
                raise errors.ConfigError(
                    f"name {part!r} is {len(part.encode())} bytes: PostgreSQL names are at most "
                    f"{MAX_BYTES} bytes")

    @classmethod
    def parse(cls, text: str | TableName, default_schema: str = "public", *,
              reserve: str = "") -> TableName:
        """``'a.b'`` -> ``TableName('a', 'b')``; ``'b'`` -> ``(default_schema, 'b')``.

        Parts keep their spelling (``"a.b"``-style quoting allows dots and spaces inside a part).
        ``reserve``: a prefix (e.g. ``'o_16_'``) that must still fit in front of the name.
        """
        if isinstance(text, TableName):
            t = text
        else:
            m = _NAME.match((text or "").strip())
            if not m:
                raise errors.ConfigError(
                    f"not a table name: {text!r} (expected SCHEMA.NAME or NAME, quoted with \" "
                    "when it holds other characters)")
            first, second = m.groups()
            t = cls(_unquote(first), _unquote(second)) if second else cls(default_schema, _unquote(first))
        if reserve:
            t.fits(reserve)
        return t

    def fits(self, prefix: str) -> TableName:
        """Self, when ``prefix + name`` is a valid name too (else a one-line ConfigError)."""
        total = len((prefix + self.name).encode())
        if total > MAX_BYTES:
            raise errors.ConfigError(
                f"table name {self.name!r} is too long: {prefix}{self.name} would be {total} bytes, "
                f"PostgreSQL names are at most {MAX_BYTES} (choose a name of at most "
                f"{MAX_BYTES - len(prefix.encode())} bytes)")
        return self

    def sibling(self, suffix: str) -> TableName:
        """The table ``<name><suffix>`` in the same schema (length-checked)."""
        return TableName(self.schema, self.name + suffix)

    @property
    def ident(self) -> sql.Identifier:
        """The quoted, schema-qualified identifier; the only way the name reaches SQL."""
        return sql.Identifier(self.schema, self.name)

    @property
    def parts(self) -> tuple[str, str]:
        return self.schema, self.name

    def __str__(self) -> str:
        return f"{_show(self.schema)}.{_show(self.name)}"


def _show(part: str) -> str:
    """A part as a user would type it back: plain when it is a plain identifier."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]*", part):
        return part
    return '"' + part.replace('"', '""') + '"'
