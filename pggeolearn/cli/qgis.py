"""``pggeolearn qgis project`` and ``pggeolearn review``: the QGIS user's side."""

from __future__ import annotations

from pathlib import Path

import click

from pggeolearn.cli.context import Context, pass_ctx
from pggeolearn.db import connect


@click.group("qgis")
def qgis_group() -> None:
    """QGIS projects stored in the database."""


@qgis_group.command("project")
@click.argument("dataset")
@click.option("--model", "models", multiple=True, help="Only this model's outputs (repeatable) [all].")
@click.option("--schema", default="pggeolearn", show_default=True,
              help="Schema whose qgis_projects table holds the project.")
@pass_ctx
def project(ctx: Context, dataset: str, models: tuple[str, ...], schema: str) -> None:
    """Write or refresh DATASET's QGIS project (imagery, labels, chips by split, predictions,
    evaluation, review; styled and grouped). QGIS >= 3.2: Browser > PostgreSQL > SCHEMA."""
    from pggeolearn.qgis.project import write_project

    with connect(ctx.dsn, autocommit=True) as conn:
        click.echo(str(write_project(conn, dataset, models=list(models) or None, schema=schema)))


class _RunOrCommand(click.Group):
    """``review RUN --against T`` and ``review export T``: a first argument that is not a
    subcommand is the RUN of ``review make``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["make", *args]
        return super().parse_args(ctx, args)


@click.group("review", cls=_RunOrCommand)
def review_group() -> None:
    """Predicted objects against the map, for mappers: review RUN --against SCHEMA.TABLE, then
    edit status in QGIS, then review export."""


@review_group.command("make")
@click.argument("run", type=int)
@click.option("--against", required=True, metavar="SCHEMA.TABLE",
              help="The map: a table of existing features (e.g. osm2pgsql's planet_osm_polygon).")
@click.option("--geom-column", default=None, help="Its geometry column [the first one].")
@click.option("--iou", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Overlapping objects with a lower IoU are listed as changed.")
@click.option("--class", "classes", multiple=True, help="Compare only these classes (name or id; repeatable).")
@click.option("--out", default=None, metavar="SCHEMA.NAME", help="Review table [<the run's polygons>_review].")
@click.option("--overwrite", is_flag=True, help="Replace an existing review table (its statuses are lost).")
@pass_ctx
def make(ctx: Context, run: int, against: str, geom_column, iou, classes, out, overwrite) -> None:
    """Compare the objects of predict RUN with the features of a map table: new, missing and
    changed objects, each with an editable status (todo/accepted/rejected)."""
    from pggeolearn.qgis import project, review

    with connect(ctx.dsn, autocommit=True) as conn:
        report = review.review(conn, run, against, out=out, iou=iou, classes=list(classes) or None,
                               geom_column=geom_column, overwrite=overwrite)
        report.notes += project.refresh_after(conn, *_model_and_dataset(conn, run))
    click.echo(str(report))


def _model_and_dataset(conn, run: int) -> tuple[str, str | None]:
    return conn.execute("SELECT model, dataset FROM pggeolearn.runs WHERE run_id = %s", [run]).fetchone()


@review_group.command("export")
@click.argument("table")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="GeoJSON file.")
@click.option("--kind", "kinds", multiple=True, type=click.Choice(["new", "missing", "changed"]),
              help="Kinds to export (repeatable) [new].")
@click.option("--status", "statuses", multiple=True, type=click.Choice(["todo", "accepted", "rejected"]),
              help="Statuses to export (repeatable) [accepted].")
@pass_ctx
def export(ctx: Context, table: str, out: Path, kinds, statuses) -> None:
    """Write the accepted new objects of review TABLE (or --kind/--status) as GeoJSON (WGS 84)."""
    from pggeolearn.qgis import review

    with connect(ctx.dsn, autocommit=True) as conn:
        n = review.export(conn, table, out, kinds=list(kinds) or None, statuses=list(statuses) or None)
    click.echo(f"wrote {n} objects to {out}")


commands = [qgis_group, review_group]
