"""The imagery: a raster table or user SQL that sees the ``tile`` relation, probed once for
its CRS, pixel size and pixel types, then read one row band of windows at a time by a
background thread (one query per band, READ ONLY, under a statement timeout:
``sql/predict_band.sql`` returns each source raster unchanged when it is aligned - pasted on
the client - or warped onto the grid), while the main thread predicts."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import errors as pge
from psycopg import sql

from pggeolearn import errors, outputs, wkb
from pggeolearn.db import usersql
from pggeolearn.db.connect import connect
from pggeolearn.db.errors import first_line, translate
from pggeolearn.db.tables import TableName
from pggeolearn.predict.grid import Grid
from pggeolearn.predict.model import Predictor, input_pixel_types
from pggeolearn.predict.stitch import Stitcher
from pggeolearn.resources import sql_text

__all__ = ["BandReader", "Imagery", "imagery_of", "looks_like_sql", "user_imagery", "user_sql_error"]

_INFRA_SQLSTATE = ("08", "53", "57", "58", "XX")
_PROBE_COLUMNS = [("srid", "integer"), ("scalex", "float8"), ("scaley", "float8"), ("skewx", "float8"),
                  ("skewy", "float8"), ("ulx", "float8"), ("uly", "float8"), ("bands", "integer"),
                  ("pixeltypes", "text[]")]


@dataclass(frozen=True)
class Imagery:
    """SQL returning ``rast`` for the ``tile`` relation (``%`` escaped), and its name in messages."""

    query: str
    label: str

    def probe(self, conn: psycopg.Connection, extent: Sequence[float], srid: int, res: float,
              timeout_s: float) -> tuple:
        """(srid, scalex, scaley, skewx, skewy, ulx, uly, bands, pixeltypes) of the imagery over
        ``extent`` (``sql/predict_probe.sql``); NotFound when there is none."""
        minx, miny, maxx, maxy = extent
        try:
            with usersql.sandbox(conn, timeout_s):
                found = usersql.rows(conn, self._probe_sql(), {"minx": minx, "miny": miny, "maxx": maxx,
                                                               "maxy": maxy, "srid": srid, "res": res},
                                     _PROBE_COLUMNS)
                row = found[0] if found else None
        except psycopg.Error as exc:
            raise user_sql_error(exc, f"{self.label} fails over the extent") from exc
        if row is None:
            raise errors.NotFound(f"no imagery in the extent {minx:.3f} {miny:.3f} {maxx:.3f} {maxy:.3f} "
                                  f"(EPSG:{srid}) from {self.label}: nothing predicted")
        return row

    def tables_read(self, conn: psycopg.Connection, grid: Grid, timeout_s: float) -> set[TableName]:
        """The tables the imagery SQL reads over the grid (its plan, not run)."""
        minx, miny, maxx, maxy = grid.bounds
        with usersql.sandbox(conn, timeout_s):
            return outputs.tables_read(conn, self._probe_sql(), {"minx": minx, "miny": miny, "maxx": maxx,
                                                                 "maxy": maxy, "srid": grid.srid,
                                                                 "res": grid.res})

    def _probe_sql(self) -> sql.Composed:
        return sql.SQL(sql_text("predict_probe")).format(imagery=sql.SQL(self.query))


def user_imagery(user_sql: str, label: str) -> Imagery:
    """User SQL (a recipe's image SQL, ``--imagery 'SELECT ...'``) as :class:`Imagery`."""
    if not usersql.stored(user_sql):
        raise errors.ConfigError("empty imagery SQL")
    return Imagery(usersql.text(user_sql), label)


def looks_like_sql(text: str) -> bool:
    """Whether ``--imagery`` is SQL rather than a table name."""
    return any(ch.isspace() for ch in text.strip()) or "(" in text


def imagery_of(conn: psycopg.Connection, imagery: str) -> Imagery:
    """A raster table name (its first raster column) or SQL as :class:`Imagery`."""
    if looks_like_sql(imagery):
        return user_imagery(imagery, "imagery SQL")
    schema, name = TableName.parse(imagery).parts
    row = conn.execute("SELECT r_raster_column, srid FROM raster_columns WHERE r_table_schema = %s"
                       " AND r_table_name = %s ORDER BY r_raster_column LIMIT 1", [schema, name]).fetchone()
    if row is None:
        row = conn.execute(
            "SELECT a.attname, NULL FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s"
            " AND a.atttypid = 'raster'::regtype AND NOT a.attisdropped ORDER BY a.attnum LIMIT 1",
            [schema, name]).fetchone()
    if row is None:
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                              [sql.Identifier(schema, name).as_string(conn)]).fetchone()[0]
        if not exists:
            raise errors.NotFound(f"imagery table {schema}.{name} does not exist")
        raise errors.ConfigError(f"imagery table {schema}.{name} has no raster column")
    col, srid = row
    if not srid:  # raster_columns lists every raster column; srid only with the constraint
        found = conn.execute(sql.SQL("SELECT ST_SRID({}) FROM {} LIMIT 1").format(
            sql.Identifier(col), sql.Identifier(schema, name))).fetchone()
        srid = found[0] if found else None
    if srid:
        where = sql.SQL("ST_ConvexHull({c}) && ST_Transform(tile_geom, {s})").format(
            c=sql.Identifier(col), s=sql.Literal(int(srid)))
    else:
        where = sql.SQL("ST_Intersects({c}, tile_geom)").format(c=sql.Identifier(col))
    query = sql.SQL("SELECT {c} AS rast FROM {t} WHERE {w}").format(
        c=sql.Identifier(col), t=sql.Identifier(schema, name), w=where)
    return Imagery(query.as_string(conn).replace("%", "%%"), f"imagery table {schema}.{name}")


