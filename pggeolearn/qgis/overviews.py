"""Overview tables of a raster table, built so that QGIS and GDAL can read them.

PostGIS's ``ST_CreateOverview`` (``ST_Retile``) computes every target tile with floating-point
envelopes, ``ST_Clip`` and ``ST_Union``: on grids whose origin or pixel size is not a round
number it writes 1-pixel slivers, 257-pixel tiles and empty rasters (width 0, SRID 0) for
source tiles that only touch the target, so GDAL refuses the table ("tiles with different
srid") and QGIS draws nothing zoomed out. Here every overview is computed on the client, on
integer pixel indices of the base grid:

* the overview grid has the base grid's upper-left corner, ``factor`` times its pixel size,
  ``ceil(width / factor)`` x ``ceil(height / factor)`` pixels, cut into tiles of the base
  table's block size (edge tiles smaller);
* each overview tile is pasted from the base tiles under it and reduced by ``nearest`` (the
  pixel at the centre of each ``factor`` x ``factor`` block, what gdaladdo's nearest picks:
  class rasters keep their values) or ``average`` (the mean of the valid pixels, for
  continuous values such as probabilities);
* tiles whose pixels are all NODATA (or that no base tile covers) are not written, like
  raster2pgsql; every tile written has the base's SRID, bands, pixel types and NODATA;
* the table ``o_<factor>_<name>`` gets a primary key, a GiST index on ``ST_ConvexHull``, the
  raster constraints and ``AddOverviewConstraints`` (so it is listed in ``raster_overviews``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg import sql

from pggeolearn import errors, wkb
from pggeolearn.db.names import split_table
from pggeolearn.importers._common import index_name
from pggeolearn.resources import sql_text

__all__ = ["METHODS", "BaseGrid", "base_grid", "block_size_first", "build_overview", "overview_name"]

METHODS = ("nearest", "average")
# ST_CreateOverview's algorithm names, accepted for the callers that pass them
_ALIASES = {"nearestneighbour": "nearest", "nearest": "nearest", "average": "average",
            "bilinear": "average", "cubic": "average", "cubicspline": "average", "lanczos": "average"}


@dataclass(frozen=True)
class BaseGrid:
    """The pixel grid every tile of a raster table lies on."""

    srid: int
    ulx: float
    uly: float
    scale_x: float
    scale_y: float
    width: int  # pixels
    height: int
    block_x: int
    block_y: int
    bands: int
    pixel_types: tuple[str, ...]
    nodata: tuple[float | None, ...]


def overview_name(name: str, factor: int) -> str:
    """``o_<factor>_<name>``, as ST_CreateOverview names it (and QGIS expects nothing else)."""
    out = f"o_{int(factor)}_{name}"
    if len(out.encode()) > 63:
        raise errors.ConfigError(f"overview table name {out!r} is longer than 63 bytes: "
                                 "shorten the table name")
    return out


def base_grid(conn: psycopg.Connection, table: str, column: str = "rast") -> BaseGrid | None:
    """The grid of ``table`` from its tiles (None for an empty table); tiles must share SRID,
    pixel size, bands and alignment, and be neither skewed nor south-up."""
    schema, name = split_table(table)
    row = conn.execute(sql.SQL(sql_text("overview_base_grid")).format(
        table=sql.Identifier(schema, name), col=sql.Identifier(column))).fetchone()
    if row is None or row[0] == 0:
        return None
    (n, n_srid, n_scale, n_skew, n_bands, aligned, srid, sx, sy, ulx, uly, maxx, miny,
     bx, by, nb, types, nodata) = row
    what = f"{schema}.{name}.{column}"
    if n_srid != 1 or n_scale != 1 or n_bands != 1 or not aligned:
        raise errors.ConfigError(f"{what}: overviews need every tile on one grid (one SRID, pixel "
                                 "size, band layout and alignment)")
    if n_skew or sx <= 0 or sy >= 0:
        raise errors.ConfigError(f"{what}: overviews need north-up rasters without skew")
    width = round((maxx - ulx) / sx)
    height = round((miny - uly) / sy)
    return BaseGrid(srid, ulx, uly, sx, sy, width, height, bx, by, nb, tuple(types),
                    tuple(None if v is None else float(v) for v in nodata))


def block_size_first(conn: psycopg.Connection, table: str, column: str = "rast") -> None:
    """Rewrite the width/height constraints AddRasterConstraints made with the largest size
    first: raster_columns reports the first as the block size, and AddRasterConstraints
    orders by how many tiles have each size, so an overview with as many edge tiles as whole
    ones could report a 1-pixel block size."""
    schema, name = split_table(table)
    ident, col = sql.Identifier(schema, name), sql.Identifier(column)
    for axis in ("width", "height"):
        fn = sql.SQL(f"ST_{axis.capitalize()}")
        sizes = [r[0] for r in conn.execute(sql.SQL("SELECT DISTINCT {}({}) FROM {} ORDER BY 1 DESC").format(
            fn, col, ident))]
        if not sizes:
            continue
        cname = sql.Identifier(f"enforce_{axis}_{column}")
        conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(ident, cname))
        conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({}({}) = ANY (ARRAY[{}]))").format(
            ident, cname, fn, col, sql.SQL(", ").join(map(sql.Literal, sizes))))


def _reduce(canvas: np.ndarray, valid: np.ndarray, factor: int, method: str,
            fill: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(bands, h*f, w*f)`` -> ``(bands, h, w)`` and the mask of pixels with a value."""
    b, hh, ww = canvas.shape
    h, w = hh // factor, ww // factor
    if method == "nearest":
        k = factor // 2
        return canvas[:, k::factor, k::factor], valid[k::factor, k::factor]
    blocks = canvas.reshape(b, h, factor, w, factor).astype(np.float64)
    vb = valid.reshape(h, factor, w, factor)
    count = vb.sum(axis=(1, 3))
    total = (blocks * vb[None]).sum(axis=(2, 4))
    mean = total / np.maximum(count, 1)[None]
    out = np.where(count[None] > 0, mean, fill[:, None, None])
    if np.issubdtype(canvas.dtype, np.integer):
        info = np.iinfo(canvas.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(canvas.dtype), count > 0


def build_overview(conn: psycopg.Connection, table: str, factor: int, *, column: str = "rast",
                   method: str = "nearest", grid: BaseGrid | None = None) -> tuple[str, int]:
    """Write the overview table of ``table`` at ``factor`` (replacing it); return its
    ``schema.name`` and the number of tiles written. Runs in the caller's transaction."""
    method = _ALIASES.get(method.lower())
    if method is None:
        raise errors.ConfigError(f"overview method must be one of {', '.join(METHODS)}")
    if not isinstance(factor, int) or not 2 <= factor <= 256:
        raise errors.ConfigError(f"overview factor must be an integer 2..256, not {factor!r}")
    schema, name = split_table(table)
    oname = overview_name(name, factor)
    grid = grid or base_grid(conn, table, column)
    base = sql.Identifier(schema, name)
    target = sql.Identifier(schema, oname)
    col = sql.Identifier(column)
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(target))
    conn.execute(sql.SQL("CREATE TABLE {} (rid integer PRIMARY KEY, {} raster)").format(target, col))
    written = 0
    if grid is not None:
        written = _fill(conn, base, target, col, grid, factor, method)
    conn.execute(sql.SQL("CREATE INDEX {} ON {} USING gist (ST_ConvexHull({}))").format(
        index_name(oname, "st_convexhull_idx"), target, col))
    if written:
        conn.execute(sql_text("raster_constraints"), {"schema": schema, "table": oname, "column": column})
        block_size_first(conn, f"{schema}.{oname}", column)
    conn.execute("SELECT AddOverviewConstraints(%s::name, %s::name, %s::name, %s::name, %s::name,"
                 " %s::name, %s::integer)", [schema, oname, column, schema, name, column, factor])
    return f"{schema}.{oname}", written


