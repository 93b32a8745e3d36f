"""Raster files into a PostGIS raster table, tile by tile, like ``raster2pgsql -I -C -F``.

Without reprojection the tiles are exactly raster2pgsql's (``-t WxH``, no ``-P`` padding):
same grid, same row-major order, edge tiles smaller, all-NODATA tiles skipped (PostGIS >= 3.0),
per-band NODATA kept, pixel type from the dtype. With reprojection (``srid`` differs from a
file's CRS, or ``resolution`` is given) every file is warped (nearest neighbour) onto ONE grid
shared by the whole table: square pixels of ``resolution`` (default: the finest of the files'
own default resolutions), pixel edges on multiples of the resolution like ``gdalwarp -tap``,
so AddRasterConstraints' same-alignment constraint holds. Each file covers the grid cells whose
centres fall inside its footprint, so adjacent files meet without a gap or an overlap.
Warped files keep their NODATA value; where a file without one does not cover its grid
cells (a rotated footprint), the cells are 0, as with gdalwarp. An alpha band or a GDAL mask
(``.msk``, internal) is validity, not colour: the alpha band is left out and the pixels it masks
get the file's NODATA value, else one that no valid pixel holds in every band (0 unless taken).

The table is ``rid serial primary key, rast raster, filename text`` with a GiST index on
``ST_ConvexHull(rast)``, raster2pgsql's constraints and fresh statistics, all written in one
transaction: a failure leaves nothing behind.
"""

from __future__ import annotations

import glob
import math
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
import rasterio
from psycopg import sql
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import CRSError, NotGeoreferencedWarning, RasterioError
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform, transform_bounds
from rasterio.windows import Window
from tqdm import tqdm

from pggeolearn import errors, wkb
from pggeolearn.db import security
from pggeolearn.db.errors import db_errors, first_line
from pggeolearn.importers import _common
from pggeolearn.resources import sql_text

__all__ = ["ImportReport", "import_raster", "expand_paths"]

MIN_TILE, MAX_TILE = 16, 4096
PIXEL_TYPE = {
    "uint8": "8BUI", "int8": "8BSI", "uint16": "16BUI", "int16": "16BSI",
    "uint32": "32BUI", "int32": "32BSI", "float32": "32BF", "float64": "64BF",
}  # fmt: skip
# GDAL side files that a glob like dir/* also matches; they are not rasters of their own.
SIDECARS = (".aux.xml", ".ovr", ".msk", ".tfw", ".tifw", ".wld", ".prj")

# Writing tiles: psycopg's executemany() in pipeline mode of
# ``INSERT ... VALUES (ST_RastFromWKB(%b), %s)`` with binary bytea parameters. The raster type
# has no binary receive, so binary COPY can only go through a bytea staging table. Measured
# with 576 Banepa tiles (256x256x3 uint8, 197 KB each; 2 cores, PostgreSQL 15, PostGIS 3.3):
#   rast storage EXTERNAL: pipelined INSERT 910-1160 tiles/s | binary COPY into a temp bytea
#     table + INSERT ... SELECT ST_RastFromWKB, batches of 64: 790-930 | COPY text, hex WKB
#     straight into the table: 390-475
#   rast storage EXTENDED (the default, pglz): 220-280 | 250-280 | 165-180
# pglz finds nothing to compress in imagery (table size identical, 118 MB) but costs 4x the
# time, so new tables get ``SET STORAGE EXTERNAL`` on rast (uncompressed, out of line).
_STORAGE = "EXTERNAL"


@dataclass
class ImportReport:
    """What :func:`import_raster` did; ``str()`` is the CLI's summary."""

    table: str
    files: int
    tiles: int  # rows written
    skipped: int  # all-NODATA tiles not written (raster2pgsql >= 3.0 skips them too)
    srid: int
    resolution: tuple[float, float] | None  # pixel width, height (None: files differ)
    bands: int
    pixel_types: tuple[str, ...] = ()
    reprojected: bool = False
    aligned: bool | None = None  # raster_columns.same_alignment after the load
    appended: bool = False
    seconds: float = 0.0

    def __str__(self) -> str:
        files = f"{self.files} file{'s' if self.files != 1 else ''}"
        res = ("pixel size varies" if self.resolution is None
               else f"pixel {self.resolution[0]:.6g} x {self.resolution[1]:.6g}")
        types = ",".join(sorted(set(self.pixel_types))) or "-"
        verb = "appended" if self.appended else "imported"
        lines = [
            f"{verb} {files} into {self.table}: {self.tiles} tiles"
            f" ({self.skipped} all-nodata tiles skipped) in {self.seconds:.1f} s",
            f"SRID {self.srid}{' (reprojected)' if self.reprojected else ''}, {res}, "
            f"{self.bands} band{'s' if self.bands != 1 else ''} {types}, "
            f"same alignment: {'yes' if self.aligned else 'no'}",
        ]
        return "\n".join(lines)


