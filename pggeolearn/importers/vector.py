"""Any vector file GDAL reads (GeoPackage, Shapefile, FlatGeobuf, GeoJSON, ...) into a PostGIS table.

Files are read with pyogrio (GDAL, bundled in its wheel): one layer, ``layer`` naming it when
the file has several. The table is ``id bigserial primary key``, ``feature_id bigint`` (the
source's feature id, GDAL's FID: a GeoPackage's fid, a GeoJSON Feature's integer ``id``, else
the feature's position), one typed column per attribute field (bigint, double precision,
boolean or text), ``properties jsonb`` with every feature's attributes under their original
field names (nothing is lost to renaming or typing), and the geometry column with a type
modifier such as ``geometry(MultiPolygon, 4326)``. Invalid geometries are repaired with
``make_valid`` (and counted); Polygon mixed with MultiPolygon (likewise points, lines) is
promoted to the Multi type; Z is kept (2D features get Z 0), M is dropped, curves become their
linear approximations. The SRID is the layer's CRS as an EPSG code (a GeoJSON without a
``crs`` member is EPSG:4326); with ``srid`` PostGIS transforms the geometries
(``ST_Transform``), and a layer without a CRS is declared to be in ``srid``. Loaded with binary
COPY, then a GiST index and ANALYZE, all in one transaction.
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pyogrio
import pyogrio.errors
import pyogrio.raw
import shapely
from psycopg import sql
from tqdm import tqdm

from pggeolearn import errors
from pggeolearn.db import security
from pggeolearn.db.errors import db_errors
from pggeolearn.importers import _common
from pggeolearn.resources import sql_text

__all__ = ["VectorImportReport", "import_vector"]

GEOMETRY_TYPES = ("Point", "MultiPoint", "LineString", "MultiLineString", "Polygon",
                  "MultiPolygon", "GeometryCollection")
# shapely type id -> (family, PostGIS type name); families promote to their Multi type
_TYPE = {0: ("point", "Point"), 4: ("point", "MultiPoint"),
         1: ("line", "LineString"), 5: ("line", "MultiLineString"),
         3: ("polygon", "Polygon"), 6: ("polygon", "MultiPolygon"),
         7: ("collection", "GeometryCollection")}  # fmt: skip
_MULTI = {"point": ("MultiPoint", shapely.MultiPoint),
          "line": ("MultiLineString", shapely.MultiLineString),
          "polygon": ("MultiPolygon", shapely.MultiPolygon)}  # fmt: skip
_DIMENSION = {"point": 0, "line": 1, "polygon": 2}
_NAMES = {n.upper(): n for n in (*GEOMETRY_TYPES, "Geometry")}
_FAMILY_OF_MULTI = {"MULTIPOINT": "point", "MULTILINESTRING": "line", "MULTIPOLYGON": "polygon"}
# inferred SQL type -> psycopg's name for binary COPY
_COPY_TYPE = {"bigint": "int8", "double precision": "float8", "boolean": "bool", "text": "text"}
_RESERVED = ("id", "properties")
_STAGE = "pggeolearn_import_stage"


@dataclass
class VectorImportReport:
    """What :func:`import_vector` did; ``str()`` is the CLI's summary."""

    table: str
    file: str
    features: int
    made_valid: int  # invalid geometries repaired with make_valid
    null_geometries: int
    geometry_type: str  # the column's type modifier, e.g. MultiPolygon
    srid: int
    columns: dict[str, str] = field(default_factory=dict)  # typed property columns
    transformed_from: int | None = None
    appended: bool = False
    seconds: float = 0.0

    def __str__(self) -> str:
        verb = "appended" if self.appended else "imported"
        src = f" (transformed from SRID {self.transformed_from})" if self.transformed_from else ""
        shown = [f"{k} {v}" for k, v in self.columns.items()]
        cols = ", ".join(shown[:8]) or "none"
        if len(shown) > 8:
            cols += f", ... ({len(shown)} in all)"
        return "\n".join([
            f"{verb} {self.features} features from {self.file} into {self.table} "
            f"in {self.seconds:.1f} s",
            f"geometry({self.geometry_type}, {self.srid}){src}; {self.made_valid} made valid, "
            f"{self.null_geometries} without geometry",
            f"property columns: {cols} (+ properties jsonb)",
        ])


