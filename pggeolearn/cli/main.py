"""Root command: global options, command registration, and the one place errors are printed."""

from __future__ import annotations

import sys

import click

from pggeolearn import __version__
from pggeolearn.cli.context import Context
from pggeolearn.errors import PggeolearnError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--dsn", envvar="PGGEOLEARN_DSN", default=None, metavar="DSN",
              help="PostgreSQL connection string. Default: PGGEOLEARN_DSN, the PG* variables, "
                   "else the embedded cluster (pggeolearn db up).")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(__version__, prog_name="pggeolearn")
@click.pass_context
def cli(ctx: click.Context, dsn: str | None, verbose: bool) -> None:
    """PostGIS as a training-data service for geospatial deep learning."""
    ctx.obj = Context(dsn, verbose)


def _register() -> None:
    from pggeolearn.cli import db

    cli.add_command(db.db)
    cli.add_command(db.grant)
    for name in ("imports", "datasets", "chips", "stream", "train", "predict", "runs", "qgis", "demo"):
        try:
            module = __import__(f"pggeolearn.cli.{name}", fromlist=["commands"])
        except ModuleNotFoundError as exc:
            if exc.name != f"pggeolearn.cli.{name}":
                raise
            continue
        for command in module.commands:
            cli.add_command(command)


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI; a PggeolearnError prints one line and exits 1."""
    verbose = "-v" in (argv or sys.argv) or "--verbose" in (argv or sys.argv)
    try:
        cli.main(args=argv, prog_name="pggeolearn", standalone_mode=False)
    except PggeolearnError as exc:
        if verbose:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # a database error that escaped the library: still one line
        if verbose or not type(exc).__module__.startswith("psycopg"):
            raise
        from pggeolearn.db.errors import first_line
        from pggeolearn.db.usersql import permission_hint

        click.echo(f"error: {permission_hint(exc) or first_line(exc)}", err=True)
        sys.exit(1)