@dataclass
class _Source:
    """One input file's metadata (the file is reopened when its tiles are read)."""

    path: Path
    crs: CRS | None
    epsg: int | None
    transform: Affine
    width: int
    height: int
    dtypes: tuple[str, ...]
    nodata: tuple[float | int | None, ...]
    bands: tuple[int, ...] = ()  # the file's band indexes (1-based) that become table bands
    masked: bool = False  # an alpha band or a GDAL mask says which pixels are valid
    # warped grid: pixel index of the upper-left cell on the table grid, and size
    cell: tuple[int, int] | None = None
    size: tuple[int, int] | None = None


@dataclass
class _Grid:
    """The table grid for warped files: x = ox + i * res, y = oy - j * res."""

    crs: CRS
    res: float
    ox: float = 0.0
    oy: float = 0.0


@dataclass
class _Counts:
    written: int = 0
    skipped: int = 0


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Existing files as given, glob patterns expanded (sorted); GDAL side files dropped.

    Raises :class:`~pggeolearn.errors.NotFound` for a pattern that matches nothing or a name
    that does not exist.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    out: list[Path] = []
    for p in paths:
        p = str(p)
        if Path(p).exists():
            out.append(Path(p))
            continue
        if glob.has_magic(p):
            hits = [h for h in sorted(glob.glob(p))
                    if Path(h).is_file() and not h.lower().endswith(SIDECARS)]
            if hits:
                out.extend(Path(h) for h in hits)
                continue
            raise errors.NotFound(f"no files match {p!r}")
        raise errors.NotFound(f"no such file: {p}")
    if not out:
        raise errors.NotFound("no raster files given")
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _open(path: Path) -> rasterio.DatasetReader:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioError as exc:
        raise errors.ConfigError(f"{path}: rasterio cannot open it: {first_line(exc)}") from exc


def _check_nodata(path: Path, value: float | None, dtype: str) -> None:
    if value is None or np.dtype(dtype).kind == "f":
        return
    info = np.iinfo(dtype)
    if not (math.isfinite(value) and value == int(value) and info.min <= value <= info.max):
        raise errors.ConfigError(f"{path}: NODATA value {value} does not fit its {dtype} pixels")


def _read_source(path: Path, keep_alpha: bool = False) -> _Source:
    with _open(path) as ds:
        if ds.count == 0:
            raise errors.ConfigError(f"{path}: has no bands")
        if ds.transform.is_identity and not ds.gcps[0]:
            raise errors.ConfigError(f"{path}: not georeferenced (no geotransform)")
        if ds.transform.is_identity:
            raise errors.ConfigError(
                f"{path}: georeferenced by ground control points only; warp it first (gdalwarp)")
        for dt in ds.dtypes:
            if dt not in PIXEL_TYPE:
                raise errors.ConfigError(f"{path}: pixel type {dt} has no PostGIS equivalent")
        for v, dt in zip(ds.nodatavals, ds.dtypes, strict=True):
            _check_nodata(path, v, dt)
        epsg = ds.crs.to_epsg() if ds.crs else None
        # an alpha band or a GDAL mask (.msk, internal) is validity, not a colour: the alpha
        # band is dropped and the pixels it masks get a NODATA value (the file's own, else
        # one that no valid pixel holds in every band)
        alpha = set() if keep_alpha else {i + 1 for i, ci in enumerate(ds.colorinterp)
                                          if ci == ColorInterp.alpha}
        bands = tuple(i for i in range(1, ds.count + 1) if i not in alpha)
        if not bands:
            raise errors.ConfigError(f"{path}: has only an alpha band")
        flags = ds.mask_flag_enums[bands[0] - 1]
        masked = bool(alpha) or (not keep_alpha and MaskFlags.per_dataset in flags
                                 and MaskFlags.alpha not in flags and MaskFlags.nodata not in flags)
        dtypes = tuple(ds.dtypes[i - 1] for i in bands)
        nodata = tuple(ds.nodatavals[i - 1] for i in bands)
        if masked:
            given = next((v for v in nodata if v is not None), None)
            nodata = (_free_value(ds, bands, dtypes[0]) if given is None else given,) * len(bands)
        return _Source(path, ds.crs, epsg, ds.transform, ds.width, ds.height, dtypes, nodata,
                       bands, masked)


