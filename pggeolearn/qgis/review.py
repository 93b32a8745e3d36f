"""Review layer: what a model found against what the map has, for mappers to act on in QGIS.

:func:`review` compares the predicted objects of a ``predict`` run with the features of a map
table (OSM buildings from osm2pgsql, an import, any polygon table) inside the run's extent and
writes one row per object worth a look (``kind``: new / missing / changed, see
``sql/review_compare.sql``) with a ``status`` (todo / accepted / rejected) and a ``note`` that
QGIS users edit in place. :func:`export` writes the accepted new objects (by default) as GeoJSON
in WGS 84, ready for mapping tools. The table is styled by kind (``layer_styles`` and the
dataset's QGIS project).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from pggeolearn import errors, palette, publish
from pggeolearn.db.errors import db_errors
from pggeolearn.db.names import split_table
from pggeolearn.resources import sql_text

__all__ = ["DEFAULT_IOU", "ReviewReport", "export", "review", "review_comment", "review_qml"]

DEFAULT_IOU = 0.5
KINDS = tuple(palette.REVIEW_RGB)


def review_comment(run_id: int) -> str:
    """The start of a review table's comment (how the QGIS project finds the run's review)."""
    return f"pggeolearn review: run {int(run_id)} "


def review_qml() -> str:
    """Review objects coloured by kind (new, missing, changed): the one style of the layer."""
    return publish.categorized_qml("kind", [(k, k, rgb) for k, rgb in palette.REVIEW_RGB.items()])


@dataclass
class ReviewReport:
    table: str
    run_id: int
    against: str
    iou: float
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        counts = ", ".join(f"{self.counts.get(k, 0)} {k}" for k in KINDS)
        lines = [f"review {self.table}: run {self.run_id} against {self.against} (IoU threshold "
                 f"{self.iou:g}): {counts}",
                 "edit column status (todo/accepted/rejected) and note in QGIS; then: "
                 f"pggeolearn review export {self.table} --out new.geojson"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _map_columns(conn: psycopg.Connection, table: str, geom_column: str | None) -> tuple[str, int, str]:
    """(geometry column, SRID, key expression) of the map table."""
    schema, name = split_table(table)
    rows = conn.execute("SELECT f_geometry_column, srid FROM geometry_columns WHERE f_table_schema = %s"
                        " AND f_table_name = %s ORDER BY f_geometry_column", [schema, name]).fetchall()
    if not rows:
        raise errors.NotFound(f"{schema}.{name} has no geometry column (is it a table or view with geometry?)")
    if geom_column is not None:
        rows = [r for r in rows if r[0] == geom_column]
        if not rows:
            raise errors.NotFound(f"{schema}.{name} has no geometry column {geom_column!r}")
    column, srid = rows[0]
    if not srid:
        srid = conn.execute(sql.SQL("SELECT ST_SRID({}) FROM {} LIMIT 1").format(
            sql.Identifier(column), sql.Identifier(schema, name))).fetchone()
        srid = srid[0] if srid else 0
    if not srid:
        raise errors.SridMismatch(f"{schema}.{name}.{column} has SRID 0: set its CRS first")
    key = conn.execute(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
        " AND a.attnum = i.indkey[0] WHERE i.indrelid = %s::regclass AND i.indisprimary AND i.indnatts = 1",
        [sql.Identifier(schema, name).as_string(conn)]).fetchone()
    if key is None:
        key = conn.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attname = 'osm_id'"
                           " AND NOT attisdropped", [sql.Identifier(schema, name).as_string(conn)]).fetchone()
    return column, srid, f"t.{sql.Identifier(key[0]).as_string(conn)}" if key else "t.ctid"


def review(conn: psycopg.Connection, run_id: int, against: str, *, out: str | None = None,
           iou: float = DEFAULT_IOU, classes: list[str] | None = None, geom_column: str | None = None,
           overwrite: bool = False) -> ReviewReport:
    """Write the review table of predict run ``run_id`` against map table ``against`` (default
    name: the run's class raster + ``_review``, beside its ``_polygons``); ``classes``: class names or ids to compare
    (default: every class of the run's objects)."""
    if not 0 < iou <= 1:
        raise errors.ConfigError(f"the IoU threshold must be in (0, 1], not {iou}")
    row = conn.execute("SELECT kind, status, outputs ->> 'polygons', (outputs ->> 'srid')::int, model,"
                       " outputs ->> 'class_raster'"
                       " FROM pggeolearn.runs WHERE run_id = %s", [run_id]).fetchone()
    if row is None or row[0] != "predict":
        raise errors.NotFound(f"run {run_id} is not a prediction (pggeolearn.runs)")
    if row[1] != "done" or not row[2]:
        raise errors.NotBuilt(f"run {run_id} has no polygon output (status {row[1]}; predict without "
                              "--no-polygons writes one)")
    polygons, srid, model = row[2], row[3], row[4]
    for t in (polygons, row[5]):
        if not t or conn.execute("SELECT to_regclass(%s)", [t]).fetchone()[0] is None:
            raise errors.NotFound(f"the outputs of run {run_id} ({polygons}, {row[5]}) no longer exist")
    ps, pn = split_table(polygons)
    cs, cn = split_table(row[5])
    target = split_table(out, ps) if out else (cs, f"{cn}_review")
    if len(target[1].encode()) > 63:
        raise errors.ConfigError(f"table name {target[1]!r} is longer than 63 bytes: pass --out")
    ms, mn = split_table(against)
    map_geom, map_srid, key = _map_columns(conn, f"{ms}.{mn}", geom_column)
    present = conn.execute(sql.SQL("SELECT DISTINCT class_id, class_name FROM {} ORDER BY 1").format(
        sql.Identifier(ps, pn))).fetchall()
    class_ids = [c for c, n in present if classes is None or str(c) in classes or n in classes]
    if classes is not None:
        unknown = set(classes) - {str(c) for c, _ in present} - {n for _, n in present}
        if unknown:
            raise errors.ConfigError(f"no objects of class {', '.join(sorted(unknown))} in {polygons} "
                                     f"(classes: {', '.join(n for _, n in present) or 'none'})")
    ident = sql.Identifier(*target)
    report = ReviewReport(f"{target[0]}.{target[1]}", run_id, f"{ms}.{mn}", iou)
    with db_errors(f"review of run {run_id}"), conn.transaction():
        if conn.execute("SELECT to_regclass(%s)", [ident.as_string(conn)]).fetchone()[0] is not None:
            if not overwrite:
                raise errors.AlreadyExists(f"table {report.table} already exists: pass --overwrite to "
                                           "replace it (its statuses are lost)")
            conn.execute(sql.SQL("DROP TABLE {}").format(ident))
        conn.execute(sql.SQL(sql_text("review_table")).format(table=ident, srid=sql.Literal(srid)))
        conn.execute(sql.SQL(sql_text("review_compare")).format(
            table=ident, pred=sql.Identifier(ps, pn), cls=sql.Identifier(cs, cn), map=sql.Identifier(ms, mn),
            map_geom=sql.Identifier(map_geom), map_key=sql.SQL(key)),
            {"run_id": run_id, "srid": srid, "map_srid": map_srid, "iou": iou, "class_ids": class_ids})
        report.counts = dict(conn.execute(sql.SQL("SELECT kind, count(*) FROM {} GROUP BY 1").format(ident)
                                          ).fetchall())
        conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(ident, sql.Literal(
            review_comment(run_id) + f"({polygons}, model {model}) against {ms}.{mn}, IoU threshold {iou:g}")))
        publish.publish_vector(conn, report.table)
        publish.save_style(conn, report.table, review_qml(), geometry_column="geom", geometry_type="Polygon",
                           name=f"{target[1]} by kind", description=f"pggeolearn review of run {run_id}")
    return report


def export(conn: psycopg.Connection, table: str, out: str | Path, *, kinds: list[str] | None = None,
           statuses: list[str] | None = None) -> int:
    """Write the review objects of ``kinds`` (default: new) with ``statuses`` (default:
    accepted) as a GeoJSON FeatureCollection in WGS 84; returns the number written."""
    kinds = kinds or ["new"]
    statuses = statuses or ["accepted"]
    for value, allowed, what in ((kinds, KINDS, "kind"), (statuses, palette.REVIEW_STATUS, "status")):
        bad = sorted(set(value) - set(allowed))
        if bad:
            raise errors.ConfigError(f"unknown {what} {', '.join(bad)} (one of {', '.join(allowed)})")
    path = Path(out)
    if not path.parent.is_dir():
        raise errors.ConfigError(f"folder {path.parent} does not exist")
    ident = sql.Identifier(*split_table(table))
    with db_errors(f"review {table}"):
        rows = conn.execute(sql.SQL(sql_text("review_export")).format(table=ident),
                            {"kinds": kinds, "statuses": statuses}).fetchall()
    features = [{"type": "Feature", "id": r[0], "geometry": json.loads(r[8]),
                 "properties": {"review_id": r[0], "kind": r[1], "status": r[2], "class": r[3],
                                "iou": r[4], "area_m2": r[5], "note": r[6], "map_ids": r[7]}}
                for r in rows]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}, separators=(",", ":")))
    return len(features)