@dataclass
class _Column:
    key: str  # the source's field name ('' for feature_id, the FID)
    name: str  # sanitized column name
    type: str  # bigint | double precision | boolean | text


# -- reading ------------------------------------------------------------------------------
@dataclass
class _Field:
    key: str  # the source's field name
    ogr_type: str  # OFTInteger, OFTString, ...
    subtype: str  # OFSTBoolean, OFSTJSON, ...
    values: np.ndarray


@dataclass
class _Layer:
    srid: int | None  # None: the layer declares no CRS
    fids: np.ndarray
    geoms: np.ndarray  # shapely geometries, None where a feature has none
    fields: list[_Field]


def _unreadable(path: Path, exc: Exception) -> errors.ConfigError:
    return errors.ConfigError(f"{path}: not a vector file GDAL reads ({str(exc).splitlines()[0]})")


def _layer_name(path: Path, layer: str | None) -> str:
    try:
        names = [str(n) for n, _ in pyogrio.list_layers(path)]
    except pyogrio.errors.DataSourceError as exc:
        raise _unreadable(path, exc) from exc
    if not names:
        raise errors.ConfigError(f"{path}: no vector layers")
    if layer is None:
        if len(names) > 1:
            raise errors.ConfigError(f"{path} has {len(names)} layers ({', '.join(names)}): "
                                     "choose one with --layer")
        return names[0]
    if layer not in names:
        raise errors.ConfigError(f"{path} has no layer {layer!r} (it has {', '.join(names)})")
    return layer


def _srid(path: Path, crs: str | None) -> int | None:
    """The EPSG code of a layer's CRS as pyogrio reports it (``EPSG:n`` or WKT)."""
    if not crs:
        return None
    m = re.fullmatch(r"EPSG:(\d+)", crs.strip())
    if m:
        return int(m.group(1))
    if crs.strip().upper() in ("OGC:CRS84", "CRS84"):
        return 4326
    from rasterio.crs import CRS  # only for a CRS GDAL did not name an EPSG code for
    from rasterio.errors import CRSError

    try:
        epsg = CRS.from_user_input(crs).to_epsg()
    except CRSError:
        epsg = None
    if epsg:
        return int(epsg)
    named = re.search(r'"([^"]+)"', crs)
    raise errors.ConfigError(
        f"{path}: its CRS ({named.group(1) if named else crs[:60]}) has no EPSG code; "
        "reproject it first, e.g. ogr2ogr -t_srs EPSG:4326")


def read_layer(path: str | Path, layer: str | None = None) -> _Layer:
    """One layer of a vector file, read with pyogrio: FIDs, geometries, attribute fields, SRID."""
    path = Path(path)
    if not path.exists():
        raise errors.NotFound(f"no such file: {path}")
    name = _layer_name(path, layer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            meta, fids, wkb, data = pyogrio.raw.read(path, layer=name, return_fids=True,
                                                     datetime_as_string=True)
        except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as exc:
            raise _unreadable(path, exc) from exc
    for w in caught:
        text = str(w.message)
        if "Unsupported geometry type" in text:  # GDAL would load such a feature without geometry
            raise errors.ConfigError(f"{path}: a feature has a geometry type GDAL does not read")
        if "Measured (M)" not in text:  # M is dropped by design (see the module docstring)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    fields = [_Field(str(k), t, s, v) for k, t, s, v in
              zip(meta["fields"], meta["ogr_types"], meta["ogr_subtypes"], data, strict=True)]
    geoms = (shapely.from_wkb(wkb) if wkb is not None
             else np.full(len(fids), None, dtype=object))
    return _Layer(_srid(path, meta["crs"]), fids, np.asarray(geoms, dtype=object), fields)


# -- geometry cleanup -----------------------------------------------------------------------
def _keep_dimension(fixed: Any, dim: int, family: str) -> Any:
    """make_valid can return a collection (a polygon plus a stray line): keep ``dim`` parts."""
    if _TYPE.get(shapely.get_type_id(fixed), ("",))[0] == family:
        return fixed
    parts = [p for p in shapely.get_parts(fixed) if shapely.get_dimensions(p) == dim]
    parts = [q for p in parts for q in shapely.get_parts(p)]  # flatten Multi parts
    name, cls = _MULTI[family]
    return cls(parts) if parts else shapely.from_wkt(f"{name.upper()} EMPTY")