def _fill(conn: psycopg.Connection, base: sql.Identifier, target: sql.Identifier,
          col: sql.Identifier, g: BaseGrid, factor: int, method: str) -> int:
    ow, oh = math.ceil(g.width / factor), math.ceil(g.height / factor)
    tw, th = g.block_x, g.block_y
    fill = np.array([0 if v is None else v for v in g.nodata], np.float64)
    fetch = sql.SQL(sql_text("overview_source_tiles")).format(table=base, col=col)
    insert = sql.SQL("INSERT INTO {} (rid, {}) VALUES (%s, ST_RastFromWKB(%b))").format(target, col)
    osx, osy = g.scale_x * factor, g.scale_y * factor
    rid = 0
    with conn.cursor() as cur:
        for ty in range(math.ceil(oh / th)):
            for tx in range(math.ceil(ow / tw)):
                w, h = min(tw, ow - tx * tw), min(th, oh - ty * th)
                # the base pixels under this overview tile: [c0, c0 + w*f) x [r0, r0 + h*f)
                c0, r0 = tx * tw * factor, ty * th * factor
                env = (g.ulx + c0 * g.scale_x, g.uly + (r0 + h * factor) * g.scale_y,
                       g.ulx + (c0 + w * factor) * g.scale_x, g.uly + r0 * g.scale_y)
                tile = _tile(conn, fetch, env, g, c0, r0, w * factor, h * factor, factor, method, fill)
                if tile is None:
                    continue
                gt = (g.ulx + tx * tw * osx, osx, 0.0, g.uly + ty * th * osy, 0.0, osy)
                t = wkb.from_array(tile, geotransform=gt, srid=g.srid, nodata=list(g.nodata),
                                   pixel_types=list(g.pixel_types))
                cur.execute(insert, [rid, wkb.encode(t)])
                rid += 1
    return rid


