"""Dataset recipes: a grid, image SQL, label SQL and classes, stored in ``pggeolearn.datasets``.

The SQL a user writes sees a one-row relation ``tile`` with columns ``tile_id``, ``tile_geom``
(the tile's envelope in the grid CRS), ``tile_rast`` (an empty reference raster of the tile),
``tile_srid`` and ``tile_res``, joined LATERAL so the query may name them without a FROM
entry; the prefixes keep them from clashing with the user's columns. Image SQL returns rasters
in a column ``rast``; label SQL returns rows
``(geom, class_id [, buffer_m])``. Both are checked here (one statement, right columns, they run
on a sample tile) before anything is stored, inside READ ONLY transactions.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pggeolearn import crs_hints, errors
from pggeolearn.db import usersql
from pggeolearn.db.errors import db_errors, first_line
from pggeolearn.db.names import split_table
from pggeolearn.db.schema import require_schema

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
INT_TYPES = {"int2", "int4", "int8"}
# image_tile's resampling methods; nearest (the default) keeps source values exact in every
# pixel type and never mixes NODATA into valid pixels
RESAMPLING = ("nearest", "bilinear", "cubic")
NUMBER_TYPES = INT_TYPES | {"float4", "float8", "numeric"}
TILE_CTE = """WITH tile AS (
    SELECT g.tile_id, g.geom AS tile_geom, g.ref_rast AS tile_rast, %(srid)s::integer AS tile_srid,
           %(resolution)s::float8 AS tile_res
    FROM pggeolearn.tile_grid(%(srid)s, %(resolution)s, %(tile_px)s, %(minx)s, %(miny)s,
                              %(maxx)s, %(maxy)s, %(overlap_px)s) g
    WHERE g.tile_id = %(tile_id)s)
"""
WHOLE_EXTENT_CTE = """WITH tile AS (
    SELECT -1 AS tile_id, ST_MakeEnvelope(%(minx)s, %(miny)s, %(maxx)s, %(maxy)s, %(srid)s) AS tile_geom,
           ST_MakeEmptyRaster(1, 1, %(minx)s, %(maxy)s, %(maxx)s - %(minx)s, %(miny)s - %(maxy)s,
                              0, 0, %(srid)s) AS tile_rast,
           %(srid)s::integer AS tile_srid, %(resolution)s::float8 AS tile_res)
