"""``pggeolearn dataset``: define, list, show and drop dataset recipes."""

from __future__ import annotations

from pathlib import Path

import click

from pggeolearn import datasets
from pggeolearn.cli.context import Context, pass_ctx
from pggeolearn.db import connect


def _sql_arg(value: str | None) -> str | None:
    """``@file.sql`` reads the SQL from a file."""
    if value and value.startswith("@"):
        return Path(value[1:]).read_text()
    return value


@click.group("dataset")
def dataset() -> None:
    """Dataset recipes: grid + image SQL + label SQL + classes."""


@dataset.command("create")
@click.argument("name")
@click.option("--from-toml", "toml_path", type=click.Path(exists=True, dir_okay=False),
              help="Read the recipe from a TOML file (options given here override it).")
@click.option("--srid", type=int, help="SRID of the tile grid.")
@click.option("--resolution", type=float, help="Pixel size in grid CRS units.")
@click.option("--tile-px", type=int, help="Tile size in pixels [256].")
@click.option("--overlap-px", type=int, help="Overlap between neighbouring tiles in pixels [0].")
@click.option("--extent", nargs=4, type=float, metavar="MINX MINY MAXX MAXY",
              help="Grid extent in the grid CRS.")
@click.option("--extent-from", metavar="SCHEMA.TABLE",
              help="Take the extent of a raster or geometry table.")
@click.option("--image-sql", help="SQL returning rasters (column rast) for a tile; @file.sql reads a file.")
@click.option("--label-sql", help="SQL returning (geom, class_id [, buffer_m]) for a tile; @file.sql reads a file.")
@click.option("--classes", help="Class names, e.g. 1=road,2=building.")
@click.option("--all-touched/--pixel-centre", default=None,
              help="Burn every pixel a shape touches, or only pixels whose centre is inside [centre].")
@click.option("--resampling", type=click.Choice(datasets.RESAMPLING),
              help="How imagery is sampled onto the grid [nearest: source values kept exactly].")
@click.option("--new-version", "--overwrite", "new_version", is_flag=True,
              help="NAME exists: a changed recipe becomes its next version (the old version and "
                   "its chips stay as NAME@N until `dataset drop NAME --version N`); the same "
                   "recipe changes nothing. --overwrite is the older name.")
@pass_ctx
def create(ctx: Context, name: str, toml_path: str | None, srid, resolution, tile_px, overlap_px,
           extent, extent_from, image_sql, label_sql, classes, all_touched, resampling,
           new_version) -> None:
    """Create dataset NAME after checking its SQL on a sample tile."""
    given = dict(name=name, srid=srid, resolution=resolution, tile_px=tile_px,
                 overlap_px=overlap_px, extent=extent or None, extent_from=extent_from,
                 image_sql=_sql_arg(image_sql), label_sql=_sql_arg(label_sql),
                 classes=classes, all_touched=all_touched, resampling=resampling)
    if toml_path:
        recipe = datasets.Recipe.from_toml(toml_path, **given)
    else:
        recipe = datasets.Recipe.from_dict({k: v for k, v in given.items() if v is not None})
    with connect(ctx.dsn) as conn:
        conn.autocommit = True
        ds = datasets.create(conn, recipe, new_version=new_version)
    click.echo(ds.describe())


@dataset.command("list")
@pass_ctx
def list_(ctx: Context) -> None:
    """List datasets."""
    with connect(ctx.dsn) as conn:
        conn.autocommit = True
        found = datasets.list_all(conn)
    if not found:
        click.echo("no datasets (create one: pggeolearn dataset create --help)")
    for ds in found:
        r = ds.recipe
        click.echo(f"{ds.name}\tEPSG:{r.srid}\t{r.resolution:g}/px\t{r.tile_px}px\t"
                   f"{ds.n_tiles} tiles\t{ds.recipe_hash}\tversion {ds.version}")


@dataset.command("versions")
@click.argument("name")
@pass_ctx
def versions(ctx: Context, name: str) -> None:
    """List every version of dataset NAME (NAME@N), its recipe hash, chips and models."""
    with connect(ctx.dsn, autocommit=True) as conn:
        found = datasets.versions(conn, name)
        if not found:
            datasets.get(conn, name)  # says it is unknown
    for v in found:
        click.echo(str(v))


@dataset.command("show")
@click.argument("name")
@pass_ctx
def show(ctx: Context, name: str) -> None:
    """Show a dataset's recipe, SQL, chips and statistics."""
    from pggeolearn import chips

    with connect(ctx.dsn) as conn:
        conn.autocommit = True
        click.echo(datasets.show(conn, name))
        click.echo(chips.summary(conn, name))


@dataset.command("drop")
@click.argument("name")
@click.option("--version", type=click.IntRange(1), default=None, metavar="N",
              help="Drop only old version N and its chips (NAME@N names it too).")
@click.option("--force", is_flag=True, help="Drop a version even though stored models were trained on it.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def drop(ctx: Context, name: str, version: int | None, force: bool, yes: bool) -> None:
    """Delete a dataset (every version) and its chips, or one old version."""
    what = f"version {version} of dataset {name}" if version else f"dataset {name}"
    if not yes:
        click.confirm(f"drop {what} and its chips?", abort=True)
    with connect(ctx.dsn) as conn:
        conn.autocommit = True
        dropped = datasets.drop(conn, name, version=version, force=force)
    click.echo(f"dropped {dropped}")


@dataset.command("watch")
@click.argument("name")
@click.option("--margin-m", type=click.FloatRange(0, 1e5), default=None, metavar="METRES",
              help="Widen every changed footprint by this many ground metres [the label SQL's "
                   "largest buffer_m].")
@click.option("--off", is_flag=True, help="Stop watching (remove the triggers).")
@pass_ctx
def watch(ctx: Context, name: str, margin_m: float | None, off: bool) -> None:
    """Record changes to the tables NAME's SQL reads, for `pggeolearn chips refresh`."""
    from pggeolearn import refresh

    with connect(ctx.dsn, autocommit=True) as conn:
        if off:
            gone = refresh.unwatch(conn, name)
            click.echo(f"dataset {name}: no longer watching {', '.join(gone) or 'anything'}")
            return
        found, margin = refresh.watch(conn, name, margin_m=margin_m)
    for src in found:
        click.echo(f"watching {src.name} ({', '.join(c[2:] for c in src.columns)})")
    click.echo(f"dataset {name}: changes from now on are rebuilt by `pggeolearn chips refresh "
               f"{name}` (margin {margin:g} m)")


commands = [dataset]
