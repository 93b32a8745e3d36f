"""One QGIS project per dataset, stored in the database (``<schema>.qgis_projects``).

QGIS (>= 3.2) lists the projects of a schema under Browser → PostgreSQL → the connection →
the schema, and opens them with a double click. A project is a row ``(name, metadata jsonb,
content bytea)``; ``content`` is a ``.qgz`` (a zip holding ``<name>.qgs``) and ``metadata`` has
``last_modified_time`` and ``last_modified_user``, as QGIS's own QgsPostgresProjectStorage
writes them. The ``.qgs`` XML is generated here (no QGIS needed to write it), with every
layer's style inside it: raster class colours then show in every QGIS version (QGIS reads
raster styles from ``layer_styles`` only from 3.42).

Groups, top to bottom: **Review** (predicted objects against the map: new / missing / changed),
**Predictions** (per model: polygons, class raster, probabilities), **Evaluation** (per-tile
IoU), **Training data** (the label sources the recipe reads, chip footprints by split) and
**Imagery**. The extent is the dataset's, grown to every prediction's.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import re
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from pggeolearn import errors, palette, publish
from pggeolearn.db.errors import db_errors
from pggeolearn.qgis.review import review_comment, review_qml
from pggeolearn.qgis.uris import layer_uri
from pggeolearn.resources import sql_text

__all__ = ["DEFAULT_SCHEMA", "Layer", "Project", "build_project", "project_xml", "refresh_after",
           "write_project"]

DEFAULT_SCHEMA = "pggeolearn"
QGIS_VERSION = "3.22.0"  # the project dialect written here; newer QGIS versions read it
_QGIS_TYPES = {"POINT": "Point", "MULTIPOINT": "MultiPoint", "LINESTRING": "LineString",
               "MULTILINESTRING": "MultiLineString", "POLYGON": "Polygon", "MULTIPOLYGON": "MultiPolygon"}
_GEOMETRY = {"Point": "Point", "MultiPoint": "Point", "LineString": "Line", "MultiLineString": "Line",
             "Polygon": "Polygon", "MultiPolygon": "Polygon"}
LABEL_RGB = (255, 255, 255)  # outlines of the recipe's label sources, over imagery


@dataclass
class Layer:
    name: str
    table: str  # schema.name
    uri: str
    raster: bool
    qml: str | None
    srid: int
    geometry_type: str | None = None  # QGIS's name (MultiPolygon, LineString, ...)
    visible: bool = True
    value_maps: dict[str, tuple[str, ...]] = field(default_factory=dict)  # field -> choices (a drop-down)


@dataclass
class Project:
    name: str
    schema: str
    srid: int
    extent: tuple[float, float, float, float]
    groups: list[tuple[str, list[Layer]]] = field(default_factory=list)

    @property
    def layers(self) -> list[Layer]:
        return [layer for _, layers in self.groups for layer in layers]

    def __str__(self) -> str:
        lines = [f"QGIS project {self.name!r} in {self.schema}.qgis_projects (QGIS >= 3.2: Browser > "
                 f"PostgreSQL > this database > {self.schema} > {self.name})"]
        for group, layers in self.groups:
            lines.append(f"  {group}: " + ", ".join(f"{lyr.name} ({lyr.table})" for lyr in layers))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# what goes in


def _mentions(text: str, schema: str, table: str) -> bool:
    """Whether SQL ``text`` names ``schema.table`` (or ``table`` alone, for public)."""
    t = text.lower()
    pat = rf"(?<![\w.\"])\"?{re.escape(schema.lower())}\"?\s*\.\s*\"?{re.escape(table.lower())}\b"
    if re.search(pat, t):
        return True
    return schema == "public" and re.search(rf"(?<![\w.\"])\"?{re.escape(table.lower())}\b(?!\s*\.)", t) is not None


def _vector_layer(conn: psycopg.Connection, name: str, row, qml: str | None, visible: bool = True) -> Layer:
    _, schema, table, column, srid, gtype, key = row[:7]
    qtype = _QGIS_TYPES.get((gtype or "").upper())
    if qtype is None:  # a generic geometry column: the type of its first row
        found = conn.execute(sql.SQL("SELECT GeometryType({}) FROM {} WHERE {} IS NOT NULL LIMIT 1").format(
            sql.Identifier(column), sql.Identifier(schema, table), sql.Identifier(column))).fetchone()
        qtype = _QGIS_TYPES.get((found[0] if found else "").upper(), "MultiPolygon")
    uri = layer_uri(conn, f"{schema}.{table}", column=column, geometry_type=qtype, srid=srid, key=key)
    return Layer(name, f"{schema}.{table}", uri, False, qml, srid, qtype, visible)


def _raster_layer(conn: psycopg.Connection, name: str, table: str, srid: int, qml: str | None,
                  visible: bool = True) -> Layer:
    return Layer(name, table, layer_uri(conn, table, raster=True), True, qml, srid, None, visible)


def build_project(conn: psycopg.Connection, dataset: str, *, models: list[str] | None = None,
                  schema: str = DEFAULT_SCHEMA) -> Project:
    """Collect the layers of ``dataset``'s project (see the module docstring); writes nothing
    except the chip footprints view (:func:`pggeolearn.chips.map_view`)."""
    from pggeolearn import chips, datasets

    ds = datasets.get(conn, dataset)
    r = ds.recipe
    classes = {0: "background", **{int(k): str(v) for k, v in r.classes.items()}}
    colours = palette.palette(classes)
    with db_errors(f"QGIS project of {dataset}"):
        runs = conn.execute(sql_text("qgis_project_runs"), {"dataset": dataset, "models": models,
                                                            "srid": r.srid}).fetchall()
        tables = conn.execute(sql_text("qgis_project_tables"), {}).fetchall()
    rasters = {f"{t[1]}.{t[2]}": t for t in tables if t[0] == "raster"}
    vectors = {f"{t[1]}.{t[2]}": t for t in tables if t[0] == "vector"}
    project = Project(dataset, schema, r.srid, tuple(conn.execute(
        "SELECT minx, miny, maxx, maxy FROM pggeolearn.datasets WHERE name = %s", [dataset]).fetchone()))

    review, predictions, evaluation = [], [], []
    imagery_sql = [r.image_sql, r.extent_from or ""]
    for run_id, kind, model, cls, prob, polys, evl, imagery, *box in runs:
        if box[0] is not None:
            project.extent = (min(project.extent[0], box[0]), min(project.extent[1], box[1]),
                              max(project.extent[2], box[2]), max(project.extent[3], box[3]))
        if kind == "evaluate":
            if evl in vectors:
                evaluation.append(_vector_layer(conn, f"{model}: IoU per tile", vectors[evl],
                                                publish.graduated_qml("miou", palette.IOU_RANGES)))
            continue
        imagery_sql.append(imagery or "")
        if polys in vectors:
            cats = [(k, classes[k], colours[k]) for k in sorted(classes) if k != 0]
            predictions.append(_vector_layer(conn, f"{model}: objects", vectors[polys],
                                             publish.categorized_qml("class_id", cats)))
            for key, row in sorted(vectors.items()):
                if (row[8] or "").startswith(review_comment(run_id)):
                    layer = _vector_layer(conn, f"{model}: review ({key.split('.')[-1]})", row, review_qml())
                    layer.value_maps = {"status": palette.REVIEW_STATUS}
                    review.append(layer)
        if cls in rasters:
            predictions.append(_raster_layer(conn, f"{model}: classes", cls, r.srid,
                                             publish.class_raster_qml(classes, colours)))
        if prob in rasters:
            first = min(k for k in classes if k != 0)
            predictions.append(_raster_layer(conn, f"{model}: p({classes[first]})", prob, r.srid,
                                             publish.gray_raster_qml(sorted(classes).index(first) + 1, 0, 254),
                                             visible=False))
    training = []
    for _key, row in sorted(vectors.items()):
        if row[1] != "pggeolearn" and _mentions(r.label_sql, row[1], row[2]):
            geometry = _GEOMETRY.get(_QGIS_TYPES.get((row[5] or "").upper(), ""), "Polygon").lower()
            qml = publish.single_symbol_qml(LABEL_RGB, geometry="line" if geometry == "line" else "polygon")
            training.append(_vector_layer(conn, f"labels: {row[2]}", row, qml))
    n_chips = conn.execute("SELECT count(*) FROM pggeolearn.chips WHERE dataset = %s", [dataset]).fetchone()[0]
    if n_chips:
        view = chips.map_view(conn, dataset)
        row = ("vector", view.schema, view.name, "geom", r.srid, "POLYGON", "tile_id", None)
        splits = [(s, s or "unassigned", palette.SPLIT_RGB[s]) for s in ("train", "val", "test", "excluded")]
        training.append(_vector_layer(conn, "chips by split", row,
                                      publish.categorized_qml("split", splits, fill_alpha=0), visible=False))
    imagery = [_raster_layer(conn, f"imagery: {row[2]}", key, row[4] or r.srid, None)
               for key, row in sorted(rasters.items())
               if key not in {lyr.table for lyr in predictions}
               and any(_mentions(text, row[1], row[2]) for text in imagery_sql)]
    for group, layers in (("Review", review), ("Predictions", predictions), ("Evaluation", evaluation),
                          ("Training data", training), ("Imagery", imagery)):
        if layers:
            project.groups.append((group, layers))
    return project


# ------------------------------------------------------------------------------------------
# the .qgs document


def _layer_id(layer: Layer) -> str:
    slug = re.sub(r"\W+", "_", layer.name).strip("_")[:40]
    return f"{slug}_{hashlib.sha1(layer.uri.encode()).hexdigest()[:12]}"


def _srs(parent: ET.Element, srid: int, srs: dict[int, tuple[str, str]]) -> None:
    el = ET.SubElement(parent, "spatialrefsys")
    wkt, proj4 = srs.get(srid, ("", ""))
    ET.SubElement(el, "wkt").text = wkt
    ET.SubElement(el, "proj4").text = proj4
    ET.SubElement(el, "authid").text = f"EPSG:{srid}"


def _extent(parent: ET.Element, ext: tuple[float, float, float, float]) -> None:
    for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), ext, strict=True):
        ET.SubElement(parent, tag).text = repr(float(v))


def project_xml(project: Project, srs: dict[int, tuple[str, str]]) -> str:
    """The ``.qgs`` document of ``project`` (``srs``: srid -> (WKT, PROJ) from spatial_ref_sys)."""
    root = ET.Element("qgis", {"projectname": project.name, "version": QGIS_VERSION})
    ET.SubElement(root, "homePath", {"path": ""})
    ET.SubElement(root, "title").text = f"pggeolearn: {project.name}"
    _srs(ET.SubElement(root, "projectCrs"), project.srid, srs)
    props = ET.SubElement(ET.SubElement(root, "properties"), "SpatialRefSys")
    ET.SubElement(props, "ProjectionsEnabled", {"type": "int"}).text = "1"  # else projectCrs is ignored
    tree = ET.SubElement(root, "layer-tree-group")
    ET.SubElement(tree, "customproperties")
    for group, layers in project.groups:
        g = ET.SubElement(tree, "layer-tree-group", {"name": group, "checked": "Qt::Checked", "expanded": "1"})
        ET.SubElement(g, "customproperties")
        for layer in layers:
            node = ET.SubElement(g, "layer-tree-layer", {
                "id": _layer_id(layer), "name": layer.name, "source": layer.uri,
                "providerKey": "postgresraster" if layer.raster else "postgres",
                "checked": "Qt::Checked" if layer.visible else "Qt::Unchecked", "expanded": "0"})
            ET.SubElement(node, "customproperties")
    canvas = ET.SubElement(root, "mapcanvas", {"name": "theMapCanvas", "annotationsVisible": "1"})
    ET.SubElement(canvas, "units").text = "meters"
    _extent(ET.SubElement(canvas, "extent"), project.extent)
    ET.SubElement(canvas, "rotation").text = "0"
    _srs(ET.SubElement(canvas, "destinationsrs"), project.srid, srs)
    ET.SubElement(canvas, "rendermaptile").text = "0"
    ET.SubElement(root, "legend", {"updateDrawingOrder": "true"})
    maplayers = ET.SubElement(root, "projectlayers")
    for layer in project.layers:
        maplayers.append(_maplayer(layer, srs))
    view = ET.SubElement(root, "ProjectViewSettings", {"UseProjectScales": "0"})
    ET.SubElement(view, "Scales")
    xmin, ymin, xmax, ymax = project.extent
    dv = ET.SubElement(view, "DefaultViewExtent", {"xmin": repr(xmin), "ymin": repr(ymin),
                                                   "xmax": repr(xmax), "ymax": repr(ymax)})
    _srs(dv, project.srid, srs)
    return publish.DOCTYPE + "\n" + ET.tostring(root, encoding="unicode")


def _maplayer(layer: Layer, srs: dict[int, tuple[str, str]]) -> ET.Element:
    attrs = {"type": "raster" if layer.raster else "vector", "styleCategories": "AllStyleCategories",
             "hasScaleBasedVisibilityFlag": "0", "minScale": "1e+08", "maxScale": "0",
             "autoRefreshEnabled": "0", "refreshOnNotifyEnabled": "0"}
    if not layer.raster:
        attrs |= {"geometry": _GEOMETRY.get(layer.geometry_type or "", "Polygon"),
                  "wkbType": layer.geometry_type or "MultiPolygon"}
    el = ET.Element("maplayer", attrs)
    ET.SubElement(el, "id").text = _layer_id(layer)
    ET.SubElement(el, "datasource").text = layer.uri
    ET.SubElement(el, "layername").text = layer.name
    _srs(ET.SubElement(el, "srs"), layer.srid, srs)
    ET.SubElement(el, "provider", {} if layer.raster else {"encoding": "UTF-8"}).text = (
        "postgresraster" if layer.raster else "postgres")
    if layer.qml:
        style = ET.fromstring(layer.qml.split("\n", 1)[1] if layer.qml.startswith("<!DOCTYPE") else layer.qml)
        for child in style:
            el.append(child)
    if layer.value_maps:
        fields = ET.SubElement(el, "fieldConfiguration")
        for name, choices in layer.value_maps.items():
            widget = ET.SubElement(ET.SubElement(fields, "field", {"name": name, "configurationFlags": "None"}),
                                   "editWidget", {"type": "ValueMap"})
            options = ET.SubElement(ET.SubElement(ET.SubElement(widget, "config"), "Option", {"type": "Map"}),
                                    "Option", {"type": "List", "name": "map"})
            for choice in choices:
                ET.SubElement(ET.SubElement(options, "Option", {"type": "Map"}), "Option",
                              {"type": "QString", "name": choice, "value": choice})
    return el


# ------------------------------------------------------------------------------------------
# the database


def _qgz(name: str, xml: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{name}.qgs", xml)
    return buf.getvalue()


def write_project(conn: psycopg.Connection, dataset: str, *, models: list[str] | None = None,
                  schema: str = DEFAULT_SCHEMA) -> Project:
    """Write or refresh the QGIS project of ``dataset`` in ``schema.qgis_projects`` (created as
    QGIS creates it when missing); returns what it holds."""
    if not schema or len(schema.encode()) > 63:
        raise errors.ConfigError(f"invalid schema name {schema!r}")
    with conn.transaction():
        project = build_project(conn, dataset, models=models, schema=schema)
        srids = sorted({project.srid, *(lyr.srid for lyr in project.layers)})
        srs = {s: (w or "", p or "") for s, w, p in conn.execute(
            "SELECT srid, srtext, proj4text FROM spatial_ref_sys WHERE srid = ANY(%s)", [srids])}
        xml = project_xml(project, srs)
        table = sql.Identifier(schema, "qgis_projects")
        meta = {"last_modified_time": dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat(),
                "last_modified_user": conn.info.user}
        with db_errors(f"{schema}.qgis_projects"):
            # pggeolearn.qgis_projects comes with the schema (migration 0004); elsewhere it is
            # created as QGIS creates it, by a role that may create tables there
            if conn.execute("SELECT to_regclass(%s) IS NULL",
                            [table.as_string(conn)]).fetchone()[0]:
                conn.execute(sql.SQL(sql_text("qgis_projects_table")).format(table=table))
            conn.execute(sql.SQL(sql_text("qgis_project_save")).format(table=table),
                         {"name": project.name, "metadata": json.dumps(meta), "content": _qgz(project.name, xml)})
    return project


def refresh_after(conn: psycopg.Connection, model: str, dataset: str | None) -> list[str]:
    """After ``predict``/``evaluate``: refresh the project of the dataset (the model's, when no
    dataset was given). Returns notes for the report; a model not in the registry (a Python
    object) has no dataset and no project."""
    try:
        if dataset is None:
            row = conn.execute("SELECT dataset FROM pggeolearn.models WHERE name = %s", [model]).fetchone()
            if row is None:
                return []
            dataset = row[0]
        project = write_project(conn, dataset)
    except errors.PggeolearnError as exc:
        return [f"QGIS project not refreshed: {exc}"]
    return [f"QGIS project {project.name!r} refreshed in {project.schema}.qgis_projects "
            f"({len(project.layers)} layers; QGIS: Browser > PostgreSQL > {project.schema})"]
