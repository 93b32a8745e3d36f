"""Writing the outputs, all in ONE transaction on the writer connection: tables with a
temporary name (``pgl_predict_<run>_class``/``_prob``), filled tile row by tile row through
pipelined ``INSERT ... ST_RastFromWKB(%b)`` (lz4 compression where the server has it, else
``STORAGE EXTERNAL``), polygon pieces staged by ``COPY``, then renamed (or appended to the
existing tables) with their indexes, constraints, overviews, groups of pieces dissolved into
objects (``sql/predict_polygons.sql``), default QGIS styles and table comments."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import psycopg
from psycopg import sql

from pggeolearn import wkb
from pggeolearn.predict.grid import NODATA, PROB_SCALE
from pggeolearn.predict.model import Predictor, model_class_ids
from pggeolearn.predict.plan import OutputNames, Plan, relkind
from pggeolearn.predict.polygons import Pieces
from pggeolearn.resources import sql_text

__all__ = ["Writer", "create_schemas"]


def _tmp_name(run_id: int, what: str) -> str:
    return f"pgl_predict_{run_id}_{what}"


def _set_storage(w: psycopg.Connection, ident: sql.Identifier) -> str:
    """lz4 compression on the raster column (PostgreSQL >= 14 built with lz4), else EXTERNAL."""
    try:
        with w.transaction():
            w.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN rast SET COMPRESSION lz4").format(ident))
        return "lz4"
    except psycopg.Error:
        w.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN rast SET STORAGE EXTERNAL").format(ident))
        return "external"


class Writer:
    """Everything that goes into the database during one run, on one transaction."""

    def __init__(self, w: psycopg.Connection, plan: Plan, run_id: int, *, probabilities: bool,
                 vectorize: bool, min_pixels: int = 1):
        self.w, self.plan, self.run_id = w, plan, run_id
        self.schema = None
        self.probabilities, self.vectorize = probabilities, vectorize
        self.class_ids = model_class_ids(plan.predictor)
        self.identity_classes = np.array_equal(self.class_ids, np.arange(len(self.class_ids)))
        self.pieces = Pieces(plan.grid, plan.tile_px, min_pixels) if vectorize else None
        self.tiles = self.empty = 0
        self.write_s = self.vector_s = 0.0

    def create(self, schema: str) -> None:
        self.schema = schema
        self.cls_ident = sql.Identifier(schema, _tmp_name(self.run_id, "class"))
        self.prob_ident = sql.Identifier(schema, _tmp_name(self.run_id, "prob"))
        tables = [self.cls_ident] + ([self.prob_ident] if self.probabilities else [])
        for ident in tables:
            self.w.execute(sql.SQL("CREATE TABLE {} (rid integer NOT NULL, run_id bigint NOT NULL, "
                                   "rast raster NOT NULL)").format(ident))
            self.storage = _set_storage(self.w, ident)
        if self.vectorize:
            self.w.execute("CREATE TEMP TABLE pggeolearn_pieces (piece_id bigint, class_id integer, "
                           "px bigint, prob_sum float8, wkb bytea) ON COMMIT DROP")
        self.insert_cls = sql.SQL("INSERT INTO {} (rid, run_id, rast) VALUES (%s, %s, ST_RastFromWKB(%b))"
                                  ).format(self.cls_ident)
        self.insert_prob = sql.SQL("INSERT INTO {} (rid, run_id, rast) VALUES (%s, %s, ST_RastFromWKB(%b))"
                                   ).format(self.prob_ident)

    def tile_row(self, row0: int, probs: np.ndarray, valid: np.ndarray) -> None:
        g, T = self.plan.grid, self.plan.tile_px
        t0 = time.perf_counter()
        am = probs.argmax(axis=0)
        cls = (am if self.identity_classes else self.class_ids[am]).astype(np.uint8)
        cls[~valid] = NODATA
        pmax = np.take_along_axis(probs, am[None], axis=0)[0]
        j = row0 // T
        ntx = math.ceil(g.width / T)
        cls_rows, prob_rows, piece_rows = [], [], []
        if self.pieces is not None:
            self.pieces.start_row()
        vec_s = 0.0
        for i in range(ntx):
            c0, c1 = i * T, min((i + 1) * T, g.width)
            v = valid[:, c0:c1]
            if not self.plan.needed_tiles[j, i] or not v.any():
                if self.plan.needed_tiles[j, i]:
                    self.empty += 1
                if self.pieces is not None:
                    self.pieces.skip_tile()
                continue
            rid = j * ntx + i
            gt = g.geotransform(row0, c0)
            tile = np.ascontiguousarray(cls[:, c0:c1])
            cls_rows.append((rid, self.run_id, wkb.encode(wkb.from_array(
                tile, geotransform=gt, srid=g.srid, nodata=NODATA))))
            if self.probabilities:
                pb = np.rint(probs[:, :, c0:c1] * PROB_SCALE).astype(np.uint8)
                pb[:, ~v] = NODATA
                prob_rows.append((rid, self.run_id, wkb.encode(wkb.from_array(
                    pb, geotransform=gt, srid=g.srid, nodata=NODATA))))
            if self.pieces is not None:
                tv = time.perf_counter()
                piece_rows += self.pieces.add_tile(row0, c0, tile, pmax[:, c0:c1])
                vec_s += time.perf_counter() - tv
            self.tiles += 1
        with self.w.cursor() as cur:
            if cls_rows:
                cur.executemany(self.insert_cls, cls_rows)
            if prob_rows:
                cur.executemany(self.insert_prob, prob_rows)
            if piece_rows:
                with cur.copy("COPY pggeolearn_pieces (piece_id, class_id, px, prob_sum, wkb) "
                              "FROM STDIN (FORMAT BINARY)") as cp:
                    cp.set_types(["int8", "int4", "int8", "float8", "bytea"])
                    for row in piece_rows:
                        cp.write_row(row)
        self.vector_s += vec_s
        self.write_s += time.perf_counter() - t0 - vec_s

    def finish(self, names: OutputNames, *, append: bool, overviews: Sequence[int], model_name: str
               ) -> tuple[list[str], int]:
        """The temporary tables renamed (or appended) into ``names`` with overviews, the polygons
        dissolved, styles and comments saved: (the class raster's overviews, polygon count)."""
        w, run_id = self.w, self.run_id
        done = _finish_raster(w, self.cls_ident, names.out, append=append, algorithm="NearestNeighbour",
                              overviews=overviews)
        if names.prob:
            _finish_raster(w, self.prob_ident, names.prob, append=append, algorithm="Bilinear",
                           overviews=overviews)
        n = 0
        if names.polygons:
            n = _finish_polygons(w, self, names.polygons, append=append, model_name=model_name,
                                 run_id=run_id)
        _save_styles(w, self.plan.predictor, names, model_name)
        for t, what in ((names.out, "class raster"), (names.prob, "class probabilities"),
                        (names.polygons, "objects")):
            if t:
                w.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(
                    sql.Identifier(*t), sql.Literal(
                        f"pggeolearn predict: {what} of model {model_name} (run {run_id})")))
        return done, n


