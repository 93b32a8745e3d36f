"""``pggeolearn synthetic`` (a scene to play with) and ``pggeolearn demo`` (the main job)."""

from __future__ import annotations

from pathlib import Path

import click

from pggeolearn.cli.context import Context, pass_ctx


@click.command("synthetic")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--size", "size_px", type=int, default=1024, show_default=True, help="Scene size in pixels.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--pixel-m", type=float, default=0.5, show_default=True, help="Ground metres per pixel.")
def synthetic(out_dir: Path, size_px: int, seed: int, pixel_m: float) -> None:
    """Write a seeded synthetic scene: scene.tif, roads/buildings GeoJSON and scene.osm."""
    from pggeolearn.synthetic import make_scene, write_osm

    scene = make_scene(out_dir, size_px=size_px, seed=seed, pixel_m=pixel_m)
    osm = write_osm(scene, out_dir / "scene.osm")
    click.echo(f"imagery: {scene.image_path} ({size_px} x {size_px} px, EPSG:3857, "
               f"{scene.resolution!r} units/px)")
    click.echo(f"vectors: {scene.roads_path}, {scene.buildings_path}")
    click.echo(f"OpenStreetMap XML: {osm} (load with: osm2pgsql --create -d \"$PGGEOLEARN_DSN\" {osm})")



@click.command("demo")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Real data instead of the synthetic scene, e.g. ../shared/data/banepa.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("pggeolearn-demo"),
              show_default=True, help="Folder for the scene files and the pictures.")
@click.option("--size", "size_px", type=click.IntRange(min=2048), default=2048, show_default=True,
              help="Synthetic scene size in pixels (at least 2048: each spatial split needs blocks).")
@click.option("--framework", type=click.Choice(["mxnet", "torch"]), default="mxnet", show_default=True)
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--minutes", type=float, default=10.0, show_default=True, help="Training time limit.")
@click.option("--jobs", type=int, default=2, show_default=True, help="Connections building chips.")
@pass_ctx
def demo(ctx: Context, data, out, size_px, framework, epochs, minutes, jobs) -> None:
    """The main job end to end: load data, define a dataset in SQL, build chips, train,
    predict, write rasters and polygons back, and print where to look."""
    from pggeolearn.demo import run_demo

    report = run_demo(ctx.dsn, out=out, data=data, size_px=size_px, framework=framework,
                      epochs=epochs, minutes=minutes, jobs=jobs, say=click.echo)
    click.echo(str(report))


commands = [synthetic, demo]