def _tile(conn: psycopg.Connection, fetch: sql.Composed, env: tuple[float, float, float, float],
          g: BaseGrid, c0: int, r0: int, w: int, h: int, factor: int, method: str,
          fill: np.ndarray) -> np.ndarray | None:
    """The reduced pixels of one overview tile, or None when it would hold no value."""
    # shrink the envelope by half a pixel so tiles that only touch it are not fetched
    hx, hy = abs(g.scale_x) / 2, abs(g.scale_y) / 2
    rows = conn.execute(fetch, {"minx": env[0] + hx, "miny": env[1] + hy, "maxx": env[2] - hx,
                                "maxy": env[3] - hy, "srid": g.srid}, binary=True).fetchall()
    if not rows:
        return None
    canvas: np.ndarray | None = None
    valid = np.zeros((h, w), bool)
    for (buf,) in rows:
        t = wkb.decode(buf)
        if canvas is None:
            canvas = np.empty((g.bands, h, w), t.data.dtype.newbyteorder("="))
            canvas[:] = fill.astype(canvas.dtype)[:, None, None]
        col = round((t.upper_left[0] - g.ulx) / g.scale_x) - c0
        row = round((t.upper_left[1] - g.uly) / g.scale_y) - r0
        a0, b0 = max(row, 0), max(col, 0)
        a1, b1 = min(row + t.height, h), min(col + t.width, w)
        if a0 >= a1 or b0 >= b1:
            continue
        src = t.data[:, a0 - row:a1 - row, b0 - col:b1 - col]
        canvas[:, a0:a1, b0:b1] = src
        ok = np.ones(src.shape[1:], bool)
        for i, nd in enumerate(g.nodata):
            if nd is not None:
                ok &= src[i] != nd
        valid[a0:a1, b0:b1] = ok
    if canvas is None or not valid.any():
        return None
    out, ok = _reduce(canvas, valid, factor, method, fill)
    if not ok.any():
        return None
    for i, nd in enumerate(g.nodata):
        if nd is not None:
            out[i][~ok] = nd
    return np.ascontiguousarray(out)