def create_schemas(w: psycopg.Connection, names: OutputNames) -> list[str]:
    """Creates the output schemas that do not exist yet; a note for each."""
    notes = []
    for schema in sorted({t[0] for t in (names.out, names.prob, names.polygons) if t}):
        if not w.execute("SELECT to_regnamespace(%s) IS NOT NULL", [schema]).fetchone()[0]:
            w.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            notes.append(f"created schema {schema}")
    return notes


def _drop_output(w: psycopg.Connection, schema: str, name: str, raster: bool) -> None:
    from pggeolearn import publish

    if raster:
        publish.drop_overviews(w, f"{schema}.{name}")
    w.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(schema, name)))


def _finish_raster(w: psycopg.Connection, tmp: sql.Identifier, target: tuple[str, str], *,
                   append: bool, algorithm: str, overviews: Sequence[int]) -> list[str]:
    from pggeolearn import publish

    schema, name = target
    ident = sql.Identifier(schema, name)
    exists = relkind(w, schema, name) is not None
    if append and exists:
        off = w.execute(sql.SQL("SELECT coalesce(max(rid) + 1, 0) FROM {}").format(ident)).fetchone()[0]
        w.execute("SELECT DropRasterConstraints(%s::name, %s::name, 'rast'::name)", [schema, name])
        w.execute(sql.SQL("INSERT INTO {} (rid, run_id, rast) SELECT rid + %s, run_id, rast FROM {}"
                          ).format(ident, tmp), [off])
        w.execute(sql.SQL("DROP TABLE {}").format(tmp))
    else:
        if exists:
            _drop_output(w, schema, name, raster=True)
        w.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(tmp, sql.Identifier(name)))
        w.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (rid)").format(ident))
    info = publish.publish_raster(w, f"{schema}.{name}", overviews=overviews,
                                  overview_algorithm=algorithm)
    return info.overviews


