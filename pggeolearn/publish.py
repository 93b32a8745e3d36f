"""QGIS readiness: what makes a table open in QGIS (and GDAL/OGR) with the right type, CRS,
speed and look, without anyone touching a dialog.

* **Raster tables** (:func:`publish_raster`): a GiST index on ``ST_ConvexHull(rast)``,
  ``AddRasterConstraints`` (the table appears in ``raster_columns`` with its SRID, pixel size,
  block size, bands, pixel types, NODATA and extent: QGIS's PostgreSQL browser and GDAL's
  PostGISRaster driver list it from there without scanning), overview tables (factors 2 and 4
  by default, registered in ``raster_overviews``, so a zoomed-out QGIS view reads a quarter or
  a sixteenth of the pixels; built by :mod:`pggeolearn.qgis.overviews`, not
  ``ST_CreateOverview``, whose tiles GDAL and QGIS cannot read) and ``ANALYZE``.
* **Vector tables** (:func:`publish_vector`): the geometry column must carry a type modifier
  (``geometry(MultiPolygon, 3857)``: QGIS then knows type and CRS without a full scan); a GiST
  index and ``ANALYZE``.
* **Default styles** in ``public.layer_styles``, the table QGIS itself creates and reads
  (:func:`ensure_layer_styles` creates it with QGIS's own DDL when missing): when a user adds the
  layer, QGIS loads the row marked ``useasdefault``. Raster rows have ``f_geometry_column``
  NULL and ``r_raster_column`` set (QGIS >= 3.34 reads raster styles from PostgreSQL; older
  versions ignore these rows); vector rows have ``f_geometry_column`` and ``type`` (QGIS's
  geometry type name, e.g. ``Polygon``). Styles are QML documents built here:
  :func:`class_raster_qml` (paletted/unique values renderer, one colour per class, background
  transparent), :func:`categorized_qml` (polygons coloured by class),
  :func:`graduated_qml` (e.g. tiles by IoU) and :func:`gray_raster_qml` (a probability band).

Everything runs in the caller's transaction (savepoints only), so a prediction can publish its
tables atomically with writing them.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pggeolearn import errors
from pggeolearn import palette as _palette
from pggeolearn.db.errors import db_errors
from pggeolearn.db.names import split_table
from pggeolearn.importers._common import index_name
from pggeolearn.palette import RGB
from pggeolearn.qgis import overviews as overviews_mod
from pggeolearn.resources import sql_text

__all__ = [
    "RasterInfo", "categorized_qml", "class_raster_qml", "drop_overviews", "ensure_layer_styles",
    "gdal_connstring", "graduated_qml", "gray_raster_qml", "palette", "publish_raster",
    "publish_vector", "save_style", "single_symbol_qml",
]

QGIS_VERSION = "3.28.0"  # the QML dialect written here; newer QGIS versions read it
DOCTYPE = "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>"


# ------------------------------------------------------------------------------------------
# colours and QML documents


def palette(classes: dict[int, str] | Sequence[int]) -> dict[int, RGB]:
    """A stable colour per class id, :mod:`pggeolearn.palette`'s (0, background, is black; its
    alpha is set by the style)."""
    return _palette.palette(classes)


def _qgis_root() -> ET.Element:
    return ET.Element("qgis", {"version": QGIS_VERSION, "styleCategories": "AllStyleCategories",
                               "hasScaleBasedVisibilityFlag": "0", "minScale": "1e+08",
                               "maxScale": "0"})


def _document(root: ET.Element) -> str:
    return DOCTYPE + "\n" + ET.tostring(root, encoding="unicode")


def _raster_pipe(root: ET.Element, renderer: dict[str, str]) -> ET.Element:
    pipe = ET.SubElement(root, "pipe")
    provider = ET.SubElement(pipe, "provider")
    ET.SubElement(provider, "resampling", {
        "enabled": "false", "maxOversampling": "2",
        "zoomedInResamplingMethod": "nearestNeighbour",
        "zoomedOutResamplingMethod": "nearestNeighbour"})
    rr = ET.SubElement(pipe, "rasterrenderer", {"opacity": "1", "alphaBand": "-1",
                                                "nodataColor": "", **renderer})
    ET.SubElement(rr, "rasterTransparency")
    mmo = ET.SubElement(rr, "minMaxOrigin")
    for tag, text in (("limits", "None"), ("extent", "WholeRaster"), ("statAccuracy", "Estimated"),
                      ("cumulativeCutLower", "0.02"), ("cumulativeCutUpper", "0.98"),
                      ("stdDevFactor", "2")):
        ET.SubElement(mmo, tag).text = text
    ET.SubElement(pipe, "brightnesscontrast", {"brightness": "0", "contrast": "0", "gamma": "1"})
    ET.SubElement(pipe, "huesaturation", {"saturation": "0", "grayscaleMode": "0",
                                          "colorizeOn": "0", "colorizeRed": "255",
                                          "colorizeGreen": "128", "colorizeBlue": "128",
                                          "colorizeStrength": "100", "invertColors": "0"})
    ET.SubElement(pipe, "rasterresampler", {"maxOversampling": "2"})
    ET.SubElement(pipe, "resamplingStage").text = "resamplingFilter"
    ET.SubElement(root, "blendMode").text = "0"
    return rr


def class_raster_qml(classes: dict[int, str], colours: dict[int, RGB] | None = None,
                     *, band: int = 1, background_alpha: int = 0) -> str:
    """QML of a paletted (unique values) renderer: one entry per class id with its name."""
    colours = colours or palette(classes)
    root = _qgis_root()
    rr = _raster_pipe(root, {"type": "paletted", "band": str(band)})
    pal = ET.SubElement(rr, "colorPalette")
    for cid in sorted(classes):
        alpha = background_alpha if cid == 0 else 255
        ET.SubElement(pal, "paletteEntry", {"value": str(cid), "color": _palette.hex_colour(colours[cid]),
                                            "alpha": str(alpha), "label": str(classes[cid])})
    return _document(root)


def gray_raster_qml(band: int, lo: float, hi: float) -> str:
    """QML of a single band gray renderer stretched from ``lo`` (black) to ``hi`` (white)."""
    root = _qgis_root()
    rr = _raster_pipe(root, {"type": "singlebandgray", "grayBand": str(band),
                             "gradient": "BlackToWhite"})
    ce = ET.SubElement(rr, "contrastEnhancement")
    ET.SubElement(ce, "minValue").text = repr(float(lo))
    ET.SubElement(ce, "maxValue").text = repr(float(hi))
    ET.SubElement(ce, "algorithm").text = "StretchToMinimumMaximum"
    return _document(root)


def _option_map(parent: ET.Element, props: dict[str, str]) -> None:
    """QGIS >= 3.26 reads <Option type="Map">; older versions read <prop k v>: write both."""
    opt = ET.SubElement(parent, "Option", {"type": "Map"})
    for k, v in props.items():
        ET.SubElement(opt, "Option", {"type": "QString", "name": k, "value": v})
    for k, v in props.items():
        ET.SubElement(parent, "prop", {"k": k, "v": v})


def _symbol_layer(symbols: ET.Element, name: str, kind: str, cls: str) -> ET.Element:
    sym = ET.SubElement(symbols, "symbol", {"type": kind, "name": name, "alpha": "1",
                                            "clip_to_extent": "1", "force_rhr": "0"})
    return ET.SubElement(sym, "layer", {"class": cls, "enabled": "1", "locked": "0", "pass": "0"})


def _fill_symbol(symbols: ET.Element, name: str, rgb: RGB, *, fill_alpha: int = 110) -> None:
    layer = _symbol_layer(symbols, name, "fill", "SimpleFill")
    r, g, b = rgb
    _option_map(layer, {
        "border_width_map_unit_scale": "3x:0,0,0,0,0,0", "color": f"{r},{g},{b},{fill_alpha}",
        "joinstyle": "bevel", "offset": "0,0", "offset_map_unit_scale": "3x:0,0,0,0,0,0",
        "offset_unit": "MM", "outline_color": f"{r},{g},{b},255", "outline_style": "solid",
        "outline_width": "0.4", "outline_width_unit": "MM", "style": "solid",
    })


def _vector_root(renderer: dict[str, str]) -> tuple[ET.Element, ET.Element]:
    root = _qgis_root()
    rend = ET.SubElement(root, "renderer-v2", {"symbollevels": "0", "forceraster": "0",
                                               "enableorderby": "0", "referencescale": "-1",
                                               **renderer})
    return root, rend


def _line_symbol(symbols: ET.Element, name: str, rgb: RGB, *, width: float = 0.5) -> None:
    layer = _symbol_layer(symbols, name, "line", "SimpleLine")
    r, g, b = rgb
    _option_map(layer, {"line_color": f"{r},{g},{b},255", "line_style": "solid",
                        "line_width": str(width), "line_width_unit": "MM", "capstyle": "round",
                        "joinstyle": "round", "offset": "0", "offset_unit": "MM"})


def single_symbol_qml(rgb: RGB, *, geometry: str = "polygon", fill_alpha: int = 0) -> str:
    """QML of one symbol for every feature: outlined polygons (``fill_alpha`` 0: hollow) or
    lines (``geometry='line'``), e.g. the label sources of a dataset."""
    root, rend = _vector_root({"type": "singleSymbol"})
    symbols = ET.SubElement(rend, "symbols")
    if geometry == "line":
        _line_symbol(symbols, "0", rgb)
    else:
        _fill_symbol(symbols, "0", rgb, fill_alpha=fill_alpha)
    return _vector_tail(root, rend, geometry)


_GEOMETRY_TYPES = {"point": "0", "line": "1", "polygon": "2"}


def _vector_tail(root: ET.Element, rend: ET.Element, geometry: str = "polygon") -> str:
    ET.SubElement(rend, "rotation")
    ET.SubElement(rend, "sizescale")
    ET.SubElement(root, "blendMode").text = "0"
    ET.SubElement(root, "featureBlendMode").text = "0"
    ET.SubElement(root, "layerOpacity").text = "1"
    ET.SubElement(root, "layerGeometryType").text = _GEOMETRY_TYPES[geometry]
    return _document(root)


def categorized_qml(attr: str, categories: Sequence[tuple[Any, str, RGB]], *, fill_alpha: int = 110) -> str:
    """QML of a categorized polygon renderer: ``(value, label, colour)`` per category."""
    root, rend = _vector_root({"type": "categorizedSymbol", "attr": attr})
    cats = ET.SubElement(rend, "categories")
    symbols = ET.SubElement(rend, "symbols")
    for i, (value, label, rgb) in enumerate(categories):
        ET.SubElement(cats, "category", {"render": "true", "symbol": str(i), "value": str(value),
                                         "label": str(label)})
        _fill_symbol(symbols, str(i), rgb, fill_alpha=fill_alpha)
    return _vector_tail(root, rend)


def graduated_qml(attr: str, ranges: Sequence[tuple[float, float, str, RGB]]) -> str:
    """QML of a graduated polygon renderer: ``(lower, upper, label, colour)`` per range."""
    root, rend = _vector_root({"type": "graduatedSymbol", "attr": attr,
                               "graduatedMethod": "GraduatedColor"})
    rngs = ET.SubElement(rend, "ranges")
    symbols = ET.SubElement(rend, "symbols")
    for i, (lo, hi, label, rgb) in enumerate(ranges):
        ET.SubElement(rngs, "range", {"render": "true", "symbol": str(i), "lower": f"{lo:.6f}",
                                      "upper": f"{hi:.6f}", "label": label})
        _fill_symbol(symbols, str(i), rgb, fill_alpha=160)
    ET.SubElement(rend, "mode", {"name": "equal"})
    ET.SubElement(rend, "classificationMethod", {"id": "EqualInterval"})
    return _vector_tail(root, rend)


# ------------------------------------------------------------------------------------------
# layer_styles


def ensure_layer_styles(conn: psycopg.Connection) -> None:
    """Create ``public.layer_styles`` with QGIS's DDL if missing; add the ``type`` and
    ``r_raster_column`` columns to an older QGIS's table, as QGIS itself does."""
    with db_errors("layer_styles"), conn.transaction():
        conn.execute(sql_text("publish_layer_styles_table"))
        for col in ("type", "r_raster_column"):
            conn.execute(sql.SQL("ALTER TABLE public.layer_styles ADD COLUMN IF NOT EXISTS {} "
                                 "varchar NULL").format(sql.Identifier(col)))


