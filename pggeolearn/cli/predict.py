"""``pggeolearn predict`` and ``pggeolearn evaluate``: a model's output as QGIS layers, and its
scores on a held-out split."""

from __future__ import annotations

from pathlib import Path

import click

from pggeolearn.cli.context import Context, pass_ctx


@click.command("predict")
@click.argument("model")
@click.option("--extent", nargs=4, type=float, default=None, metavar="MINX MINY MAXX MAXY",
              help="Area to predict (in --extent-srid, default the model's CRS).")
@click.option("--extent-srid", type=int, default=None, metavar="N", help="EPSG code of --extent.")
@click.option("--dataset", default=None, help="Predict the area of this dataset's chips instead.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True,
              help="Which chips of --dataset.")
@click.option("--imagery", default=None, metavar="TABLE|SQL",
              help="A raster table, or SQL returning rast that may use tile_geom, tile_rast, tile_srid, "
                   "tile_res (like a recipe's image SQL). Default with --dataset: its image SQL.")
@click.option("--out", required=True, metavar="SCHEMA.NAME",
              help="Class raster table; OUT_prob and OUT_polygons are written beside it.")
@click.option("--polygons", default=None, metavar="SCHEMA.NAME", help="Polygon table [OUT_polygons].")
@click.option("--no-polygons", is_flag=True, help="Do not vectorize.")
@click.option("--min-pixels", type=int, default=4, show_default=True, metavar="N",
              help="Polygons: leave out objects of fewer pixels before vectorizing (an object across "
                   "tile borders counts whole) and fill smaller holes; 0 keeps all. The class raster "
                   "keeps every pixel the model gave.")
@click.option("--probabilities", is_flag=True,
              help="Also write OUT_prob: one 8BUI band per class, p = value / 254.")
@click.option("--overlap", type=click.IntRange(0, 4095), default=None,
              help="Pixels shared by neighbouring windows [32, at most a quarter of the window].")
@click.option("--stitch", type=click.Choice(["centre", "blend"]), default="centre", show_default=True,
              help="centre: each window keeps its central part; blend: cosine-weighted average.")
@click.option("--overwrite", is_flag=True, help="Replace existing output tables.")
@click.option("--append", is_flag=True, help="Add to existing output tables.")
@click.option("--force", is_flag=True,
              help="With --overwrite: also replace tables pggeolearn did not create.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=8, show_default=True,
              help="Windows per model call.")
@click.option("--tile-size", type=click.IntRange(16, 4096), default=256, show_default=True,
              help="Pixels per side of the output raster tiles.")
@click.option("--device", default=None, help="Model device: auto, cpu, gpu:0 [auto].")
@click.option("--statement-timeout", type=float, default=60.0, show_default=True, metavar="SECONDS",
              help="Time allowed to read the imagery of one row of windows.")
@click.option("--grid-origin", nargs=2, type=float, default=None, metavar="X Y",
              help="Put pixel edges on X + k*res, Y - k*res [the model's dataset's grid].")
@click.option("--tta", is_flag=True,
              help="Test-time augmentation: average over flips and 90° rotations (8x slower).")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@pass_ctx
def predict(ctx: Context, model: str, extent, extent_srid, dataset, split, imagery, out, polygons,
            no_polygons, min_pixels, probabilities, overlap, stitch, overwrite, append, force, batch_size,
            tile_size, device, statement_timeout, grid_origin, tta, progress) -> None:
    """Run MODEL (a registry name, or module:attribute) over an extent or a dataset split and
    write a class raster, polygons and optionally probabilities into PostGIS, styled for QGIS.
    No imagery: NODATA 255."""
    from pggeolearn import predict as lib

    report = lib.predict(ctx.dsn, model, out=out, imagery=imagery, extent=extent or None,
                         extent_srid=extent_srid, dataset=dataset, split=split, overlap=overlap,
                         stitch=stitch, probabilities=probabilities, vectorize=not no_polygons,
                         polygons=polygons, min_pixels=min_pixels, overwrite=overwrite, append=append, force=force,
                         batch_size=batch_size, tile_px=tile_size, device=device,
                         timeout_s=statement_timeout, progress=progress, grid_origin=grid_origin or None,
                         tta=tta)
    click.echo(str(report))


@click.command("evaluate")
@click.argument("model")
@click.option("--dataset", required=True, help="Dataset whose chips to score.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--out-layer", default=None, metavar="SCHEMA.NAME",
              help="Write a per-tile metrics layer (footprint, IoU per class, accuracy) for QGIS.")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw the worst tiles (image, truth, prediction) into this PNG.")
@click.option("--worst", type=click.IntRange(1, 256), default=8, show_default=True,
              help="How many tiles the PNG shows.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out-layer table.")
@click.option("--force", is_flag=True,
              help="With --overwrite: also replace a table pggeolearn did not create.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=8, show_default=True)
@click.option("--device", default=None, help="Model device: auto, cpu, gpu:0 [auto].")
@click.option("--tta", is_flag=True,
              help="Test-time augmentation: average over flips and 90° rotations (8x slower).")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@pass_ctx
def evaluate(ctx: Context, model: str, dataset: str, split: str, out_layer, png, worst, overwrite,
             force, batch_size, device, tta, progress) -> None:
    """Score MODEL on the chips of a dataset split: per-class IoU/F1, confusion matrix, and
    optionally a per-tile layer and a PNG of the worst tiles."""
    from pggeolearn import evaluate as lib

    report = lib.evaluate(ctx.dsn, model, dataset=dataset, split=split, out_layer=out_layer,
                          png=png, n_worst=worst, batch_size=batch_size, overwrite=overwrite,
                          force=force, device=device, progress=progress, tta=tta)
    click.echo(str(report))


commands = [predict, evaluate]