def _free_value(ds: rasterio.DatasetReader, bands: tuple[int, ...], dtype: str) -> float | int:
    """A NODATA value for a masked file: one that no valid pixel holds in every band (0 unless
    it is taken, then the type's maximum, minimum, 1, 2, ...; NaN for floats)."""
    taken: set = set()
    for row in range(0, ds.height, 512):
        window = Window(0, row, ds.width, min(512, ds.height - row))
        arr = ds.read(indexes=list(bands), window=window)
        same = (arr == arr[:1]).all(axis=0) & (ds.dataset_mask(window=window) > 0)
        taken.update(np.unique(arr[0][same]).tolist())
    if np.dtype(dtype).kind == "f":
        if not any(math.isnan(v) for v in taken):
            return math.nan
        candidates = [float(np.finfo(dtype).min)]
    else:
        info = np.iinfo(dtype)
        candidates = [0, int(info.max), int(info.min), *range(1, int(info.max))]
    for v in candidates:
        if v not in taken:
            return v
    raise errors.ConfigError(f"{ds.name}: every value is used: no NODATA value left for its mask")


def _corner_bounds(t: Affine, width: int, height: int) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) over all four corners (exact for rotated grids too)."""
    xs, ys = zip(*(t @ c for c in ((0, 0), (width, 0), (0, height), (width, height))),
                 strict=True)
    return min(xs), min(ys), max(xs), max(ys)


def _target_srid(sources: Sequence[_Source], srid: int | None) -> int:
    """The table's SRID: ``srid`` when given, else the one EPSG code all files share."""
    for s in sources:
        if s.crs is None and srid is None:
            raise errors.ConfigError(
                f"{s.path}: has no CRS; pass --srid N to say which coordinate system it is in")
        if s.crs is not None and s.epsg is None and srid is None:
            raise errors.ConfigError(
                f"{s.path}: its CRS has no EPSG code; pass --srid N to reproject it")
    if srid is not None:
        return srid
    codes = sorted({s.epsg for s in sources})
    if len(codes) > 1:
        raise errors.SridMismatch(
            "files are in different coordinate systems ("
            + ", ".join(f"EPSG:{c}" for c in codes) + "); pass --srid N to reproject them all")
    return codes[0]


def _needs_warp(s: _Source, srid: int, dst: CRS) -> bool:
    if s.crs is None or s.epsg == srid:
        return False  # no CRS: the file is declared to be in srid (raster2pgsql -s)
    return s.epsg is not None or s.crs != dst


def _plan_warp(sources: Sequence[_Source], grid: _Grid, resolution: float | None) -> None:
    """Fix ``grid.res`` (if unset) and each file's cells on the common grid."""
    footprints = []
    finest = math.inf
    for s in sources:
        src_crs = s.crs or grid.crs
        bounds = _corner_bounds(s.transform, s.width, s.height)
        try:
            t, _, _ = calculate_default_transform(src_crs, grid.crs, s.width, s.height, *bounds)
            footprints.append(transform_bounds(src_crs, grid.crs, *bounds, densify_pts=21))
        except (RasterioError, CRSError, ValueError) as exc:
            raise errors.ConfigError(f"{s.path}: cannot reproject to {grid.crs}: "
                                     f"{first_line(exc)}") from exc
        finest = min(finest, abs(t.a), abs(t.e))
    if resolution is not None:
        grid.res = resolution
    elif not grid.res:
        grid.res = finest
    res = grid.res
    for s, (left, bottom, right, top) in zip(sources, footprints, strict=True):
        # cells whose centres lie inside the footprint: round the edges to grid lines
        i0, i1 = round((left - grid.ox) / res), round((right - grid.ox) / res)
        j0, j1 = round((grid.oy - top) / res), round((grid.oy - bottom) / res)
        s.cell = (i0, j0)
        s.size = (max(1, i1 - i0), max(1, j1 - j0))


def _probe(conn: psycopg.Connection, ident: sql.Identifier) -> tuple | None:
    query = sql.SQL(sql_text("import_raster_probe")).format(table=ident)
    return conn.execute(query).fetchone()