def user_sql_error(exc: psycopg.Error, context: str) -> errors.PggeolearnError:
    """A one-line error for user SQL that failed: timeout, infrastructure, or the SQL's own."""
    state = getattr(exc, "sqlstate", None)
    if isinstance(exc, pge.QueryCanceled):
        return errors.QueryTimeout(f"{context}: statement timeout")
    if state is None or state[:2] in _INFRA_SQLSTATE:
        return translate(exc, context)
    return errors.RecipeError(f"{context}: {usersql.permission_hint(exc) or first_line(exc)}")


def _paste(img: np.ndarray, valid: np.ndarray, buf: bytes, warped: bool, bx0: float, by0: float,
           res: float, bands: int, label: str) -> None:
    tile = wkb.decode(buf)
    gt = tile.geotransform
    if (abs(gt[1] - res) > 1e-6 * res or abs(gt[5] + res) > 1e-6 * res or gt[2] or gt[4]):
        raise errors.RasterFormatError(f"{label}: a raster came back off the prediction grid "
                                       f"(pixel {gt[1]:.6g} x {gt[5]:.6g}, skew {gt[2]}, {gt[4]})")
    need = bands + (1 if warped else 0)
    if tile.bands < need:
        raise errors.ConfigError(f"{label}: a raster at ({gt[0]:.3f}, {gt[3]:.3f}) has "
                                 f"{tile.bands - (1 if warped else 0)} band(s), the model needs {bands}")
    if any(tile.band(b).dtype.newbyteorder("=") != img.dtype for b in range(bands)):
        raise errors.ConfigError(f"{label}: a raster at ({gt[0]:.3f}, {gt[3]:.3f}) has "
                                 f"{','.join(tile.pixel_types[:bands])} bands, the model takes "
                                 f"{img.dtype} pixels")
    dx, dy = (gt[0] - bx0) / res, (by0 - gt[3]) / res
    ix, iy = round(dx), round(dy)
    if abs(dx - ix) > 1e-3 or abs(dy - iy) > 1e-3:
        raise errors.RasterFormatError(f"{label}: a raster is not aligned with the prediction grid")
    _, h, w = img.shape
    r0, r1 = max(iy, 0), min(iy + tile.height, h)
    c0, c1 = max(ix, 0), min(ix + tile.width, w)
    if r1 <= r0 or c1 <= c0:
        return
    src = tile.data[:, r0 - iy:r1 - iy, c0 - ix:c1 - ix]
    ok = np.ones((r1 - r0, c1 - c0), bool)
    if warped:
        ok &= src[-1] != 0
    nodata = tile.nodata[:bands]
    if all(nd is not None for nd in nodata):  # a pixel is NODATA when every band says so
        is_nd = np.ones_like(ok)
        for b, nd in enumerate(nodata):
            is_nd &= src[b] == nd
        ok &= ~is_nd
    dst = img[:, r0:r1, c0:c1]
    np.copyto(dst, src[:bands], where=ok[None])
    valid[r0:r1, c0:c1] |= ok


class BandReader:
    """Reads the imagery of each needed row band of windows (``rows[r]``) in a thread, as
    ``(image (bands, window, band_width), valid)``; ``get()`` returns them in order (None for a
    band not needed) and raises what the thread raised."""

    def __init__(self, dsn: str | None, imagery: Imagery, grid: Grid, st: Stitcher, p: Predictor,
                 rows: Sequence[bool], timeout_s: float):
        self.dsn, self.imagery, self.grid, self.st, self.p = dsn, imagery, grid, st, p
        self.rows, self.timeout_s = rows, timeout_s
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.stop = threading.Event()
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._run, name="pggeolearn-predict-reader", daemon=True)

    def start(self) -> BandReader:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.q.get_nowait()
            except queue.Empty:
                self.thread.join(0.05)

    def get(self) -> tuple[np.ndarray, np.ndarray] | None:
        item = self.q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            with connect(self.dsn, autocommit=True, application_name="pggeolearn predict reader") as conn:
                for r, needed in enumerate(self.rows):
                    if self.stop.is_set():
                        return
                    item = self._read(conn, r) if needed else None
                    if not self._put(item):
                        return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)

    def _read(self, conn: psycopg.Connection, r: int) -> tuple[np.ndarray, np.ndarray]:
        st, g, p = self.st, self.grid, self.p
        t0 = time.perf_counter()
        top, left = st.origin(r, 0)
        bw = st.band_width
        bx0, by0 = g.x0 + left * g.res, g.y0 - top * g.res
        params = {"minx": bx0, "maxy": by0, "maxx": bx0 + bw * g.res, "miny": by0 - st.window * g.res,
                  "width": bw, "height": st.window, "res": g.res, "srid": g.srid}
        query = sql.SQL(sql_text("predict_band")).format(imagery=sql.SQL(self.imagery.query))
        label = f"{self.imagery.label} (window row {r})"
        try:
            with usersql.sandbox(conn, self.timeout_s):
                rows = usersql.rows(conn, query, params, [("piece", "bytea"), ("warped", "boolean")],
                                    binary=True)
        except psycopg.Error as exc:
            raise user_sql_error(exc, f"{self.imagery.label} fails for window row {r}") from exc
        img = np.zeros((p.bands, st.window, bw), wkb.PIXEL_TYPES[input_pixel_types(p)[0]].dtype)
        valid = np.zeros((st.window, bw), bool)
        for buf, warped in rows:
            _paste(img, valid, buf, bool(warped), bx0, by0, g.res, int(p.bands), label)
        self.seconds += time.perf_counter() - t0
        return img, valid