def _make_valid(geoms: np.ndarray) -> int:
    present = ~shapely.is_missing(geoms)
    bad = np.flatnonzero(present & ~shapely.is_valid(geoms))
    for i in bad:
        g = geoms[i]
        fixed = shapely.make_valid(g)
        family = _TYPE[shapely.get_type_id(g)][0]
        if family != "collection":
            fixed = _keep_dimension(fixed, _DIMENSION[family], family)
        geoms[i] = fixed
    return len(bad)


def _column_type(geoms: np.ndarray) -> tuple[str, str | None]:
    """(PostGIS type name, family to promote to Multi or None) for the non-null geometries."""
    present = geoms[~shapely.is_missing(geoms)]
    ids = set(shapely.get_type_id(present).tolist()) if len(present) else set()
    if len(ids) == 1:
        return _TYPE[ids.pop()][1], None
    families = {_TYPE[i][0] for i in ids}
    if len(families) == 1 and "collection" not in families:
        family = families.pop()
        return _MULTI[family][0], family
    return "Geometry", None


def _promote(geoms: np.ndarray, family: str) -> None:
    name, cls = _MULTI[family]
    for i, g in enumerate(geoms):
        if g is not None and _TYPE[shapely.get_type_id(g)][1] != name:
            geoms[i] = cls([g]) if not g.is_empty else shapely.from_wkt(f"{name.upper()} EMPTY")


# -- attributes -------------------------------------------------------------------------------
_SQL_TYPE = {"OFTInteger": "bigint", "OFTInteger64": "bigint", "OFTReal": "double precision",
             "OFTString": "text", "OFTDate": "text", "OFTTime": "text", "OFTDateTime": "text"}


def _loads(s: str) -> Any:
    try:
        return json.loads(s)
    except ValueError:
        return s  # GDAL writes the strings of a mixed-type field unquoted


def _json_values(f: _Field) -> list[Any]:
    """The field's values as JSON: None for null, lists for list fields, parsed JSON."""
    v = f.values
    if v.dtype.kind == "f":  # integer and boolean fields with nulls come as floats with NaN
        out = [None if math.isnan(x) else x for x in v.tolist()]
        if f.ogr_type in ("OFTInteger", "OFTInteger64"):
            out = [x if x is None else (bool(x) if f.subtype == "OFSTBoolean" else int(x))
                   for x in out]
        return out
    if v.dtype.kind in "biu":
        return v.tolist()
    if f.ogr_type.endswith("List"):
        return [None if x is None else np.asarray(x).tolist() for x in v]
    if f.subtype == "OFSTJSON":
        return [None if x is None else _loads(x) for x in v]
    return [None if x is None else str(x) for x in v]


def _sql_type(f: _Field, jv: Sequence[Any]) -> str | None:
    """The typed column for a field, or None: it lives in the properties column alone."""
    if f.subtype == "OFSTBoolean":
        return "boolean"
    if f.subtype == "OFSTJSON" and all(x is None or isinstance(x, (dict, list)) for x in jv) \
            and any(x is not None for x in jv):
        return None  # only objects/arrays
    return _SQL_TYPE.get(f.ogr_type)  # lists and binary fields: none


def sanitize(key: str) -> str:
    """Lowercase ASCII column name for a key: ``building:levels`` -> ``building_levels``."""
    s = re.sub(r"[^a-z0-9_]+", "_", key.lower())
    s = re.sub(r"_+", "_", s).strip("_") or "field"
    if s[0].isdigit():
        s = "_" + s
    return s[:_common.MAX_IDENT]


def _unique(base: str, used: set[str]) -> str:
    name, n = base, 1
    while name in used:
        suffix = f"_{n}"
        name = base[: _common.MAX_IDENT - len(suffix)] + suffix
        n += 1
    used.add(name)
    return name


def _typed(v: Any, raw: Any, sqltype: str, is_json: bool) -> Any:
    if v is None:
        return None
    if sqltype == "text":
        return raw if is_json else str(v)  # a JSON field's text as GDAL gives it
    if sqltype == "double precision":
        return float(v)
    if sqltype == "bigint":
        return int(v)
    return bool(v)