"""


@dataclass
class Recipe:
    """What a dataset is made of. ``extent`` is (minx, miny, maxx, maxy) in the grid's CRS;
    ``extent_from`` names a raster or geometry table whose extent to use instead."""

    name: str
    srid: int
    resolution: float
    image_sql: str
    label_sql: str
    classes: dict[int, str]
    tile_px: int = 256
    overlap_px: int = 0
    extent: tuple[float, float, float, float] | None = None
    extent_from: str | None = None
    all_touched: bool = False
    resampling: str = "nearest"  # how image_tile samples imagery: nearest, bilinear, cubic

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> Recipe:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise errors.ConfigError(f"recipe file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise errors.ConfigError(f"{path}: not valid TOML: {exc}") from exc
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise errors.ConfigError(f"unknown recipe keys: {', '.join(sorted(unknown))}")
        missing = {"name", "srid", "resolution", "image_sql", "label_sql", "classes"} - set(data)
        if missing:
            raise errors.ConfigError(f"recipe is missing: {', '.join(sorted(missing))}")
        data = dict(data)
        data["classes"] = parse_classes(data["classes"])
        if data.get("extent") is not None:
            data["extent"] = tuple(float(v) for v in data["extent"])
        return cls(**data)

    def validate(self) -> None:
        if not NAME_RE.match(self.name or ""):
            raise errors.ConfigError(
                f"bad dataset name {self.name!r}: letters, digits, '_', '.', '-' (max 63)")
        if not self.resolution or self.resolution <= 0:
            raise errors.ConfigError("resolution must be > 0")
        if not 8 <= self.tile_px <= 4096:
            raise errors.ConfigError("tile size must be between 8 and 4096 pixels")
        if not 0 <= self.overlap_px < self.tile_px:
            raise errors.ConfigError("overlap must be >= 0 and smaller than the tile size")
        if (self.extent is None) == (self.extent_from is None):
            raise errors.ConfigError("give exactly one of extent (minx miny maxx maxy) or extent_from (a table)")
        if self.extent is not None:
            minx, miny, maxx, maxy = self.extent
            if not (maxx > minx and maxy > miny):
                raise errors.ConfigError(f"empty extent {self.extent}")
        if self.resampling not in RESAMPLING:
            raise errors.ConfigError(f"unknown resampling {self.resampling!r}: "
                                     f"one of {', '.join(RESAMPLING)}")
        if not self.classes:
            raise errors.ConfigError("at least one class is needed (e.g. classes = {1 = 'road'})")

    def content(self) -> dict[str, Any]:
        """Everything that decides the chips' pixels (what the hash covers); not the name."""
        d = asdict(self)
        d.pop("name")
        d["resolution"] = float(self.resolution)
        if self.extent is not None:  # (0, 0, 1, 1) and (0.0, 0.0, 1.0, 1.0) are one recipe
            d["extent"] = [float(v) for v in self.extent]
        d["classes"] = {str(k): v for k, v in sorted(self.classes.items())}
        if self.resampling == "nearest":  # the default: recipes made before it keep their hash
            d.pop("resampling")
        return d

    def digest(self) -> str:
        blob = json.dumps(self.content(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_classes(value: Any) -> dict[int, str]:
    """``{1: 'road'}``, ``{'1': 'road'}`` or ``'1=road,2=building'`` -> ``{1: 'road', 2: ...}``."""
    if isinstance(value, str):
        pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise errors.ConfigError(f"classes must look like 1=road,2=building, not {value!r}")
        value = {k.strip(): v.strip() for k, v in pairs}
    out: dict[int, str] = {}
    for k, v in dict(value).items():
        try:
            cid = int(k)
        except (TypeError, ValueError):
            raise errors.ConfigError(f"class id {k!r} is not an integer") from None
        if not 1 <= cid <= 255:
            raise errors.ConfigError(f"class id {cid} is outside 1..255 (0 is the background)")
        out[cid] = str(v)
    return dict(sorted(out.items()))


@dataclass
class Dataset:
    """A stored recipe plus what was learned when it was created."""

    recipe: Recipe
    recipe_hash: str
    ncols: int
    nrows: int
    label_columns: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stats: dict[str, Any] | None = None
    version: int = 1

    @property
    def name(self) -> str:
        """The catalog row's name: ``NAME`` for the current version, ``NAME@N`` for an old one
        (the chips of version N are stored under that name)."""
        return self.recipe.name

    @property
    def base(self) -> str:
        """The dataset's name, without a version."""
        return self.name.split("@", 1)[0]

    @property
    def ref(self) -> str:
        """``NAME@N``: this version, whatever versions come later."""
        return f"{self.base}@{self.version}"

    @property
    def is_current(self) -> bool:
        return self.name == self.base

    @property
    def n_tiles(self) -> int:
        return self.ncols * self.nrows

    def describe(self) -> str:
        r = self.recipe
        minx, miny, maxx, maxy = r.extent
        lines = [
            f"dataset {self.base} version {self.version} (recipe {self.recipe_hash})"
            + ("" if self.is_current else f": an old version, its chips stored as {self.name}"),
            f"grid: EPSG:{r.srid}, {r.resolution:g} units/px, {r.tile_px}px tiles"
            + (f", overlap {r.overlap_px}px" if r.overlap_px else "")
            + f", {self.ncols} x {self.nrows} = {self.n_tiles} tiles",
            f"extent: {minx:.3f} {miny:.3f} {maxx:.3f} {maxy:.3f}",
            "classes: 0=background, " + ", ".join(f"{k}={v}" for k, v in r.classes.items()),
            f"rasterization: {'all touched' if r.all_touched else 'pixel centre'}; "
            "overlaps: the higher class id wins; imagery resampling: " + r.resampling,
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def grid_shape(recipe: Recipe) -> tuple[int, int]:
    """(ncols, nrows) exactly as pggeolearn.tile_grid computes them."""
    import math

    minx, miny, maxx, maxy = recipe.extent
    size = recipe.tile_px * recipe.resolution
    stride = (recipe.tile_px - recipe.overlap_px) * recipe.resolution
    ncols = max(1, math.ceil(((maxx - minx) - size) / stride - 1e-9) + 1)
    nrows = max(1, math.ceil(((maxy - miny) - size) / stride - 1e-9) + 1)
    return ncols, nrows


def _extent_from_table(conn: psycopg.Connection, table: str, srid: int) -> tuple[float, ...]:
    schema, name = split_table(table)
    row = conn.execute(
        "SELECT r_raster_column FROM raster_columns WHERE r_table_schema = %s AND r_table_name = %s",
        [schema, name]).fetchone()
    if row:
        expr = sql.SQL("ST_Envelope({})").format(sql.Identifier(row[0]))
    else:
        row = conn.execute(
            "SELECT f_geometry_column FROM geometry_columns WHERE f_table_schema = %s AND f_table_name = %s",
            [schema, name]).fetchone()
        if not row:
            raise errors.NotFound(f"table {schema}.{name} has no raster or geometry column "
                                  "(is it in raster_columns / geometry_columns?)")
        expr = sql.Identifier(row[0])
    query = sql.SQL(
        "SELECT ST_XMin(e), ST_YMin(e), ST_XMax(e), ST_YMax(e) FROM ("
        "SELECT ST_Extent(ST_Transform({expr}, %s::integer)) AS e FROM {table}) s"
    ).format(expr=expr, table=sql.Identifier(schema, name))
    with db_errors(f"extent of {table}"):
        ext = conn.execute(query, [srid]).fetchone()
    if ext is None or ext[0] is None:
        raise errors.ConfigError(f"table {table} is empty: no extent to take")
    return tuple(float(v) for v in ext)


def _type_names(conn: psycopg.Connection, oids: list[int]) -> list[str]:
    rows = conn.execute("SELECT oid, typname FROM pg_type WHERE oid = ANY(%s)", [oids]).fetchall()
    names = dict(rows)
    return [names.get(o, "?") for o in oids]


def _describe(conn: psycopg.Connection, kind: str, user_sql: str, params: dict) -> dict[str, str]:
    """Column name -> type name of a recipe query, planned but not run (LIMIT 0)."""
    query = usersql.embed(TILE_CTE + "SELECT q.* FROM tile, LATERAL ({user}) AS q", user=user_sql)
    try:
        with usersql.sandbox(conn):
            desc = usersql.describe(conn, query, params)  # parsed, never run
    except psycopg.Error as exc:
        raise _recipe_error(exc, f"{kind} SQL fails") from exc
    names = [n for n, _ in desc]
    return dict(zip(names, _type_names(conn, [t for _, t in desc]), strict=True))


def _recipe_error(exc: psycopg.Error, context: str) -> errors.PggeolearnError:
    hint = usersql.permission_hint(exc)
    return errors.RecipeError(f"{context}: {hint or first_line(exc)}")


def _check_columns(image_cols: dict[str, str], label_cols: dict[str, str]) -> None:
    if image_cols.get("rast") != "raster":
        raise errors.RecipeError(
            f"image SQL must return a raster column named rast; it returns {_fmt(image_cols)}")
    if label_cols.get("geom") != "geometry":
        raise errors.RecipeError(
            f"label SQL must return a geometry column named geom; it returns {_fmt(label_cols)}")
    if label_cols.get("class_id") not in INT_TYPES:
        raise errors.RecipeError(
            "label SQL must return an integer column class_id (smallint/integer/bigint); "
            f"it returns {_fmt(label_cols)}")
    if "buffer_m" in label_cols and label_cols["buffer_m"] not in NUMBER_TYPES:
        raise errors.RecipeError(f"label SQL column buffer_m must be numeric, not {label_cols['buffer_m']}")


def _fmt(cols: dict[str, str]) -> str:
    return "(" + ", ".join(f"{k} {v}" for k, v in cols.items()) + ")"


def _source_srids(conn, kind: str, user_sql: str, expr: str, params: dict) -> list[int]:
    """SRIDs the recipe query returns over the whole extent (none: it returns nothing there)."""
    query = usersql.embed(WHOLE_EXTENT_CTE + "SELECT DISTINCT ST_SRID(q.{col}) FROM ("
                          "SELECT q0.* FROM tile, LATERAL ({user}) AS q0 LIMIT 1000) AS q",
                          {"col": sql.Identifier(expr)}, user=user_sql)
    try:
        with usersql.sandbox(conn):
            rows = usersql.rows(conn, query, params, [("srid", "integer")])
            return [r[0] for r in rows if r[0] is not None]
    except psycopg.Error as exc:
        raise _recipe_error(exc, f"{kind} SQL fails over the extent") from exc


def _no_rows_hint(conn, user_sql: str, params: dict, srid: int, column: str) -> str:
    """The SRIDs of the tables the query reads next to the grid's, and the fix (crs_hints)."""
    query = usersql.embed(WHOLE_EXTENT_CTE + "SELECT q0.* FROM tile, LATERAL ({user}) AS q0",
                          user=user_sql)
    return crs_hints.no_rows_hint(conn, query, params, srid, column)


def _image_bands(conn, user_sql: str, params: dict) -> list[dict[str, Any]]:
    """Pixel type and nodata of each band of the first raster the image SQL returns."""
    query = usersql.embed(WHOLE_EXTENT_CTE + "SELECT (ST_BandMetaData(q.rast, b)).pixeltype,"
                          " (ST_BandMetaData(q.rast, b)).nodatavalue, ST_ScaleX(q.rast), ST_SRID(q.rast) FROM ("
                          "SELECT q0.rast FROM tile, LATERAL ({user}) AS q0 WHERE q0.rast IS NOT NULL"
                          " LIMIT 1) AS q, generate_series(1, ST_NumBands(q.rast)) AS b ORDER BY b",
                          user=user_sql)
    try:
        with usersql.sandbox(conn):
            rows = usersql.rows(conn, query, params, [("pixeltype", "text"), ("nodata", "float8"),
                                                      ("scale", "float8"), ("srid", "integer")])
    except psycopg.Error as exc:
        raise _recipe_error(exc, "image SQL fails over the extent") from exc
    return [{"pixeltype": p, "nodata": n, "scale": sx, "srid": srid} for p, n, sx, srid in rows]


def _check_label_values(conn, recipe: Recipe, params: dict, has_buffer: bool) -> None:
    """Over the whole extent (one query, no PostGIS call on the values): every class id is
    declared in ``classes`` and every ``buffer_m`` is a finite number of metres in range."""
    buf = "q.buffer_m::float8" if has_buffer else "0::float8"
    query = usersql.embed(
        WHOLE_EXTENT_CTE + "SELECT array_agg(DISTINCT q.class_id::bigint) FILTER (WHERE q.geom IS NOT NULL),"
        " (array_agg(" + buf + "::text) FILTER (WHERE NOT (" + buf + " BETWEEN 0 AND {limit})))[1],"
        " (array_agg(ST_AsText(ST_Transform(ST_PointOnSurface(ST_Force2D(q.geom)), %(srid)s::integer)))"
        " FILTER (WHERE NOT (" + buf
        + " BETWEEN 0 AND {limit})))[1]"
        " FROM tile, LATERAL ({user}) AS q WHERE q.geom IS NOT NULL",
        {"limit": sql.Literal(usersql.MAX_BUFFER_M)}, user=recipe.label_sql)
    try:
        with usersql.sandbox(conn, 120):
            ids, bad_buffer, where = usersql.rows(
                conn, query, params, [("ids", "bigint[]"), ("bad", "text"), ("at", "text")])[0]
    except psycopg.Error as exc:
        raise _recipe_error(exc, "label SQL fails over the extent") from exc
    if bad_buffer is not None:
        tile = _tile_at(recipe, where)
        usersql.check_buffer(float(bad_buffer), f"in label SQL of dataset {recipe.name}"
                             + (f" on tile {tile}" if tile is not None else ""))
    for cid in sorted(ids or []):
        if cid is None or not 1 <= cid <= 255:
            raise errors.RecipeError(f"label SQL of dataset {recipe.name}: class id {cid} is outside "
                                     "1..255 (0 is the background)")
        if cid not in recipe.classes:
            raise errors.RecipeError(
                f"label SQL of dataset {recipe.name} returns class_id {cid}, not declared in classes "
                f"({', '.join(map(str, recipe.classes))}): add it or filter it out")


def _tile_at(recipe: Recipe, point_wkt: str | None) -> int | None:
    """The tile id under a point (``POINT(x y)`` in the grid CRS), if it is on the grid."""
    import math

    try:
        x, y = (float(v) for v in point_wkt.split("(", 1)[1].rstrip(")").split())
    except (AttributeError, IndexError, ValueError):
        return None
    ncols, nrows = grid_shape(recipe)
    stride = (recipe.tile_px - recipe.overlap_px) * recipe.resolution
    minx, _, _, maxy = recipe.extent
    col, row = math.floor((x - minx) / stride), math.floor((maxy - y) / stride)
    return row * ncols + col if 0 <= col < ncols and 0 <= row < nrows else None


def create(conn: psycopg.Connection, recipe: Recipe, *, new_version: bool = False,
           overwrite: bool = False, sample_tile: int | None = None) -> Dataset:
    """Validate and store a recipe. Nothing is written unless every check passes.

    A dataset of that name exists: AlreadyExists, unless ``new_version`` (``overwrite`` is the
    same): then a changed recipe becomes version N+1, and version N's row and chips stay as
    ``NAME@N`` until ``drop(conn, NAME, version=N)``; the same recipe changes nothing."""
    recipe.validate()
    require_schema(conn)
    if not conn.execute("SELECT 1 FROM spatial_ref_sys WHERE srid = %s", [recipe.srid]).fetchone():
        raise errors.SridMismatch(f"unknown SRID {recipe.srid} (not in spatial_ref_sys)")
    if recipe.extent is None:
        recipe.extent = _extent_from_table(conn, recipe.extent_from, recipe.srid)
    ncols, nrows = grid_shape(recipe)
    tile = sample_tile if sample_tile is not None else (nrows // 2) * ncols + ncols // 2
    minx, miny, maxx, maxy = recipe.extent
    params = dict(srid=recipe.srid, resolution=recipe.resolution, tile_px=recipe.tile_px,
                  minx=minx, miny=miny, maxx=maxx, maxy=maxy, overlap_px=recipe.overlap_px,
                  tile_id=tile)
    notes: list[str] = []
    image_cols = _describe(conn, "image", recipe.image_sql, params)
    label_cols = _describe(conn, "label", recipe.label_sql, params)
    _check_columns(image_cols, label_cols)

    bands = _image_bands(conn, recipe.image_sql, params)
    if not bands:
        raise errors.RecipeError("image SQL returns no raster anywhere in the extent (no imagery there?)"
                                 + _no_rows_hint(conn, recipe.image_sql, params, recipe.srid, "rast"))
    src_scale = bands[0].pop("scale")
    src_srid = bands[0].pop("srid")
    for b in bands[1:]:
        b.pop("scale"), b.pop("srid")
    if src_srid == recipe.srid and recipe.resolution != src_scale and \
            abs(recipe.resolution - src_scale) <= 1e-6 * src_scale:
        # a rounded copy of the imagery's pixel size (e.g. from raster_columns, which keeps 10
        # decimals): use the exact one, so the grid is the imagery's grid and tiles fit exactly
        notes.append(f"resolution {recipe.resolution!r} taken as the imagery's exact {src_scale!r}")
        recipe.resolution = src_scale
    image_srids = _source_srids(conn, "image", recipe.image_sql, "rast", params)
    if not image_srids:
        raise errors.RecipeError("image SQL returns no raster anywhere in the extent (no imagery there?)")
    label_srids = _source_srids(conn, "label", recipe.label_sql, "geom", params)
    if not label_srids:
        raise errors.RecipeError("label SQL returns no geometry anywhere in the extent"
                                 + _no_rows_hint(conn, recipe.label_sql, params, recipe.srid, "geom"))
    for kind, srids in (("imagery", image_srids), ("label geometries", label_srids)):
        if 0 in srids:
            raise errors.SridMismatch(f"{kind} have SRID 0: set their SRID (ST_SetSRID) first")
        other = sorted(set(srids) - {recipe.srid})
        if other:
            notes.append(f"{kind} in EPSG:{', EPSG:'.join(map(str, other))} are reprojected "
                         f"to the grid's EPSG:{recipe.srid}")
    _check_label_values(conn, recipe, params, "buffer_m" in label_cols)

    meta = recipe.content() | {"label_has_buffer": "buffer_m" in label_cols, "image_bands": bands}
    digest = recipe.digest()
    row = dict(name=recipe.name, srid=recipe.srid, resolution=recipe.resolution,
               tile_px=recipe.tile_px, overlap_px=recipe.overlap_px, minx=minx, miny=miny,
               maxx=maxx, maxy=maxy, image_sql=usersql.stored(recipe.image_sql),
               label_sql=usersql.stored(recipe.label_sql),
               classes=json.dumps({str(k): v for k, v in recipe.classes.items()}),
               all_touched=recipe.all_touched, recipe=json.dumps(meta), recipe_hash=digest)
    with conn.transaction():
        exists = conn.execute("SELECT recipe_hash, version FROM pggeolearn.datasets WHERE name = %s"
                              " FOR UPDATE", [recipe.name]).fetchone()
        if exists and not (new_version or overwrite):
            raise errors.AlreadyExists(
                f"dataset {recipe.name} exists (version {exists[1]}): --new-version (or --overwrite)"
                f" makes a new version if the recipe changed, keeping version {exists[1]} and its "
                f"chips as {recipe.name}@{exists[1]}")
        unchanged = bool(exists) and exists[0] == digest
        if not unchanged:
            _store(conn, recipe, tile, row, exists[1] if exists else None)
    if unchanged:
        notes.append(f"recipe unchanged: still version {exists[1]} (no new version; chips kept)")
    return get(conn, recipe.name, notes=notes)


def _store(conn: psycopg.Connection, recipe: Recipe, tile: int, row: dict[str, Any],
           current: int | None) -> None:
    """Inside create's transaction: version ``current`` (if any) becomes ``NAME@N``, the new
    recipe is the next version, and its sample tile must build."""
    row["version"] = _next_version(conn, recipe.name)
    if current is not None:
        _archive(conn, recipe.name, current)
    cols = list(row)
    conn.execute(
        sql.SQL("INSERT INTO pggeolearn.datasets ({}) VALUES ({})").format(
            sql.SQL(", ").join(map(sql.Identifier, cols)),
            sql.SQL(", ").join(sql.Placeholder(c) for c in cols)), row)
    conn.execute("INSERT INTO pggeolearn.dataset_versions (dataset, version, recipe_hash, recipe)"
                 " VALUES (%(name)s, %(version)s, %(recipe_hash)s, %(recipe)s)", row)
    # From here the transaction may not write: the trial runs the user's SQL read-only
    # (inside image_tile/label_tile, as role pggeolearn_recipe).
    conn.execute("SET LOCAL transaction_read_only = on")
    conn.execute("SELECT set_config('statement_timeout', '120s', true),"
                 " set_config('search_path', pggeolearn.pinned_search_path(), true)")
    _trial(conn, recipe, tile)


def _next_version(conn: psycopg.Connection, name: str) -> int:
    """One more than any version ``name`` ever had (dropped ones included: a model trained on
    a dropped version keeps a number no later recipe takes)."""
    return conn.execute("SELECT coalesce(max(version), 0) + 1 FROM pggeolearn.dataset_versions"
                        " WHERE dataset = %s", [name]).fetchone()[0]


def _archive(conn: psycopg.Connection, name: str, version: int) -> None:
    """Version ``version`` of ``name`` becomes the row ``NAME@N``, with its chips and chip scores
    (its recipe, grid and statistics unchanged); the row ``NAME`` is deleted, with its watches."""
    old = f"{name}@{version}"
    conn.execute("INSERT INTO pggeolearn.datasets SELECT (jsonb_populate_record("
                 "NULL::pggeolearn.datasets, to_jsonb(d) || jsonb_build_object('name', %s::text))).*"
                 " FROM pggeolearn.datasets d WHERE d.name = %s", [old, name])
    conn.execute("UPDATE pggeolearn.chips SET dataset = %s WHERE dataset = %s", [old, name])
    conn.execute("UPDATE pggeolearn.chip_scores SET dataset = %s WHERE dataset = %s", [old, name])
    conn.execute("DELETE FROM pggeolearn.datasets WHERE name = %s", [name])


def _trial(conn: psycopg.Connection, recipe: Recipe, tile: int) -> None:
    """Build the sample tile's label and image; any failure aborts the create."""
    for kind, fn in (("label", "label_tile"), ("image", "image_tile")):
        try:
            with conn.transaction():  # a savepoint, so the error message stays readable
                conn.execute(sql.SQL("SELECT pggeolearn.{}(%s, %s) IS NOT NULL").format(
                    sql.Identifier(fn)), [recipe.name, tile]).fetchone()
        except psycopg.Error as exc:
            raise _recipe_error(exc, f"{kind} SQL fails on tile {tile}") from exc


def get(conn: psycopg.Connection, name: str, *, notes: list[str] | None = None) -> Dataset:
    """The stored dataset ``name`` or DatasetNotFound. ``NAME@N`` is version N of NAME (the
    current version or an old one); ``NAME`` is the current version."""
    require_schema(conn)
    base, at, number = name.partition("@")
    version = _version_number(base, number) if at else None
    row = conn.execute(
        "SELECT name, srid, resolution, tile_px, overlap_px, minx, miny, maxx, maxy, image_sql,"
        " label_sql, classes, all_touched, recipe_hash, recipe, stats, version"
        " FROM pggeolearn.datasets WHERE name = %(name)s"
        " OR (name = %(base)s AND version = %(version)s)",
        {"name": name, "base": base, "version": version}).fetchone()
    if row is None:
        raise _not_found(conn, base, version)
    (name, srid, res, tile_px, overlap, minx, miny, maxx, maxy, image_sql, label_sql, classes,
     all_touched, digest, meta, stats, version) = row
    recipe = Recipe(name=name, srid=srid, resolution=res, tile_px=tile_px, overlap_px=overlap,
                    extent=(minx, miny, maxx, maxy), image_sql=image_sql, label_sql=label_sql,
                    classes=parse_classes(classes), all_touched=all_touched,
                    extent_from=meta.get("extent_from"),
                    resampling=meta.get("resampling", "nearest"))
    ncols, nrows = grid_shape(recipe)
    cols = ["geom", "class_id"] + (["buffer_m"] if meta.get("label_has_buffer") else [])
    return Dataset(recipe, digest, ncols, nrows, cols, notes or [], stats, version)


def _version_number(base: str, number: str) -> int:
    try:
        version = int(number)
    except ValueError:
        version = 0
    if version < 1 or not base:
        raise errors.ConfigError(f"bad dataset version {base}@{number}: NAME@N, N a version number "
                                 f"(pggeolearn dataset versions {base or 'NAME'})")
    return version


def _not_found(conn: psycopg.Connection, base: str, version: int | None) -> errors.DatasetNotFound:
    had = versions(conn, base)
    if version is not None and had:
        listed = ", ".join(f"{v.version}" + ("" if v.state == "old" else f" ({v.state})") for v in had)
        return errors.DatasetNotFound(f"dataset {base} has no version {version} (versions: {listed})")
    known = [r[0] for r in conn.execute("SELECT name FROM pggeolearn.datasets"
                                        " WHERE position('@' in name) = 0 ORDER BY name")]
    hint = f" (known: {', '.join(known)})" if known else " (none defined yet: pggeolearn dataset create)"
    return errors.DatasetNotFound(f"unknown dataset {base!r}{hint}")


def list_all(conn: psycopg.Connection) -> list[Dataset]:
    """The current version of every dataset (old versions: :func:`versions`)."""
    require_schema(conn)
    names = [r[0] for r in conn.execute("SELECT name FROM pggeolearn.datasets"
                                        " WHERE position('@' in name) = 0 ORDER BY name")]
    return [get(conn, n) for n in names]


@dataclass
class Version:
    """One version of a dataset (``pggeolearn.dataset_versions``) and what uses it."""

    dataset: str
    version: int
    recipe_hash: str
    created_at: Any
    dropped_at: Any
    row: str | None  # the catalog row holding it (NAME or NAME@N); None once dropped
    chips: int
    models: list[str]

    @property
    def state(self) -> str:
        if self.row is None:
            return "dropped"
        return "current" if self.row == self.dataset else "old"

    def __str__(self) -> str:
        when = f"{self.created_at:%Y-%m-%d %H:%M}" if self.created_at else "?"
        state = self.state + (f" {self.dropped_at:%Y-%m-%d %H:%M}" if self.dropped_at else "")
        where = f", chips as {self.row}" if self.row and self.row != self.dataset else ""
        used = f"\tmodels: {', '.join(self.models)}" if self.models else ""
        return (f"{self.dataset}@{self.version}\trecipe {self.recipe_hash}\t{when}\t{state}\t"
                f"{self.chips} chips{where}{used}")


def versions(conn: psycopg.Connection, name: str) -> list[Version]:
    """Every version dataset ``name`` has had, oldest first (dropped ones too)."""
    require_schema(conn)
    base = name.split("@", 1)[0]
    with db_errors(f"versions of dataset {base}"):
        rows = conn.execute(
            "SELECT v.dataset, v.version, v.recipe_hash, v.created_at, v.dropped_at, d.name,"
            " (SELECT count(*) FROM pggeolearn.chips c WHERE c.dataset = d.name),"
            " ARRAY(SELECT m.name FROM pggeolearn.models m WHERE split_part(m.dataset, '@', 1) ="
            "       v.dataset AND m.dataset_version = v.version ORDER BY m.name)"
            " FROM pggeolearn.dataset_versions v"
            " LEFT JOIN pggeolearn.datasets d ON d.version = v.version AND v.dropped_at IS NULL"
            "  AND (d.name = v.dataset OR d.name = v.dataset || '@' || v.version)"
            " WHERE v.dataset = %s ORDER BY v.version", [base]).fetchall()
    return [Version(*r[:7], list(r[7])) for r in rows]


def drop(conn: psycopg.Connection, name: str, *, version: int | None = None,
         force: bool = False) -> str:
    """Delete dataset ``name``: every version and its chips; or, with ``version`` (or a name
    ``NAME@N``), that old version and its chips, refused while a stored model was trained on
    it unless ``force``. The versions' recipes stay in ``pggeolearn.dataset_versions`` (lineage).
    Returns what was dropped, as words."""
    base, at, number = name.partition("@")
    if at:
        version = _version_number(base, number)
    if version is None:
        get(conn, base)
        with conn.transaction():
            conn.execute("DELETE FROM pggeolearn.datasets WHERE split_part(name, '@', 1) = %s", [base])
            conn.execute("UPDATE pggeolearn.dataset_versions SET dropped_at = now()"
                         " WHERE dataset = %s AND dropped_at IS NULL", [base])
        return f"dataset {base}"
    ds = get(conn, f"{base}@{version}")
    if ds.is_current:
        raise errors.ConfigError(f"version {version} is the current version of dataset {base}: "
                                 f"`dataset drop {base}` drops the dataset (every version)")
    users = [r[0] for r in conn.execute(
        "SELECT name FROM pggeolearn.models WHERE split_part(dataset, '@', 1) = %s"
        " AND dataset_version = %s ORDER BY name", [base, version])]
    if users and not force:
        raise errors.ConfigError(
            f"dataset {base} version {version} is what model(s) {', '.join(users)} were trained "
            "on: --force drops its chips anyway (the models keep their weights and lineage)")
    with conn.transaction():
        conn.execute("DELETE FROM pggeolearn.datasets WHERE name = %s", [ds.name])
        conn.execute("UPDATE pggeolearn.dataset_versions SET dropped_at = now()"
                     " WHERE dataset = %s AND version = %s", [base, version])
    return f"dataset {base} version {version}"


def show(conn: psycopg.Connection, name: str) -> str:
    """The recipe and its SQL, as text."""
    ds = get(conn, name)
    return "\n".join([ds.describe(), "image SQL:", _indent(ds.recipe.image_sql), "label SQL:",
                      _indent(ds.recipe.label_sql)])


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines())
