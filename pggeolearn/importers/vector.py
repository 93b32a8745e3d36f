"""GeoJSON (a FeatureCollection, or newline-delimited Features) into a PostGIS table.

The table is ``id bigserial primary key``, one typed column per scalar property (bigint,
double precision, boolean or text, inferred across all features), ``properties jsonb`` with
every feature's original properties (nothing is lost to renaming or typing), and the geometry
column with a type modifier such as ``geometry(MultiPolygon, 4326)``. Geometries are parsed
with shapely; invalid ones are repaired with ``make_valid`` (and counted); Polygon mixed with
MultiPolygon (likewise points, lines) is promoted to the Multi type. Coordinates are in
EPSG:4326 (RFC 7946) unless an old-style ``crs`` member names another EPSG code; with ``srid``
PostGIS transforms them (``ST_Transform``). Loaded with binary COPY, then a GiST index and
ANALYZE, all in one transaction.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import shapely
from psycopg import sql
from shapely.geometry import shape
from tqdm import tqdm

from pggeolearn import errors
from pggeolearn.db import security
from pggeolearn.db.errors import db_errors
from pggeolearn.importers import _common
from pggeolearn.resources import sql_text

__all__ = ["VectorImportReport", "import_vector"]

LINE_SUFFIXES = (".geojsonl", ".geojsons", ".ndjson", ".jsonl")
GEOJSON_TYPES = ("Point", "MultiPoint", "LineString", "MultiLineString", "Polygon",
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
_NAMES = {n.upper(): n for n in (*GEOJSON_TYPES, "Geometry")}
_FAMILY_OF_MULTI = {"MULTIPOINT": "point", "MULTILINESTRING": "line", "MULTIPOLYGON": "polygon"}
# inferred SQL type -> psycopg's name for binary COPY
_COPY_TYPE = {"bigint": "int8", "double precision": "float8", "boolean": "bool", "text": "text"}
_INT64 = (-(2**63), 2**63 - 1)
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
    key: str  # property key ('' for the Feature's own "id" member)
    name: str  # sanitized column name
    type: str  # bigint | double precision | boolean | text


# -- reading ------------------------------------------------------------------------------
def _not_geojson(path: Path, why: str) -> errors.ConfigError:
    return errors.ConfigError(f"{path}: not GeoJSON ({why})")


def _as_features(path: Path, obj: Any, where: str) -> list[dict]:
    kind = obj.get("type") if isinstance(obj, dict) else None
    if kind == "FeatureCollection":
        feats = obj.get("features")
        if not isinstance(feats, list):
            raise _not_geojson(path, f"{where}FeatureCollection without a features array")
        return feats
    if kind == "Feature":
        return [obj]
    if kind in GEOJSON_TYPES:
        return [{"type": "Feature", "geometry": obj, "properties": None}]
    raise _not_geojson(path, f"{where}type is {kind!r}, expected FeatureCollection or Feature")


def _lines(path: Path, text: str) -> list[dict]:
    feats: list[dict] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip().lstrip("\x1e")  # RFC 8142 record separators
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _not_geojson(path, f"line {n}: {exc.msg}") from exc
        feats.extend(_as_features(path, obj, f"line {n}: "))
    return feats


def _crs_srid(path: Path, crs: Any) -> int:
    """SRID named by a GeoJSON 2008 ``crs`` member (RFC 7946 dropped it: EPSG:4326)."""
    if crs is None:
        return 4326
    name = crs.get("properties", {}).get("name", "") if isinstance(crs, dict) else ""
    if isinstance(name, str) and name.upper().endswith("CRS84"):
        return 4326
    m = re.search(r"EPSG:(?:[\d.]*:)?(\d+)$", name if isinstance(name, str) else "", re.I)
    if not m:
        raise errors.ConfigError(f"{path}: unsupported crs member {crs!r}; reproject to EPSG:4326")
    return int(m.group(1))


def read_geojson(path: str | Path) -> tuple[list[dict], int]:
    """The features of a GeoJSON or newline-delimited GeoJSON file, and their SRID."""
    path = Path(path)
    if not path.is_file():
        raise errors.NotFound(f"no such file: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _not_geojson(path, f"not UTF-8 text: {exc.reason}") from exc
    if path.suffix.lower() in LINE_SUFFIXES:
        return _lines(path, text), 4326
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # newline-delimited under a .geojson/.json name
            return _lines(path, text), 4326
        raise _not_geojson(path, f"{exc.msg} at line {exc.lineno}") from exc
    feats = _as_features(path, doc, "")
    return feats, _crs_srid(path, doc.get("crs"))


def _geometries(path: Path, feats: Sequence[dict]) -> np.ndarray:
    out = np.empty(len(feats), dtype=object)
    for i, f in enumerate(feats):
        if not isinstance(f, dict) or f.get("type") != "Feature":
            raise _not_geojson(path, f"feature {i} is not a Feature object")
        g = f.get("geometry")
        if g is None:
            continue
        kind = g.get("type") if isinstance(g, dict) else None
        if kind not in GEOJSON_TYPES:
            raise errors.ConfigError(f"{path}: feature {i}: unknown geometry type {kind!r}")
        try:
            out[i] = shape(g)
        except (shapely.errors.ShapelyError, ValueError, TypeError, KeyError, IndexError,
                AttributeError) as exc:
            raise errors.ConfigError(
                f"{path}: feature {i}: bad {kind} coordinates ({exc or type(exc).__name__})"
            ) from exc
    return out


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


# -- properties ------------------------------------------------------------------------------
def _kind(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "bigint" if _INT64[0] <= v <= _INT64[1] else "text"
    if isinstance(v, float):
        return "double precision"
    if isinstance(v, str):
        return "text"
    return "json"


def _merge(kinds: set[str]) -> str | None:
    if kinds == {"json"}:
        return None  # only objects/arrays: they live in the properties column alone
    if kinds <= {"bigint"} and kinds:
        return "bigint"
    if kinds and kinds <= {"bigint", "double precision"}:
        return "double precision"
    if kinds == {"boolean"}:
        return "boolean"
    return "text"


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


def _columns(feats: Sequence[dict], geom_column: str) -> list[_Column]:
    kinds: dict[str, set[str]] = {}
    fid_kinds: set[str] = set()
    has_fid = False
    for f in feats:
        if "id" in f:
            has_fid = True
            k = _kind(f["id"])
            if k:
                fid_kinds.add(k)
        props = f.get("properties")
        if not isinstance(props, dict):
            continue
        for key, v in props.items():
            k = _kind(v)
            kinds.setdefault(key, set())
            if k:
                kinds[key].add(k)
    used = {*_RESERVED, geom_column}
    cols = []
    if has_fid:
        cols.append(_Column("", _unique("feature_id", used), _merge(fid_kinds) or "text"))
    for key, ks in kinds.items():
        t = _merge(ks)
        if t is not None:
            cols.append(_Column(key, _unique(sanitize(key), used), t))
    return cols


def _value(v: Any, sqltype: str) -> Any:
    if v is None:
        return None
    if sqltype == "text":
        return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    if sqltype == "double precision":
        return float(v)
    if sqltype == "bigint":
        return int(v)
    return bool(v)


def _rows(feats: Sequence[dict], cols: Sequence[_Column], ewkb: Sequence[bytes | None]
          ) -> Iterable[tuple]:
    for f, g in zip(feats, ewkb, strict=True):
        props = f.get("properties")
        pd = props if isinstance(props, dict) else {}
        vals = [_value(f.get("id") if c.key == "" else pd.get(c.key), c.type) for c in cols]
        yield (*vals, props, g)


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
) -> VectorImportReport:
    """Load a GeoJSON file into ``table`` (see the module docstring for the table's shape).

    ``srid`` transforms the geometries in PostGIS and declares that SRID; ``overwrite``
    replaces an existing table; ``append`` adds rows to it (missing property columns are
    added, the geometry must fit its column). Runs in one transaction (a savepoint when the
    caller has one open).
    """
    started = time.perf_counter()
    _common.check_mode(overwrite, append)
    if not geom_column or geom_column in _RESERVED:
        raise errors.ConfigError(f"geometry column cannot be named {geom_column!r}")
    schema, name, ident, display = _common.target(table)
    path = Path(path)
    feats, src_srid = read_geojson(path)
    if not feats:
        raise errors.ConfigError(f"{path}: no features")
    geoms = _geometries(path, feats)
    made_valid = _make_valid(geoms)
    gtype, family = _column_type(geoms)
    if family:
        _promote(geoms, family)
    has_z = bool(shapely.has_z(geoms[~shapely.is_missing(geoms)]).any())
    if has_z:
        geoms[:] = shapely.force_3d(geoms)
    cols = _columns(feats, geom_column)
    nulls = int(shapely.is_missing(geoms).sum())

    with db_errors(f"import into {display}"), conn.transaction():
        appending = _common.prepare_target(conn, schema, name, ident, display,
                                           overwrite=overwrite, append=append)
        out_srid = srid or src_srid
        if appending:
            existing, ttype, tsrid, dim = _existing(conn, schema, name, display, geom_column)
            if tsrid:
                if srid is not None and srid != tsrid:
                    raise errors.SridMismatch(f"table {display} has SRID {tsrid}, not {srid}")
                out_srid = tsrid
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
                total=len(feats), unit="feature", desc=f"import {display}",
                disable=not progress, leave=False) as bar:
            cp.set_types([_COPY_TYPE[c.type] for c in cols] + ["jsonb", "bytea"])
            for row in _rows(feats, cols, ewkb):
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
        table=display, file=path.name, features=len(feats), made_valid=made_valid,
        null_geometries=nulls, geometry_type=gtype + ("Z" if has_z and not appending else ""),
        srid=out_srid, columns={c.name: c.type for c in cols},
        transformed_from=src_srid if out_srid != src_srid else None, appended=appending,
        seconds=time.perf_counter() - started,
    )