def _all_nodata(band: np.ndarray, nd: float | int) -> bool:
    if isinstance(nd, float) and math.isnan(nd):
        return bool(np.isnan(band).all())
    return bool((band == nd).all())


def _tiles(s: _Source, srid: int, tile_size: int, grid: _Grid | None, types: tuple[str, ...],
           counts: _Counts, bar: tqdm) -> Iterator[tuple[bytes, str]]:
    """``(raster WKB, filename)`` for each tile of one file that is not all NODATA."""
    name = s.path.name
    with _open(s.path) as ds:
        if grid is None:
            reader, width, height = ds, s.width, s.height
            nodata = s.nodata
            gt = s.transform.to_gdal()

            def upper_left(col: int, row: int) -> tuple[float, float]:
                # raster2pgsql's rt_raster_cell_to_geopoint, operation for operation
                return gt[0] + col * gt[1] + row * gt[2], gt[3] + col * gt[4] + row * gt[5]
        else:
            if len(set(s.nodata)) > 1:
                raise errors.ConfigError(
                    f"{s.path}: bands have different NODATA values; cannot reproject it")
            (i0, j0), (width, height) = s.cell, s.size
            res = grid.res
            transform = Affine(res, 0.0, grid.ox + i0 * res, 0.0, -res, grid.oy - j0 * res)
            reader = WarpedVRT(ds, src_crs=ds.crs or grid.crs, crs=grid.crs, transform=transform,
                               width=width, height=height, resampling=Resampling.nearest)
            nodata = s.nodata if s.masked else (reader.nodata,) * len(s.bands)
            gt = (0.0, res, 0.0, 0.0, 0.0, -res)

            def upper_left(col: int, row: int) -> tuple[float, float]:
                # from integer cell indices, so every file's tiles share the grid exactly
                return grid.ox + (i0 + col) * res, grid.oy - (j0 + row) * res
        try:
            for row in range(0, height, tile_size):
                h = min(tile_size, height - row)
                for col in range(0, width, tile_size):
                    w = min(tile_size, width - col)
                    window = Window(col, row, w, h)
                    arr = reader.read(indexes=list(s.bands), window=window)
                    if s.masked:
                        arr[:, reader.dataset_mask(window=window) == 0] = nodata[0]
                    bar.update(1)
                    if all(nd is not None and _all_nodata(arr[b], nd)
                           for b, nd in enumerate(nodata)):
                        counts.skipped += 1
                        continue
                    x, y = upper_left(col, row)
                    tile = wkb.from_array(arr, geotransform=(x, gt[1], gt[2], y, gt[4], gt[5]),
                                          srid=srid, nodata=nodata, pixel_types=types)
                    counts.written += 1
                    yield wkb.encode(tile), name
        except RasterioError as exc:
            raise errors.ConfigError(
                f"{s.path}: read failed: {first_line(exc.__cause__ or exc)}") from exc
        finally:
            if reader is not ds:
                reader.close()


def _ntiles(width: int, height: int, tile_size: int) -> int:
    return math.ceil(width / tile_size) * math.ceil(height / tile_size)


