"""Find the files that ship beside the code: ``sql/`` and ``migrations/``.

In a wheel they sit inside the package (hatch force-include); in a source checkout they sit at
the repository's top level, where a DBA reads them.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from pggeolearn import errors

_PKG = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    for cand in (_PKG / name, _PKG.parent / name):
        if cand.is_dir():
            return cand
    raise errors.MissingDependency(f"the {name}/ folder is missing from this installation of pggeolearn")


@cache
def sql_text(name: str) -> str:
    """The text of ``sql/<name>.sql`` (queries too long to live in Python)."""
    path = resource_dir("sql") / f"{name}.sql"
    try:
        return path.read_text()
    except FileNotFoundError:
        raise errors.MissingDependency(f"SQL file {path} is missing") from None


def schema_files() -> list[Path]:
    """The SQL files that define the schema's functions, in install order (numbered names)."""
    return sorted(resource_dir("sql").glob("[0-9][0-9]_*.sql"))
