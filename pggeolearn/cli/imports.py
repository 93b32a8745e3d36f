"""``pggeolearn import``: raster and vector files into PostGIS tables."""

from __future__ import annotations

import click

from pggeolearn.cli.context import Context, pass_ctx

table_option = click.option(
    "--table", required=True, metavar="SCHEMA.NAME",
    help="Target table (schema defaults to public).")
srid_option = click.option(
    "--srid", type=int, default=None, metavar="N",
    help="Reproject to this EPSG code (files without a CRS are declared to be in it).")
overwrite_option = click.option(
    "--overwrite", is_flag=True, help="Drop and recreate the table if it exists.")
force_option = click.option(
    "--force", is_flag=True, help="With --overwrite: also replace a table pggeolearn did not create.")
append_option = click.option(
    "--append", is_flag=True, help="Add to the table if it exists.")
progress_option = click.option(
    "--progress/--no-progress", default=True, show_default=True,
    help="Show a progress bar on stderr.")


@click.group(name="import")
def import_() -> None:
    """Load raster and vector files into PostGIS tables."""


@import_.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE_OR_GLOB...")
@table_option
@srid_option
@click.option("--tile-size", type=int, default=256, show_default=True, metavar="PX",
              help="Tile width and height in pixels (edge tiles are smaller).")
@click.option("--resolution", type=float, default=None, metavar="R",
              help="Resample onto a grid of this pixel size (target CRS units).")
@click.option("--keep-alpha", is_flag=True,
              help="Import an alpha band as a band (default: it marks NODATA, like a GDAL mask).")
@overwrite_option
@force_option
@append_option
@progress_option
@pass_ctx
def raster(ctx: Context, files: tuple[str, ...], table: str, srid: int | None, tile_size: int,
           resolution: float | None, keep_alpha: bool, overwrite: bool, force: bool, append: bool,
           progress: bool) -> None:
    """Tile raster files (GeoTIFF, anything GDAL reads) into a raster table.

    The table matches `raster2pgsql -I -C -F -t 256x256`: rid, rast, filename, a GiST index
    and the raster constraints. With --srid (or --resolution) all files are warped onto one
    grid, so the tiles share alignment. Quote globs to let pggeolearn expand them.
    """
    from pggeolearn.db import connect
    from pggeolearn.importers.raster import import_raster

    with connect(ctx.dsn) as conn:
        report = import_raster(conn, list(files), table, srid=srid, tile_size=tile_size,
                               resolution=resolution, overwrite=overwrite, append=append,
                               progress=progress, force=force, keep_alpha=keep_alpha)
    click.echo(str(report))


@import_.command()
@click.argument("file", metavar="FILE")
@table_option
@srid_option
@click.option("--geom-column", default="geom", show_default=True, metavar="NAME",
              help="Name of the geometry column.")
@click.option("--layer", default=None, metavar="NAME",
              help="The layer to load from a file with several (a GeoPackage).")
@overwrite_option
@force_option
@append_option
@progress_option
@pass_ctx
def vector(ctx: Context, file: str, table: str, srid: int | None, geom_column: str,
           layer: str | None, overwrite: bool, force: bool, append: bool, progress: bool) -> None:
    """Load a vector file GDAL reads into a table (GeoPackage, Shapefile, FlatGeobuf, GeoJSON...).

    Attribute fields become typed columns plus a `properties` jsonb column; invalid
    geometries are made valid. The SRID is the layer's CRS (GeoJSON: EPSG:4326); --srid
    transforms to another SRID, or declares it for a layer without a CRS.
    """
    from pggeolearn.db import connect
    from pggeolearn.importers.vector import import_vector

    with connect(ctx.dsn) as conn:
        report = import_vector(conn, file, table, srid=srid, geom_column=geom_column,
                               overwrite=overwrite, append=append, progress=progress, force=force,
                               layer=layer)
    click.echo(str(report))


commands = [import_]