def save_style(conn: psycopg.Connection, table: str, qml: str, *, geometry_column: str | None = None,
               raster_column: str | None = None, name: str | None = None, description: str = "",
               geometry_type: str | None = None, default: bool = True) -> int:
    """Store ``qml`` as a style of ``table`` in public.layer_styles (the default one unless
    ``default=False``); give exactly one of ``geometry_column`` (vector layer, with
    ``geometry_type`` such as ``'Polygon'``) or ``raster_column``. Returns the row id."""
    if (geometry_column is None) == (raster_column is None):
        raise errors.ConfigError("a style is for a geometry column or a raster column: give one")
    schema, tname = split_table(table)
    params = {"schema": schema, "table": tname, "geometry_column": geometry_column,
              "raster_column": raster_column, "name": name or tname, "qml": qml,
              "default": default, "description": description, "type": geometry_type}
    ensure_layer_styles(conn)
    with db_errors(f"style of {schema}.{tname}"), conn.transaction():
        conn.execute(sql_text("publish_delete_style"), params)
        return conn.execute(sql_text("publish_save_style"), params).fetchone()[0]


# ------------------------------------------------------------------------------------------
# tables


@dataclass
class RasterInfo:
    """What raster_columns says about a published raster table."""

    table: str
    srid: int | None
    scale: tuple[float, float] | None
    blocksize: tuple[int, int] | None
    bands: int | None
    pixel_types: list[str]
    nodata: list[float | None]
    overviews: list[str]


