"""Planning a run before anything is written: the output tables' names, the imagery (probed
for its CRS, pixel size and pixel types), and the output grid. **The grid is the model's**
(CRS and pixel size; other imagery is reprojected/resampled onto it, nearest neighbour), its
origin snapped to (in order) the table being appended to, the dataset's grid, the imagery's own
grid (same CRS and pixel size: no resampling at all) or multiples of the pixel size."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import psycopg
from psycopg import sql

from pggeolearn import errors, outputs
from pggeolearn.db.errors import db_errors
from pggeolearn.db.tables import TableName, overview_prefix
from pggeolearn.predict.grid import Grid, snap_grid
from pggeolearn.predict.model import Predictor, check_pixel_types
from pggeolearn.predict.options import PredictOptions
from pggeolearn.predict.source import Imagery, imagery_of, user_imagery

__all__ = ["OutputNames", "Plan", "make_plan", "output_names", "outputs_of", "relkind"]


@dataclass
class OutputNames:
    """(schema, name) of the class raster, the probability raster and the polygon table."""

    out: tuple[str, str]
    prob: tuple[str, str] | None
    polygons: tuple[str, str] | None

    @staticmethod
    def show(t: tuple[str, str] | None) -> str | None:
        return f"{t[0]}.{t[1]}" if t else None


@dataclass
class Plan:
    """What a run will do: the model, the output grid and tiles, the imagery to read."""

    predictor: Predictor
    model_name: str
    grid: Grid
    tile_px: int
    imagery: Imagery
    needed_tiles: np.ndarray  # (tile rows, tile cols) bool
    dataset: str | None = None
    split: str | None = None
    notes: list[str] = field(default_factory=list)


def output_names(out: str, polygons: str | None, probabilities: bool, vectorize: bool,
                 overviews: Sequence[int] = ()) -> OutputNames:
    """The output tables, each name validated (63 bytes, with the overview prefix for rasters)."""
    o = TableName.parse(out, reserve=overview_prefix(overviews))
    prob = o.sibling("_prob").fits(overview_prefix(overviews)) if probabilities else None
    poly = None
    if vectorize:
        poly = TableName.parse(polygons, o.schema) if polygons else o.sibling("_polygons")
    return OutputNames(o.parts, prob.parts if prob else None, poly.parts if poly else None)


def outputs_of(names: OutputNames, overviews: Sequence[int]) -> list[outputs.Output]:
    """The output tables, for :func:`pggeolearn.outputs.check`."""
    return [outputs.Output(TableName(*t), ov, what) for t, ov, what in (
        (names.out, overviews, "--out"), (names.prob, overviews, "the probability raster"),
        (names.polygons, (), "the polygon table")) if t]


def _transform_extent(conn: psycopg.Connection, extent: Sequence[float], src: int, dst: int
                      ) -> tuple[float, float, float, float]:
    minx, miny, maxx, maxy = (float(v) for v in extent)
    if not (maxx > minx and maxy > miny):
        raise errors.ConfigError(f"empty extent {tuple(extent)} (give MINX MINY MAXX MAXY)")
    if src == dst:
        return minx, miny, maxx, maxy
    with db_errors(f"extent from EPSG:{src} to EPSG:{dst}"):
        row = conn.execute(
            "SELECT ST_XMin(b), ST_YMin(b), ST_XMax(b), ST_YMax(b) FROM (SELECT ST_Transform("
            "ST_Segmentize(ST_MakeEnvelope(%s, %s, %s, %s, %s::integer), %s), %s::integer)::box2d AS b) s",
            [minx, miny, maxx, maxy, src, max(maxx - minx, maxy - miny) / 32, dst]).fetchone()
    return tuple(float(v) for v in row)  # type: ignore[return-value]


def _check_srid(conn: psycopg.Connection, srid: int, what: str) -> None:
    if not conn.execute("SELECT 1 FROM spatial_ref_sys WHERE srid = %s", [srid]).fetchone():
        raise errors.SridMismatch(f"{what} EPSG:{srid} is not in spatial_ref_sys")


def _existing_grid(conn: psycopg.Connection, schema: str, name: str) -> tuple | None:
    return conn.execute(
        sql.SQL("SELECT ST_SRID(rast), ST_ScaleX(rast), ST_UpperLeftX(rast), ST_UpperLeftY(rast)"
                " FROM {} LIMIT 1").format(sql.Identifier(schema, name))).fetchone()


def relkind(conn: psycopg.Connection, schema: str, name: str) -> str | None:
    """``pg_class.relkind`` of ``schema.name`` ('r', 'v', ...), None when there is none."""
    row = conn.execute("SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                       " WHERE n.nspname = %s AND c.relname = %s", [schema, name]).fetchone()
    return row[0] if row else None


def _dataset_grid(conn: psycopg.Connection, p: Predictor, srid: int, res: float,
                  notes: list[str]) -> tuple[tuple[float, float], float] | None:
    """The grid origin and exact resolution of the dataset the model was trained on, when
    that grid is the model's (same CRS and pixel size): predictions fall on the chips' pixels."""
    name = getattr(getattr(p, "record", None), "dataset", None)
    if not name:
        return None
    row = conn.execute("SELECT srid, resolution, minx, maxy FROM pggeolearn.datasets WHERE name = %s",
                       [name]).fetchone()
    if row is None or row[0] != srid or abs(row[1] - res) > 1e-6 * res:
        return None
    notes.append(f"on dataset {name}'s grid (origin {row[2]:.6f}, {row[3]:.6f}, {row[1]:.6g} "
                 "units/px), like its chips")
    return (float(row[2]), float(row[3])), float(row[1])


def make_plan(conn: psycopg.Connection, p: Predictor, model_name: str, opts: PredictOptions,
              names: OutputNames) -> Plan:
    """The plan of predicting ``opts``' area with ``p``; errors a user can cause are one line."""
    import shapely

    extent, dataset, split, imagery = opts.extent, opts.dataset, opts.split, opts.imagery
    srid, res = int(p.srid), float(p.resolution)
    _check_srid(conn, srid, "the model's CRS")
    notes: list[str] = []
    region = None
    anchor: tuple[float, float] | None = None
    if dataset is not None:
        from pggeolearn import datasets

        ds = datasets.get(conn, dataset)
        if imagery is None:
            source = user_imagery(ds.recipe.image_sql, f"dataset {dataset}'s image SQL")
        else:
            source = imagery_of(conn, imagery)
        with db_errors(f"chips of {dataset}"):
            row = conn.execute(
                "SELECT ST_AsBinary(ST_Transform(ST_Union(geom), %s::integer)), count(*)"
                " FROM pggeolearn.chips WHERE dataset = %s AND split = %s AND image IS NOT NULL",
                [srid, dataset, split]).fetchone()
        if not row[1]:
            raise errors.NotBuilt(f"dataset {dataset} has no chips with imagery in split {split!r} "
                                  "(pggeolearn chips build)")
        region = shapely.from_wkb(row[0])
        ext = region.bounds
        if ds.recipe.srid == srid and abs(ds.recipe.resolution - res) <= 1e-6 * res:
            anchor, res = (ds.recipe.extent[0], ds.recipe.extent[3]), float(ds.recipe.resolution)
        elif ds.recipe.srid != srid:
            notes.append(f"dataset {dataset} is in EPSG:{ds.recipe.srid}; its {split} chips' "
                         f"area is predicted on the model's EPSG:{srid} grid")
    else:
        if imagery is None:
            raise errors.ConfigError("give the imagery (a raster table or SQL) to predict on")
        source = imagery_of(conn, imagery)
        if extent is None:
            raise errors.ConfigError("give an extent (MINX MINY MAXX MAXY) or a dataset")
        src = int(opts.extent_srid or srid)
        _check_srid(conn, src, "the extent's CRS")
        ext = _transform_extent(conn, extent, src, srid)
        if src != srid:
            notes.append(f"extent given in EPSG:{src} was transformed to the model's EPSG:{srid}")
    if opts.grid_origin is not None:
        anchor = (float(opts.grid_origin[0]), float(opts.grid_origin[1]))
        notes.append(f"grid origin ({anchor[0]:.6f}, {anchor[1]:.6f}) as asked")
    elif anchor is None:
        found = _dataset_grid(conn, p, srid, res, notes)
        if found is not None:
            anchor, res = found

    if opts.append:
        schema, name = names.out
        if relkind(conn, schema, name) is not None:
            got = _existing_grid(conn, schema, name)
            if got is not None:
                if got[0] != srid or abs(abs(got[1]) - res) > 1e-6 * res:
                    raise errors.SridMismatch(
                        f"cannot append to {schema}.{name}: it is EPSG:{got[0]} at {abs(got[1]):.6g}, "
                        f"the model predicts EPSG:{srid} at {res:.6g}")
                anchor, res = (got[2], got[3]), abs(float(got[1]))

    label = source.label
    probe = source.probe(conn, ext, srid, res, opts.timeout_s)
    i_srid, sx, sy, kx, ky, ulx, uly, nbands, types = probe
    if i_srid == 0:
        raise errors.SridMismatch(f"{label} returns rasters with SRID 0: set their SRID first")
    if nbands < p.bands:
        raise errors.ConfigError(f"{label} has {nbands} band(s); model {model_name} needs {p.bands}")
    check_pixel_types(p, model_name, types, label)
    same_grid = (i_srid == srid and kx == 0 and ky == 0 and abs(abs(sx) - res) <= 1e-6 * res
                 and abs(abs(sy) - res) <= 1e-6 * res)
    if i_srid != srid:
        notes.append(f"imagery in EPSG:{i_srid} is reprojected onto the model's grid "
                     f"(EPSG:{srid}, {res:.6g} units/px, nearest neighbour)")
    elif not same_grid:
        notes.append(f"imagery at {abs(sx):.6g} x {abs(sy):.6g} units/px is resampled onto the "
                     f"model's {res:.6g} units/px (nearest neighbour)")
    elif anchor is None:
        anchor, res = (ulx, uly), abs(float(sx))  # the imagery's own grid: nothing resampled
    grid = snap_grid(ext, res, srid, anchor or (0.0, 0.0))
    needed = _needed_tiles(grid, opts.tile_px, region)
    return Plan(p, model_name, grid, opts.tile_px, source, needed, dataset, split, notes)


def _needed_tiles(grid: Grid, tile_px: int, region) -> np.ndarray:
    """(tile rows, tile cols) bool: every output tile, or with ``region`` (a dataset split's
    chips) those it overlaps by more than a quarter pixel."""
    import shapely

    res = grid.res
    nty, ntx = math.ceil(grid.height / tile_px), math.ceil(grid.width / tile_px)
    needed = np.ones((nty, ntx), bool)
    if region is not None:
        boxes = [shapely.box(grid.x0 + i * tile_px * res, grid.y0 - min((j + 1) * tile_px, grid.height) * res,
                             grid.x0 + min((i + 1) * tile_px, grid.width) * res, grid.y0 - j * tile_px * res)
                 for j in range(nty) for i in range(ntx)]
        shapely.prepare(region)
        hits = shapely.intersects(region, shapely.buffer(np.array(boxes), -0.25 * res, join_style="mitre"))
        needed = np.asarray(hits, bool).reshape(nty, ntx)
    return needed
