"""``pggeolearn runs``: the latest predict, evaluate and train runs, and how they ended."""

from __future__ import annotations

import click

from pggeolearn.cli.context import Context, pass_ctx


@click.command("runs")
@click.option("--model", default=None, help="Only the runs of this model.")
@click.option("--limit", type=click.IntRange(1, 10000), default=20, show_default=True,
              help="How many (newest first).")
@pass_ctx
def runs_(ctx: Context, model: str | None, limit: int) -> None:
    """List the latest runs (newest first). Runs whose process died are marked failed first."""
    from pggeolearn import runs
    from pggeolearn.db import connect
    from pggeolearn.db.schema import require_schema

    with connect(ctx.dsn, autocommit=True) as conn:
        require_schema(conn)
        found = runs.list_runs(conn, model=model, limit=limit)
    for r in found:
        click.echo(str(r))
    if not found:
        click.echo("no runs yet")


commands = [runs_]
