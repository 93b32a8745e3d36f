"""Install and upgrade schema ``pggeolearn`` with Alembic; (re)install the SQL functions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import psycopg

from pggeolearn import __version__, errors
from pggeolearn.db.connect import connect, resolve_dsn
from pggeolearn.db.errors import first_line
from pggeolearn.resources import resource_dir, schema_files

if TYPE_CHECKING:  # Alembic and SQLAlchemy cost ~1.5 s to import: only db init/upgrade need them
    import sqlalchemy as sa
    from alembic.config import Config

SCHEMA = "pggeolearn"


def install_functions(bind: sa.Connection) -> None:
    """Run every ``sql/NN_*.sql`` file (CREATE OR REPLACE ...) on the migration's connection."""
    raw = bind.connection.driver_connection  # psycopg: no parameters -> multi-statement allowed
    # the files are the package's, whatever revision the tables are at (`db upgrade --revision`):
    # a SQL function may name a table a later revision creates (as pg_dump restores do)
    raw.execute("SET LOCAL check_function_bodies = off")
    for path in schema_files():
        try:
            raw.execute(path.read_text())
        except psycopg.Error as exc:
            raise errors.SchemaError(f"{path.name}: {first_line(exc)}") from exc
    drop_superseded(raw)
    from pggeolearn.db import security

    # roles, grants, the sandbox's owner, a pinned search_path on every function of the schema
    # (whoever wrote its file); what this role may not do is reported by `pggeolearn db check`
    try:
        security.install(raw)
    except psycopg.Error as exc:
        raise errors.SchemaError(f"security setup: {first_line(exc)}") from exc


def drop_superseded(raw: psycopg.Connection) -> list[str]:
    """Drop the functions of schema pggeolearn that the files just run did not (re)create: old
    signatures of functions whose arguments changed, functions since removed. Every function a
    file defines was written in this transaction (CREATE OR REPLACE writes its catalog row), so
    what else is in the schema is left over from an older version."""
    stale = [r[0] for r in raw.execute(
        "SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p "
        "WHERE p.pronamespace = 'pggeolearn'::regnamespace AND p.prokind IN ('f', 'p') "
        "AND p.xmin::text::bigint <> txid_current() % 4294967296 ORDER BY 1")]
    for signature in stale:
        try:
            raw.execute(f"DROP FUNCTION {signature}")  # regprocedure text: quoted, qualified
        except psycopg.Error as exc:
            raise errors.SchemaError(f"cannot drop the superseded {signature}: "
                                     f"{first_line(exc)}") from exc
    return stale


def _engine(dsn: str | None) -> sa.Engine:
    import sqlalchemy as sa

    target = resolve_dsn(dsn)
    return sa.create_engine("postgresql+psycopg://", creator=lambda: connect(target),
                            poolclass=sa.pool.NullPool)


def _config(connection: sa.Connection) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(resource_dir("migrations")))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(resource_dir("migrations")))
    return script.get_current_head()


def upgrade(dsn: str | None = None, revision: str = "head") -> str:
    """Bring the schema to ``revision`` in one transaction; return the new revision.

    ``db init`` and ``db upgrade`` both land here: on an empty database it creates everything.
    """
    import sqlalchemy as sa
    from alembic import command

    engine = _engine(dsn)
    try:
        with engine.connect() as conn:
            command.upgrade(_config(conn), revision)
            conn.commit()
    except errors.PggeolearnError:
        raise
    except (sa.exc.DBAPIError, psycopg.Error) as exc:
        cause = getattr(exc, "orig", exc)
        raise errors.SchemaError(f"schema upgrade failed, nothing changed: {first_line(cause)}") from exc
    finally:
        engine.dispose()
    return current_revision(dsn) or revision


def current_revision(dsn: str | None = None) -> str | None:
    with connect(dsn) as conn:
        found = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", [f"{SCHEMA}.alembic_version"]
        ).fetchone()[0]
        if not found:
            return None
        row = conn.execute(f"SELECT version_num FROM {SCHEMA}.alembic_version").fetchone()
        return row[0] if row else None


@dataclass
class VersionInfo:
    package: str
    schema_revision: str | None
    head_revision: str
    sql_version: str | None
    postgis: str | None
    postgres: str

    @property
    def up_to_date(self) -> bool:
        return self.schema_revision == self.head_revision

    def describe(self) -> str:
        state = "up to date" if self.up_to_date else (
            "not installed (run: pggeolearn db init)" if self.schema_revision is None
            else f"behind head {self.head_revision} (run: pggeolearn db upgrade)")
        return "\n".join([
            f"pggeolearn {self.package}",
            f"schema revision: {self.schema_revision or '-'} ({state})",
            f"pggeolearn.version(): {self.sql_version or '-'}",
            f"PostGIS: {self.postgis or 'not installed'}",
            f"PostgreSQL: {self.postgres}",
        ])


def version_info(dsn: str | None = None) -> VersionInfo:
    rev = current_revision(dsn)
    with connect(dsn) as conn:
        pg_version = conn.execute("SHOW server_version").fetchone()[0]
        has_postgis = conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'postgis'").fetchone()
        sql_version = None
        if rev is not None:
            sql_version = conn.execute(f"SELECT {SCHEMA}.version()").fetchone()[0]
    return VersionInfo(__version__, rev, head_revision(), sql_version,
                       has_postgis[0] if has_postgis else None, pg_version)


def require_schema(conn: psycopg.Connection) -> None:
    """Fail with one line when the schema is not installed in the connected database."""
    found, usage, user = conn.execute(
        "SELECT n IS NOT NULL, n IS NULL OR has_schema_privilege(current_user, n::oid, 'USAGE'),"
        " current_user FROM (SELECT to_regnamespace(%s) AS n) s", [SCHEMA]).fetchone()
    if not found:
        raise errors.SchemaError("schema pggeolearn is not installed here (run: pggeolearn db init)")
    if not usage:
        raise errors.PermissionDenied(
            f"role {user} lacks USAGE on schema pggeolearn (a DBA fixes it: "
            f"GRANT pggeolearn_reader TO {user}; trainer or maintainer to train or build)")