def import_raster(
    conn: psycopg.Connection,
    paths: Sequence[str | Path] | str | Path,
    table: str,
    *,
    srid: int | None = None,
    tile_size: int = 256,
    resolution: float | None = None,
    overwrite: bool = False,
    append: bool = False,
    progress: bool = True,
    force: bool = False,
    keep_alpha: bool = False,
) -> ImportReport:
    """Load raster files (globs allowed) into ``table`` as ``tile_size``² tiles.

    ``srid`` declares the SRID of files without a CRS and reprojects files in another CRS;
    ``resolution`` (target units per pixel) resamples onto a grid of that pixel size.
    ``overwrite`` replaces an existing table, ``append`` adds to it (on its grid, in its
    SRID); otherwise an existing table is an :class:`~pggeolearn.errors.AlreadyExists`.
    An alpha band or a GDAL mask marks NODATA (the alpha band is not imported) unless
    ``keep_alpha``, which imports the alpha band as a band like any other.
    Runs in one transaction (a savepoint when the caller has one open).
    """
    started = time.perf_counter()
    if not isinstance(tile_size, int) or not MIN_TILE <= tile_size <= MAX_TILE:
        raise errors.ConfigError(
            f"tile size must be an integer from {MIN_TILE} to {MAX_TILE}, got {tile_size!r}")
    if resolution is not None and not (math.isfinite(resolution) and resolution > 0):
        raise errors.ConfigError(f"resolution must be a positive number, got {resolution!r}")
    _common.check_mode(overwrite, append)
    schema, name, ident, display = _common.target(table)

    sources = [_read_source(p, keep_alpha) for p in expand_paths(paths)]
    first = sources[0]
    for s in sources[1:]:
        if len(s.dtypes) != len(first.dtypes):
            raise errors.ConfigError(f"{s.path} has {len(s.dtypes)} bands, {first.path} has "
                                     f"{len(first.dtypes)}: one table needs one band layout")
        if s.dtypes != first.dtypes:
            raise errors.ConfigError(f"{s.path} has pixel types {','.join(s.dtypes)}, "
                                     f"{first.path} has {','.join(first.dtypes)}")
    types = tuple(PIXEL_TYPE[d] for d in first.dtypes)

    with db_errors(f"import into {display}"), conn.transaction():
        appending = _common.prepare_target(conn, schema, name, ident, display,
                                           overwrite=overwrite, append=append, force=force)
        existing = _probe(conn, ident) if appending else None
        if existing is not None:
            ulx, uly, sx, sy, kx, ky, table_srid, table_types = existing
            if srid is not None and srid != table_srid:
                raise errors.SridMismatch(
                    f"table {display} has SRID {table_srid}, not {srid}")
            if tuple(table_types) != types:
                raise errors.ConfigError(
                    f"table {display} has bands {','.join(table_types)}, the files have "
                    f"{','.join(types)}")
            srid = table_srid
        target_srid = _target_srid(sources, srid)
        _common.check_srid(conn, target_srid)
        try:
            dst = CRS.from_epsg(target_srid)
        except CRSError as exc:
            raise errors.ConfigError(f"SRID {target_srid} is unknown to PROJ: {exc}") from exc

        grid = None
        if resolution is not None or any(_needs_warp(s, target_srid, dst) for s in sources):
            grid = _Grid(dst, 0.0)
            if existing is not None and abs(sx) == abs(sy) and kx == 0 == ky:
                grid.ox, grid.oy = ulx, uly  # stay on the table's grid
                grid.res = abs(sx)
            _plan_warp(sources, grid, resolution)
            pixel = (grid.res, grid.res)
            total = sum(_ntiles(*s.size, tile_size) for s in sources)
        else:
            sizes = {(abs(s.transform.a), abs(s.transform.e)) for s in sources}
            pixel = sizes.pop() if len(sizes) == 1 else None
            total = sum(_ntiles(s.width, s.height, tile_size) for s in sources)

        if not appending:
            conn.execute(sql.SQL(
                "CREATE TABLE {} (rid serial PRIMARY KEY, rast raster, filename text)"
            ).format(ident))
            conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN rast SET STORAGE {}").format(
                ident, sql.SQL(_STORAGE)))
            _common.mark(conn, schema, name, "import raster")
        else:  # constraints (extent above all) would reject the new tiles
            conn.execute("SELECT DropRasterConstraints(%s::name, %s::name, 'rast'::name)",
                         [schema, name])

        counts = _Counts()
        insert = sql.SQL(
            "INSERT INTO {} (rast, filename) VALUES (ST_RastFromWKB(%b), %s)").format(ident)
        with tqdm(total=total, unit="tile", desc=f"import {display}", disable=not progress,
                  leave=False) as bar:
            rows = (row for s in sources
                    for row in _tiles(s, target_srid, tile_size, grid, types, counts, bar))
            with conn.cursor() as cur:
                cur.executemany(insert, rows)

        conn.execute(sql.SQL(
            "CREATE INDEX IF NOT EXISTS {} ON {} USING gist (ST_ConvexHull(rast))").format(
            _common.index_name(name, "st_convexhull_idx"), ident))
        conn.execute(sql_text("raster_constraints"), {"schema": schema, "table": name, "column": "rast"})
        conn.execute(sql.SQL("ANALYZE {}").format(ident))
        security.grant_quietly(conn, schema, name)  # recipe SQL may read what pggeolearn imported
        info = conn.execute(sql_text("import_raster_columns"),
                            {"schema": schema, "table": name}).fetchone()

    return ImportReport(
        table=display, files=len(sources), tiles=counts.written, skipped=counts.skipped,
        srid=target_srid, resolution=pixel, bands=len(types), pixel_types=types,
        reprojected=grid is not None, aligned=bool(info and info[5]), appended=appending,
        seconds=time.perf_counter() - started,
    )