def _finish_polygons(w: psycopg.Connection, writer: Writer, target: tuple[str, str], *,
                     append: bool, model_name: str, run_id: int) -> int:
    from pggeolearn import publish

    schema, name = target
    ident = sql.Identifier(schema, name)
    g = writer.plan.grid
    exists = relkind(w, schema, name) is not None
    if exists and not append:
        _drop_output(w, schema, name, raster=False)
    if not exists or not append:
        w.execute(sql.SQL(sql_text("predict_polygons_table")).format(table=ident,
                                                                    srid=sql.Literal(g.srid)))
    roots = writer.pieces.groups()
    staged = np.concatenate(writer.pieces.staged) if writer.pieces.staged else np.zeros(0, np.int64)
    w.execute("CREATE TEMP TABLE pggeolearn_piece_groups (piece_id bigint PRIMARY KEY, group_id bigint)"
              " ON COMMIT DROP")
    with w.cursor() as cur, cur.copy("COPY pggeolearn_piece_groups FROM STDIN (FORMAT BINARY)") as cp:
        cp.set_types(["int8", "int8"])
        for pid, root in zip(staged.tolist(), roots[staged].tolist(), strict=True):
            cp.write_row((pid, root))
    classes = writer.plan.predictor.classes
    ids = sorted(int(k) for k in classes)
    n = w.execute(sql.SQL(sql_text("predict_polygons")).format(table=ident), {
        "class_ids": ids, "class_names": [str(classes[k]) for k in ids], "srid": g.srid,
        "tolerance": g.res / 2, "model": model_name, "run_id": run_id,
        "min_pixels": writer.pieces.min_pixels}).rowcount
    publish.publish_vector(w, f"{schema}.{name}")
    return n


def _save_styles(w: psycopg.Connection, p: Predictor, names: OutputNames, model_name: str) -> None:
    from pggeolearn import publish

    classes = {int(k): str(v) for k, v in p.classes.items()}
    colours = publish.palette(classes)
    desc = f"pggeolearn predict, model {model_name}"
    out = names.show(names.out)
    publish.save_style(w, out, publish.class_raster_qml(classes, colours), raster_column="rast",
                       name=f"{names.out[1]} classes", description=desc)
    if names.prob:
        first_fg = sorted(classes).index(min(k for k in classes if k != 0)) + 1
        publish.save_style(w, names.show(names.prob), publish.gray_raster_qml(first_fg, 0, PROB_SCALE),
                           raster_column="rast", name=f"{names.prob[1]} probability",
                           description=desc + f" (band {first_fg}: {classes[sorted(classes)[first_fg - 1]]})")
    if names.polygons:
        cats = [(k, classes[k], colours[k]) for k in sorted(classes) if k != 0]
        publish.save_style(w, names.show(names.polygons), publish.categorized_qml("class_id", cats),
                           geometry_column="geom", geometry_type="Polygon",
                           name=f"{names.polygons[1]} classes", description=desc)