def _attributes(layer: _Layer, geom_column: str) -> tuple[list[_Column], list[list[Any]], list[dict]]:
    """The typed columns (feature_id first), their values column by column, the properties."""
    used = {*_RESERVED, geom_column}
    cols = [_Column("", _unique("feature_id", used), "bigint")]
    values: list[list[Any]] = [[int(x) for x in layer.fids]]
    keys, jsons = [], []
    for f in layer.fields:
        jv = _json_values(f)
        keys.append(f.key)
        jsons.append(jv)
        t = _sql_type(f, jv)
        if t is None:
            continue
        cols.append(_Column(f.key, _unique(sanitize(f.key), used), t))
        is_json = f.subtype == "OFSTJSON"
        values.append([_typed(v, r, t, is_json) for v, r in zip(jv, f.values, strict=True)])
    props = [dict(zip(keys, row, strict=True)) for row in zip(*jsons, strict=True)] if jsons \
        else [{} for _ in layer.fids]
    return cols, values, props


def _rows(values: Sequence[Sequence[Any]], props: Sequence[dict], ewkb: Sequence[bytes | None]
          ) -> Iterable[tuple]:
    for *vals, p, g in zip(*values, props, ewkb, strict=True):
        yield (*vals, p, g)


# -- database ------------------------------------------------------------------------------
def _existing(conn: psycopg.Connection, schema: str, name: str, display: str, geom_column: str
              ) -> tuple[dict[str, str], str, int, int]:
    cols = dict(conn.execute(sql_text("import_table_columns"),
                             {"schema": schema, "table": name}).fetchall())
    row = conn.execute(sql_text("import_vector_geometry"),
                       {"schema": schema, "table": name, "column": geom_column}).fetchone()
    if row is None:
        raise errors.ConfigError(f"table {display} has no geometry column {geom_column!r}")
    return cols, row[0], row[1], row[2]


def _fit_existing(geoms: np.ndarray, ours: str, theirs: str, dim: int, display: str) -> None:
    """Make the file's geometries fit an existing column's type (promoting to Multi)."""
    t = theirs.upper()
    present = geoms[~shapely.is_missing(geoms)]
    families = {_TYPE[i][0] for i in set(shapely.get_type_id(present).tolist())}
    if t in ("GEOMETRY", ours.upper()):
        pass
    elif t in _FAMILY_OF_MULTI and families <= {_FAMILY_OF_MULTI[t]}:
        _promote(geoms, _FAMILY_OF_MULTI[t])
    else:
        raise errors.ConfigError(f"table {display} holds {theirs}, the file has {ours}")
    has_z = bool(shapely.has_z(present).any())
    if dim == 3 and not has_z:
        geoms[:] = shapely.force_3d(geoms)
    elif dim == 2 and has_z:
        raise errors.ConfigError(f"table {display} is 2D, the file has Z coordinates")


