"""``pggeolearn synthetic`` (a scene to play with) and ``pggeolearn demo`` (the main job)."""

from __future__ import annotations

from pathlib import Path

import click


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


commands = [synthetic]
