"""``pggeolearn chips``: build the chip store, split it, look at it."""

from __future__ import annotations

from pathlib import Path

import click

from pggeolearn.cli.context import Context, pass_ctx
from pggeolearn.db import connect
from pggeolearn.split_defaults import DEFAULT_BLOCK_M, DEFAULT_RATIOS


def _ratios(_ctx, _param, value: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected three numbers like 0.7,0.15,0.15, not {value!r}") from None
    if len(parts) != 3:
        raise click.BadParameter(f"expected three numbers (train,val,test), not {value!r}")
    return parts  # type: ignore[return-value]


@click.group("chips")
def chips_group() -> None:
    """The chip store: materialized tiles, spatial splits, statistics."""


@chips_group.command("build")
@click.argument("dataset")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Parallel database connections.")
@click.option("--where", metavar="SQL",
              help="Only tiles for which this SQL over the grid's tile_id and geom is true, "
                   "e.g. \"tile_id < 100\" or \"ST_Intersects(geom, ST_MakeEnvelope(...))\".")
@click.option("--rebuild-stale/--keep-stale", default=True, show_default=True,
              help="Rebuild chips made with an older recipe (hash differs).")
@click.option("--force", is_flag=True, help="Rebuild the selected chips even when current.")
@click.option("--batch-size", type=click.IntRange(1, 1024), default=None,
              help="Tiles per transaction [up to 32].")
@click.option("--statement-timeout", type=float, default=60.0, show_default=True,
              metavar="SECONDS", help="Time allowed per tile before the build fails.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@pass_ctx
def build(ctx: Context, dataset: str, jobs: int, where: str | None, rebuild_stale: bool,
          force: bool, batch_size: int | None, statement_timeout: float, progress: bool) -> None:
    """Materialize every tile of DATASET into pggeolearn.chips (restartable), then split it
    and compute its statistics. Chips without imagery or more than 50% NODATA are excluded."""
    from pggeolearn import chips

    report = chips.build(ctx.dsn, dataset, jobs=jobs, where=where, progress=progress,
                         rebuild_stale=rebuild_stale, force=force, batch_size=batch_size,
                         statement_timeout_s=statement_timeout)
    click.echo(str(report))


@chips_group.command("refresh")
@click.argument("dataset")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Parallel database connections.")
@click.option("--margin-m", type=click.FloatRange(0, 1e5), default=None, metavar="METRES",
              help="Widen changed footprints by this many ground metres [as set by dataset watch].")
@click.option("--statement-timeout", type=float, default=60.0, show_default=True,
              metavar="SECONDS", help="Time allowed per tile before the refresh fails.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@pass_ctx
def refresh_cmd(ctx: Context, dataset: str, jobs: int, margin_m: float | None,
                statement_timeout: float, progress: bool) -> None:
    """Rebuild only the chips of DATASET whose tiles changed source rows touch (see
    `pggeolearn dataset watch`); every chip keeps its split; statistics are updated."""
    from pggeolearn import refresh

    click.echo(str(refresh.refresh(ctx.dsn, dataset, margin_m=margin_m, jobs=jobs,
                                   progress=progress, statement_timeout_s=statement_timeout)))


@chips_group.command("split")
@click.argument("dataset")
@click.option("--block-m", type=float, default=None,
              help=f"Side of the square spatial blocks, in ground metres [{DEFAULT_BLOCK_M:g} or "
                   "three tiles, the larger].")
@click.option("--ratios", default=",".join(map(str, DEFAULT_RATIOS)), show_default=True,
              callback=_ratios,
              help="Train,val,test shares of the usable chips.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which blocks go where.")
@click.option("--guard-m", type=float, default=None,
              help="Exclude chips closer than this (ground metres) to another split [one tile].")
@click.option("--stratify", is_flag=True, help="Retry seeds until every split has every class.")
@pass_ctx
def split(ctx: Context, dataset: str, block_m: float | None, ratios: tuple[float, float, float],
          seed: int, guard_m: float | None, stratify: bool) -> None:
    """Assign the chips of DATASET to train/val/test by spatial blocks, with a guard band."""
    from pggeolearn import chips

    with connect(ctx.dsn, autocommit=True) as conn:
        report = chips.assign_splits(conn, dataset, block_m=block_m, ratios=ratios, seed=seed,
                                     guard_m=guard_m, stratify=stratify)
    click.echo(str(report))


@chips_group.command("stats")
@click.argument("dataset")
@pass_ctx
def stats(ctx: Context, dataset: str) -> None:
    """Print the stored statistics of DATASET's chips (splits, bands, classes, leakage)."""
    from pggeolearn import chips

    with connect(ctx.dsn, autocommit=True) as conn:
        click.echo(chips.summary(conn, dataset))


@chips_group.command("show")
@click.argument("dataset")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="PNG file to write.")
@click.option("--n", "n", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Number of chips.")
@click.option("--split", type=click.Choice(["train", "val", "test", "excluded"]), default=None,
              help="Only chips of this split [all].")
@click.option("--seed", type=int, default=0, show_default=True, help="Which chips are sampled.")
@pass_ctx
def show(ctx: Context, dataset: str, out: Path, n: int, split: str | None, seed: int) -> None:
    """Write a PNG grid of sample chips: image, label overlay per class, border per split."""
    from pggeolearn import chips

    with connect(ctx.dsn, autocommit=True) as conn:
        path = chips.show(conn, dataset, out, n=n, split=split, seed=seed)
    click.echo(f"wrote {path}")


@chips_group.command("map")
@click.argument("dataset")
@pass_ctx
def map_(ctx: Context, dataset: str) -> None:
    """Create or refresh view pggeolearn."chips_map_DATASET" of chip footprints for QGIS."""
    from pggeolearn import chips

    with connect(ctx.dsn, autocommit=True) as conn:
        view = chips.map_view(conn, dataset)
    click.echo(view.describe())


commands = [chips_group]