def import_vector(
    conn: psycopg.Connection,
    path: str | Path,
    table: str,
    *,
    srid: int | None = None,
    geom_column: str = "geom",
    overwrite: bool = False,
    append: bool = False,
    progress: bool = True,
    force: bool = False,
    layer: str | None = None,
) -> VectorImportReport:
    """Load one layer of a vector file into ``table`` (the module docstring says how).

    ``layer`` names the layer of a file that has several (a GeoPackage); ``srid`` transforms
    the geometries in PostGIS and declares that SRID (a layer without a CRS is taken to be in
    it); ``overwrite`` replaces an existing table; ``append`` adds rows to it (missing
    attribute columns are added, the geometry must fit its column). Runs in one transaction
    (a savepoint when the caller has one open).
    """
    started = time.perf_counter()
    _common.check_mode(overwrite, append)
    if not geom_column or geom_column in _RESERVED:
        raise errors.ConfigError(f"geometry column cannot be named {geom_column!r}")
    schema, name, ident, display = _common.target(table)
    path = Path(path)
    data = read_layer(path, layer)
    if not len(data.fids):
        raise errors.ConfigError(f"{path}: no features")
    geoms = data.geoms
    made_valid = _make_valid(geoms)
    gtype, family = _column_type(geoms)
    if family:
        _promote(geoms, family)
    has_z = bool(shapely.has_z(geoms[~shapely.is_missing(geoms)]).any())
    if has_z:
        geoms[:] = shapely.force_3d(geoms)
    cols, values, props = _attributes(data, geom_column)
    nulls = int(shapely.is_missing(geoms).sum())

    with db_errors(f"import into {display}"), conn.transaction():
        appending = _common.prepare_target(conn, schema, name, ident, display,
                                           overwrite=overwrite, append=append, force=force)
        src_srid = data.srid or srid
        if appending:
            existing, ttype, tsrid, dim = _existing(conn, schema, name, display, geom_column)
            if tsrid:
                if srid is not None and srid != tsrid:
                    raise errors.SridMismatch(f"table {display} has SRID {tsrid}, not {srid}")
                src_srid = src_srid or tsrid
                srid = tsrid
        if src_srid is None:
            raise errors.ConfigError(f"{path}: the layer has no CRS; pass --srid N to declare the "
                                     "EPSG code of its coordinates")
        out_srid = srid or src_srid
        if appending:
            _fit_existing(geoms, gtype, ttype, dim, display)
            gtype = _NAMES.get(ttype.upper(), ttype) + ("Z" if dim == 3 else "")
        _common.check_srid(conn, src_srid)
        _common.check_srid(conn, out_srid)
        ewkb = shapely.to_wkb(shapely.set_srid(geoms, src_srid), include_srid=True)
        typmod = sql.SQL("geometry({}, {})").format(
            sql.SQL(gtype + ("Z" if has_z else "")), sql.Literal(out_srid))
        names = [c.name for c in cols] + ["properties", geom_column]
        col_list = sql.SQL(", ").join(map(sql.Identifier, names))
        defs = [sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.type)) for c in cols]
        defs.append(sql.SQL("properties jsonb"))

        if not appending:
            conn.execute(sql.SQL("CREATE TABLE {} (id bigserial PRIMARY KEY, {}, {} {})").format(
                ident, sql.SQL(", ").join(defs), sql.Identifier(geom_column), typmod))
            _common.mark(conn, schema, name, "import vector")
        else:
            for c in cols + [_Column("properties", "properties", "jsonb")]:
                if c.name not in existing:
                    conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
                        ident, sql.Identifier(c.name), sql.SQL(c.type)))

        staged = appending or out_srid != src_srid
        if staged:  # geometries in the file's SRID; the server transforms and casts
            stage = sql.Identifier("pg_temp", _STAGE)
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(stage))
            conn.execute(sql.SQL("CREATE TEMP TABLE {} ({}, {} geometry)").format(
                stage, sql.SQL(", ").join(defs), sql.Identifier(geom_column)))
        copy = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
            stage if staged else ident, col_list)
        with conn.cursor() as cur, cur.copy(copy) as cp, tqdm(
                total=len(props), unit="feature", desc=f"import {display}",
                disable=not progress, leave=False) as bar:
            cp.set_types([_COPY_TYPE[c.type] for c in cols] + ["jsonb", "bytea"])
            for row in _rows(values, props, ewkb):
                cp.write_row(row)
                bar.update(1)
        if staged:
            geom = sql.Identifier(geom_column)
            expr = (sql.SQL("ST_Transform({}, {})").format(geom, sql.Literal(out_srid))
                    if out_srid != src_srid else geom)
            select = [sql.Identifier(n) for n in names[:-1]] + [expr]
            conn.execute(sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(
                ident, col_list, sql.SQL(", ").join(select), stage))
            conn.execute(sql.SQL("DROP TABLE {}").format(stage))
        conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING gist ({})").format(
            _common.index_name(name, f"{geom_column}_idx"), ident, sql.Identifier(geom_column)))
        conn.execute(sql.SQL("ANALYZE {}").format(ident))
        security.grant_quietly(conn, schema, name)  # recipe SQL may read what pggeolearn imported

    return VectorImportReport(
        table=display, file=path.name + (f" (layer {layer})" if layer else ""),
        features=len(props), made_valid=made_valid, null_geometries=nulls,
        geometry_type=gtype + ("Z" if has_z and not appending else ""), srid=out_srid,
        columns={c.name: c.type for c in cols if c.key},
        transformed_from=src_srid if out_srid != src_srid else None, appended=appending,
        seconds=time.perf_counter() - started,
    )
