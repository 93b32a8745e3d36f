"""``pggeolearn db``: the embedded cluster and the schema."""

from __future__ import annotations

from pathlib import Path

import click

from pggeolearn.cli.context import Context, pass_ctx
from pggeolearn.db import cluster as cl

datadir_option = click.option(
    "--datadir", type=click.Path(path_type=Path), default=None, envvar="PGGEOLEARN_DATADIR",
    help="Data directory of the embedded cluster (default: PGGEOLEARN_HOME/pgdata, "
         "/var/lib/pggeolearn/pgdata as root, ~/.local/share/pggeolearn/pgdata otherwise).")


def _cluster(datadir: Path | None) -> cl.Cluster:
    return cl.Cluster(datadir) if datadir else cl.Cluster.default()


@click.group()
def db() -> None:
    """Embedded PostgreSQL cluster and pggeolearn schema."""


@db.command()
@datadir_option
def up(datadir: Path | None) -> None:
    """Create (first time) and start the embedded cluster. Idempotent."""
    click.echo(_cluster(datadir).up().describe())


@db.command()
@datadir_option
def down(datadir: Path | None) -> None:
    """Stop the embedded cluster (data is kept)."""
    click.echo(_cluster(datadir).down().describe())


@db.command()
@datadir_option
def status(datadir: Path | None) -> None:
    """Say whether the embedded cluster runs, where, and how to connect."""
    click.echo(_cluster(datadir).status().describe())


@db.command()
@pass_ctx
def init(ctx: Context) -> None:
    """Install schema pggeolearn (tables, SQL functions, the recipe sandbox role, the reader /
    trainer / maintainer roles, pinned search_paths). Safe to repeat."""
    from pggeolearn.db import schema  # Alembic + SQLAlchemy: only for the commands that need them

    rev = schema.upgrade(ctx.dsn)
    click.echo(f"schema pggeolearn at revision {rev}")
    _report_holes(ctx)


def _report_holes(ctx: Context) -> int:
    from pggeolearn.db import connect, security

    with connect(ctx.dsn, autocommit=True) as conn:
        holes = security.check(conn)
    for hole in holes:
        click.echo(f"hole: {hole}")
    if not holes:
        click.echo("recipe sandbox: no hole found (pggeolearn_recipe, pinned search_path, "
                   "large objects revoked)")
    return len(holes)


@db.command()
@pass_ctx
def check(ctx: Context) -> None:
    """Report what still lets recipe SQL do harm here, one line each; exit 1 when anything does."""
    if _report_holes(ctx):
        raise SystemExit(1)


@click.command()
@click.argument("target", required=False)
@click.option("--schema", "is_schema", is_flag=True,
              help="TARGET is a schema: every table in it, and tables created there later.")
@click.option("--role", "level", type=click.Choice(["reader", "trainer", "maintainer"]), default=None,
              help="Instead: make login role TARGET a member of pggeolearn_<role>.")
@pass_ctx
def grant(ctx: Context, target: str | None, is_schema: bool, level: str | None) -> None:
    """Let recipe SQL read TABLE (or --schema SCHEMA); or give a login role a pggeolearn role.

    \b
    pggeolearn grant public.roads            recipes may SELECT public.roads
    pggeolearn grant --schema osm            ... every table of schema osm
    pggeolearn grant --role trainer alice    GRANT pggeolearn_trainer TO alice
    """
    from pggeolearn import errors
    from pggeolearn.db import connect, security

    if not target:
        raise errors.ConfigError("name a table, a schema (--schema) or a login role (--role)")
    with connect(ctx.dsn, autocommit=True) as conn:
        if level:
            click.echo(security.grant_role(conn, level, target))
        else:
            click.echo(security.grant(conn, target, schema=is_schema))


@db.command()
@click.option("--revision", default="head", show_default=True)
@pass_ctx
def upgrade(ctx: Context, revision: str) -> None:
    """Upgrade schema pggeolearn in one transaction (a failure changes nothing)."""
    from pggeolearn.db import schema

    rev = schema.upgrade(ctx.dsn, revision)
    click.echo(f"schema pggeolearn at revision {rev}")


@db.command()
@pass_ctx
def version(ctx: Context) -> None:
    """Print package, schema, PostGIS and PostgreSQL versions."""
    from pggeolearn.db import schema

    click.echo(schema.version_info(ctx.dsn).describe())


@db.command()
@pass_ctx
def dsn(ctx: Context) -> None:
    """Print the DSN pggeolearn connects to (for psql, osm2pgsql, QGIS)."""
    from pggeolearn.db import resolve_dsn

    click.echo(resolve_dsn(ctx.dsn))


@db.command()
@click.argument("replica_dir", type=click.Path(path_type=Path))
@datadir_option
def replica(replica_dir: Path, datadir: Path | None) -> None:
    """Make and start a streaming hot standby of the embedded cluster in REPLICA_DIR, for
    readers to spread over (GeoStream takes several DSNs). Prints its DSN."""
    from pggeolearn.db.replica import make_replica

    standby = make_replica(_cluster(datadir), replica_dir)
    click.echo(f"standby running in {standby.datadir} (read only, streaming from the primary)")
    click.echo(f"dsn: {standby.dsn()}")