def drop_overviews(conn: psycopg.Connection, table: str, column: str = "rast") -> list[str]:
    """Drop the overview tables registered for ``table`` in raster_overviews; return their names."""
    schema, name = split_table(table)
    rows = conn.execute(
        "SELECT o_table_schema, o_table_name FROM raster_overviews"
        " WHERE r_table_schema = %s AND r_table_name = %s AND r_raster_column = %s",
        [schema, name, column]).fetchall()
    for s, o in rows:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(s, o)))
    return [f"{s}.{o}" for s, o in rows]


def publish_raster(conn: psycopg.Connection, table: str, *, column: str = "rast",
                   overviews: Sequence[int] = (2, 4), overview_algorithm: str = "NearestNeighbour",
                   ) -> RasterInfo:
    """Index, constrain, build overviews for and analyze a raster table (see module docstring).

    Existing constraints and overview tables are replaced, so it can run again after rows were
    added. ``overview_algorithm``: ``nearest`` (or ``NearestNeighbour``) for classes,
    ``average`` (or ``Bilinear``) for continuous values.
    """
    schema, name = split_table(table)
    ident = sql.Identifier(schema, name)
    col = sql.Identifier(column)
    with db_errors(f"publish {schema}.{name}"), conn.transaction():
        conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING gist (ST_ConvexHull({}))").format(
            index_name(name, "st_convexhull_idx"), ident, col))
        drop_overviews(conn, f"{schema}.{name}", column)
        conn.execute("SELECT DropRasterConstraints(%s::name, %s::name, %s::name)",
                     [schema, name, column])
        conn.execute(sql_text("raster_constraints"),
                     {"schema": schema, "table": name, "column": column})
        grid = overviews_mod.base_grid(conn, f"{schema}.{name}", column) if overviews else None
        made = [overviews_mod.build_overview(conn, f"{schema}.{name}", int(f), column=column,
                                             method=overview_algorithm, grid=grid)[0]
                for f in overviews]
        conn.execute(sql.SQL("ANALYZE {}").format(ident))
        row = conn.execute(
            "SELECT srid, scale_x, scale_y, blocksize_x, blocksize_y, num_bands, pixel_types,"
            " nodata_values FROM raster_columns WHERE r_table_schema = %s AND r_table_name = %s"
            " AND r_raster_column = %s", [schema, name, column]).fetchone()
    if row is None:
        raise errors.NotFound(f"{schema}.{name}.{column} is not in raster_columns")
    srid, sx, sy, bx, by, nb, types, nodata = row
    return RasterInfo(f"{schema}.{name}", srid, (sx, sy) if sx is not None else None,
                      (bx, by) if bx is not None else None, nb, list(types or []),
                      list(nodata or []), made)


def publish_vector(conn: psycopg.Connection, table: str, *, column: str = "geom") -> None:
    """GiST index on the geometry column and ANALYZE (the column should have a typmod)."""
    schema, name = split_table(table)
    ident = sql.Identifier(schema, name)
    with db_errors(f"publish {schema}.{name}"), conn.transaction():
        conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING gist ({})").format(
            index_name(name, f"{column}_idx"), ident, sql.Identifier(column)))
        conn.execute(sql.SQL("ANALYZE {}").format(ident))


def gdal_connstring(conn: psycopg.Connection, table: str, *, column: str | None = None,
                    mode: int | None = 2) -> str:
    """``PG:...`` connection string for gdalinfo (``column=``, ``mode=2``) or ogrinfo (no column)."""
    schema, name = split_table(table)
    info = conn.info
    parts = [f"dbname='{info.dbname}'", f"host='{info.host}'", f"port='{info.port}'",
             f"user='{info.user}'"]
    if column is not None:
        parts += [f"schema='{schema}'", f"table='{name}'", f"column='{column}'"]
        if mode is not None:
            parts.append(f"mode='{mode}'")
    return "PG:" + " ".join(parts)
