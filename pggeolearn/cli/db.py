"""``pggeolearn db``: the embedded cluster and the schema."""

from __future__ import annotations

from pathlib import Path

import click

from pggeolearn.cli.main import Context, pass_ctx
from pggeolearn.db import cluster as cl
from pggeolearn.db import schema

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
    """Install schema pggeolearn (tables and SQL functions). Safe to repeat."""
    rev = schema.upgrade(ctx.dsn)
    click.echo(f"schema pggeolearn at revision {rev}")


@db.command()
@click.option("--revision", default="head", show_default=True)
@pass_ctx
def upgrade(ctx: Context, revision: str) -> None:
    """Upgrade schema pggeolearn in one transaction (a failure changes nothing)."""
    rev = schema.upgrade(ctx.dsn, revision)
    click.echo(f"schema pggeolearn at revision {rev}")


@db.command()
@pass_ctx
def version(ctx: Context) -> None:
    """Print package, schema, PostGIS and PostgreSQL versions."""
    click.echo(schema.version_info(ctx.dsn).describe())


@db.command()
@pass_ctx
def dsn(ctx: Context) -> None:
    """Print the DSN pggeolearn connects to (for psql, osm2pgsql, QGIS)."""
    from pggeolearn.db import resolve_dsn

    click.echo(resolve_dsn(ctx.dsn))
