"""Prediction: a model over any extent, written back into PostGIS as QGIS layers.

``predict(dsn, model, extent=... | dataset=..., imagery=..., out="schema.name")`` writes

* ``out``: the **class raster** (8BUI, one band, tiles of ``tile_px`` (256) pixels, the
  model's SRID and pixel size, **NODATA 255 where there was no imagery**), with a GiST index,
  raster constraints, overviews (factors 2 and 4) and a paletted default style for QGIS;
* ``out_prob`` (``probabilities=True``): the **probability raster**, one 8BUI band per class
  (background first), ``value = round(p * 254)``, so ``p = value / 254``; NODATA 255. 8-bit
  rather than 32BF: a quarter of the bytes, and 1/254 is finer than any model is calibrated;
* ``out_polygons`` (``vectorize=True``, name configurable): **one polygon per connected object**
  (4-connected pixels of one class), merged across tile borders, simplified by half a pixel
  (``ST_SimplifyPreserveTopology``), valid (``ST_MakeValid``), ``geometry(MultiPolygon, srid)``
  with ``class_id``, ``class_name``, ``area_m2`` (ground metres, on the geography), ``pixels``,
  ``mean_prob`` (mean probability of the predicted class), ``model``, ``run_id``; ``id`` primary
  key, GiST index, categorized default style. Objects under ``min_pixels`` (4) pixels are left
  out and holes under it filled: speckle from a weak model would otherwise become hundreds of
  thousands of rows and holes (the class raster keeps every pixel);

and one row in ``pggeolearn.runs`` (kind ``predict``, status running -> done | failed).

**The grid is the model's.** Windows are built on the model's CRS and pixel size; imagery in
another CRS or resolution is reprojected/resampled onto it (nearest neighbour, as the chips the
model was trained on) and the report says so. The grid origin is snapped to (in order) the
table being appended to, the dataset's grid, the imagery's own grid (same CRS and pixel size:
no resampling at all) or multiples of the pixel size.

**Sliding windows and stitching.** Windows of the model's ``tile_px`` advance by
``stride = tile_px - overlap``; window ``(r, c)`` starts at pixel ``(r * stride - overlap // 2,
c * stride - overlap // 2)``, so it reads real imagery beyond the extent's edges as context.
``stitch="centre"``: each window contributes only its central ``stride x stride`` block, at
least ``overlap // 2`` pixels from its edges, so every pixel comes from exactly one window and a
translation-equivariant model whose receptive field is at most ``overlap // 2`` pixels gives
exactly the result of predicting the whole area at once (no seam). ``stitch="blend"``: every
window contributes all its pixels, weighted by ``sin^2`` (a cosine window, largest in the centre,
never 0) and averaged; seams fade out instead of being cut away.

**Bounded memory.** The extent is processed one row band of windows at a time: a background
thread reads the next band's imagery (one query per band, in a READ ONLY transaction under a
statement timeout: ``pggeolearn.window_piece`` returns each source raster either unchanged -
aligned, pasted on the client - or warped), while the main thread predicts, stitches and writes
every output tile row as soon as its pixels are final. Memory holds a band of imagery and an
accumulator of ``tile_px + window`` rows by the extent's width, never the extent (20,000 px
wide: about 200 MB with two classes; polygon bookkeeping grows with the number of objects).

**Writing.** Tiles go out as raster WKB (:mod:`pggeolearn.wkb`) through pipelined
``INSERT ... ST_RastFromWKB(%b)`` with binary parameters. The raster column uses lz4
compression where the server has it, else ``SET STORAGE EXTERNAL``: class masks compress
~100x with lz4, which writes them faster than uncompressed storage and far faster than pglz
(``benchmarks/bench_predict.py``). Polygons: each output tile is vectorized on the client
(``rasterio.features.shapes``, 4-connectivity); pieces that share an edge across a tile border
are joined by a union-find over the border pixels; the server dissolves each group
(``sql/predict_polygons.sql``).

**Nothing half-written.** All writes happen in ONE transaction on a writer connection, into
tables with a temporary name that are renamed (or appended to the existing tables) at the end
(a missing output schema is created in that transaction too),
with their indexes, constraints, overviews, styles and the run's ``done`` status. Any failure
(imagery SQL error, a model that raises, Ctrl-C, a lost connection) rolls everything back and
marks the run ``failed`` with the error. An existing output is :class:`AlreadyExists` unless
``overwrite`` (replace, atomically) or ``append`` (add tiles and polygons; objects are not
merged with the earlier run's). Tiles without any imagery are not written.
"""

from __future__ import annotations

import importlib
import json
import math
import queue
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import psycopg
from psycopg import errors as pge
from psycopg import sql
from tqdm import tqdm

from pggeolearn import errors, outputs, runs, wkb
from pggeolearn.db import usersql
from pggeolearn.db.connect import connect, dsn_of
from pggeolearn.db.errors import db_errors, first_line, translate
from pggeolearn.db.schema import require_schema
from pggeolearn.db.tables import TableName, overview_prefix
from pggeolearn.resources import sql_text

__all__ = [
    "NODATA", "PROB_SCALE", "Grid", "PredictReport", "Predictor", "Stitcher", "load_model",
    "predict", "window_weights",
]

NODATA = 255  # class raster and probability raster value where there was no imagery
PROB_SCALE = 254  # probability band value = round(p * PROB_SCALE)
STITCH_MODES = ("centre", "blend")
DEFAULT_TIMEOUT_S = 60.0  # per row band of imagery
DEFAULT_OVERLAP = 32
_INFRA_SQLSTATE = ("08", "53", "57", "58", "XX")


# ------------------------------------------------------------------------------------------
# the model contract


@runtime_checkable
class Predictor(Protocol):
    """What prediction needs of a model (``pggeolearn.training.registry.LoadedModel`` is one).

    ``predict_proba`` takes ``(N, bands, tile_px, tile_px)`` images in the pixel type the model
    was trained on (:func:`input_pixel_types`; the imagery's raw values, the model normalizes
    them itself) and returns ``(N, K, tile_px, tile_px)`` float32
    probabilities (softmax over the K classes, background included); channel ``k`` is the
    ``k``-th smallest class id of ``classes``.
    """

    name: str
    classes: dict[int, str]
    tile_px: int
    resolution: float
    srid: int
    bands: int
    normalization: Any
    framework: str

    def predict_proba(self, images_uint8: np.ndarray) -> np.ndarray: ...


_ATTRS = ("name", "classes", "tile_px", "resolution", "srid", "bands", "normalization", "framework")


def check_predictor(obj: Any, label: str = "model") -> Predictor:
    """``obj`` if it fulfils :class:`Predictor` with sane values, else a one-line ConfigError."""
    missing = [a for a in (*_ATTRS, "predict_proba") if not hasattr(obj, a)]
    if missing:
        raise errors.ConfigError(f"{label} is not a predictor: it lacks {', '.join(missing)}")
    if not callable(obj.predict_proba):
        raise errors.ConfigError(f"{label}.predict_proba is not callable")
    try:
        classes = {int(k): str(v) for k, v in dict(obj.classes).items()}
        tile_px, srid, bands = int(obj.tile_px), int(obj.srid), int(obj.bands)
        res = float(obj.resolution)
    except (TypeError, ValueError) as exc:
        raise errors.ConfigError(f"{label} has bad metadata: {exc}") from None
    if 0 not in classes or len(classes) < 2:
        raise errors.ConfigError(f"{label} classes must include 0 (background) and one more: {classes}")
    if min(classes) < 0 or max(classes) >= NODATA:
        raise errors.ConfigError(f"{label} class ids must be 0..254 ({NODATA} is NODATA): {sorted(classes)}")
    if not 8 <= tile_px <= 4096 or bands < 1 or srid <= 0 or not (math.isfinite(res) and res > 0):
        raise errors.ConfigError(f"{label} has bad metadata: tile_px {tile_px}, bands {bands}, "
                                 f"srid {srid}, resolution {res}")
    return obj


def input_pixel_types(p: Predictor) -> tuple[str, ...]:
    """The PostGIS pixel types of the imagery ``p`` takes, one per band: what training recorded
    (``normalization["pixel_types"]``), else 8BUI (models trained before it was recorded)."""
    norm = p.normalization if isinstance(p.normalization, dict) else {}
    types = norm.get("pixel_types") or ["8BUI"] * int(p.bands)
    return tuple(str(t) for t in types[: int(p.bands)])


def check_pixel_types(p: Predictor, model_name: str, types: Sequence[str], what: str) -> np.dtype:
    """The numpy dtype of the model's input, after checking that ``what`` (imagery, chips)
    has the pixel types the model was trained on; a mismatch names both sides."""
    want = input_pixel_types(p)
    got = tuple(types[: len(want)])
    if got != want:
        raise errors.ConfigError(f"{what} has {','.join(got) or 'no'} bands; model {model_name} "
                                 f"was trained on {','.join(want)} imagery")
    return wkb.PIXEL_TYPES[want[0]].dtype


def load_model(conn: psycopg.Connection, model: str | Predictor, *, device: str | None = None
               ) -> Predictor:
    """A :class:`Predictor` from a registry name, a ``module:attribute`` spec, or as given.

    A name is loaded with ``pggeolearn.training.registry.load(conn, name, device=device)``;
    ``module:attribute`` imports a Predictor object (or a callable returning one: a class, a
    factory) - a way to bring a model from outside the registry.
    """
    if not isinstance(model, str):
        return check_predictor(model, getattr(model, "name", "model"))
    if ":" in model:
        mod_name, _, attr = model.partition(":")
        try:
            obj = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise errors.ModelNotFound(f"cannot import model {model!r}: {exc}") from None
        if not hasattr(obj, "predict_proba") and callable(obj):
            obj = obj()
        return check_predictor(obj, model)
    try:
        from pggeolearn.training import registry
    except ModuleNotFoundError as exc:
        if exc.name not in ("pggeolearn.training", "pggeolearn.training.registry"):
            raise
        registry = None
    if registry is None:
        row = conn.execute("SELECT 1 FROM pggeolearn.models WHERE name = %s", [model]).fetchone()
        if row is None:
            raise errors.ModelNotFound(_unknown_model(conn, model))
        raise errors.MissingDependency(
            f"model {model!r} is in pggeolearn.models but the model registry "
            "(pggeolearn.training.registry) is not installed")
    loaded = registry.load(conn, model, device=device or "auto")
    return check_predictor(loaded, model)


def _unknown_model(conn: psycopg.Connection, name: str) -> str:
    known = [r[0] for r in conn.execute("SELECT name FROM pggeolearn.models ORDER BY name LIMIT 20")]
    hint = f" (known: {', '.join(known)})" if known else " (none trained yet: pggeolearn train)"
    return f"unknown model {name!r}{hint}"


def model_class_ids(p: Predictor) -> np.ndarray:
    return np.array(sorted(int(k) for k in p.classes), dtype=np.uint8)


# ------------------------------------------------------------------------------------------
# the output grid and the stitching rule (pure numpy: unit-testable without a database)


@dataclass(frozen=True)
class Grid:
    """The output raster: ``width x height`` pixels of ``res`` from upper-left ``(x0, y0)``."""

    srid: int
    res: float
    x0: float
    y0: float
    width: int
    height: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0 - self.height * self.res, self.x0 + self.width * self.res, self.y0)

    def geotransform(self, row: int, col: int) -> tuple[float, ...]:
        """GDAL geotransform of a raster whose upper-left pixel is (row, col) of this grid."""
        return (self.x0 + col * self.res, self.res, 0.0, self.y0 - row * self.res, 0.0, -self.res)


def snap_grid(extent: Sequence[float], res: float, srid: int,
              anchor: tuple[float, float] = (0.0, 0.0)) -> Grid:
    """The smallest grid of pixel size ``res`` whose pixel edges fall on ``anchor + k * res``
    and which covers ``extent`` (minx, miny, maxx, maxy)."""
    minx, miny, maxx, maxy = (float(v) for v in extent)
    if not (maxx > minx and maxy > miny):
        raise errors.ConfigError(f"empty extent {tuple(extent)}")
    ax, ay = anchor
    eps = 1e-6
    i0 = math.floor((minx - ax) / res + eps)
    i1 = math.ceil((maxx - ax) / res - eps)
    j0 = math.floor((ay - maxy) / res + eps)  # rows counted downwards from the anchor
    j1 = math.ceil((ay - miny) / res - eps)
    width, height = max(1, i1 - i0), max(1, j1 - j0)
    if width * height > 2**40:
        raise errors.ConfigError(f"extent of {width} x {height} pixels is too large")
    return Grid(srid, res, ax + i0 * res, ay - j0 * res, width, height)


def window_weights(window: int) -> np.ndarray:
    """The blend weight of a window: ``sin^2`` (a Hann window) per axis, > 0 everywhere."""
    w = np.sin(np.pi * (np.arange(window) + 0.5) / window) ** 2
    return np.outer(w, w).astype(np.float32)


class Stitcher:
    """Accumulates window probabilities into output rows and hands out finished row blocks.

    ``add(r, c, probs, valid)`` for every window of window-row ``r``, then ``finish_row(r)``
    yields ``(row0, probs (K, n, width) float32, valid (n, width) bool)`` for each block of
    ``tile_px`` output rows (the last one shorter) whose pixels no later window touches.
    ``valid`` is False where no window saw imagery. Memory: ``(K + 1) x (tile_px + window + 1)
    x width`` float32.
    """

    def __init__(self, width: int, height: int, *, window: int, overlap: int, mode: str,
                 n_classes: int, tile_px: int):
        if mode not in STITCH_MODES:
            raise errors.ConfigError(f"stitch must be one of {', '.join(STITCH_MODES)}, not {mode!r}")
        if not 0 <= overlap < window:
            raise errors.ConfigError(f"overlap must be 0..{window - 1} pixels (window {window}), not {overlap}")
        self.width, self.height, self.window, self.overlap = width, height, window, overlap
        self.mode, self.tile_px, self.n_classes = mode, tile_px, n_classes
        self.stride = window - overlap
        self.half = overlap // 2
        self.ncols = max(1, math.ceil(width / self.stride))
        self.nrows = max(1, math.ceil(height / self.stride))
        self.cap = tile_px + window + 1
        self.acc = np.zeros((n_classes, self.cap, width), np.float32)
        self.wsum = np.zeros((self.cap, width), np.float32)
        self.base = 0  # output row of acc[:, 0]
        self.weights = window_weights(window) if mode == "blend" else None

    @property
    def band_width(self) -> int:
        """Columns of imagery one row band needs: from ``-half`` to the last window's right."""
        return (self.ncols - 1) * self.stride + self.window

    def origin(self, r: int, c: int) -> tuple[int, int]:
        """Output pixel (row, col) of window (r, c)'s upper-left corner (may be negative)."""
        return r * self.stride - self.half, c * self.stride - self.half

    def contribution(self, r: int, c: int) -> tuple[int, int, int, int]:
        """Output rows [r0, r1) and columns [c0, c1) window (r, c) writes to."""
        s = self.stride
        if self.mode == "centre":
            return r * s, min((r + 1) * s, self.height), c * s, min((c + 1) * s, self.width)
        top, left = self.origin(r, c)
        return (max(top, 0), min(top + self.window, self.height),
                max(left, 0), min(left + self.window, self.width))

    def add(self, r: int, c: int, probs: np.ndarray, valid: np.ndarray) -> None:
        top, left = self.origin(r, c)
        r0, r1, c0, c1 = self.contribution(r, c)
        if r1 <= r0 or c1 <= c0:
            return
        wr, wc = slice(r0 - top, r1 - top), slice(c0 - left, c1 - left)
        ar = slice(r0 - self.base, r1 - self.base)
        if ar.start < 0 or ar.stop > self.cap:
            raise RuntimeError(f"window ({r}, {c}) outside the stitcher's buffer")
        v = valid[wr, wc].astype(np.float32)
        if self.mode == "centre":
            self.acc[:, ar, c0:c1] = probs[:, wr, wc] * v
            self.wsum[ar, c0:c1] = v
        else:
            w = self.weights[wr, wc] * v
            self.acc[:, ar, c0:c1] += probs[:, wr, wc] * w
            self.wsum[ar, c0:c1] += w

    def final_rows(self, r: int) -> int:
        """Output rows [0, n) that no window after window-row ``r`` changes."""
        if r >= self.nrows - 1:
            return self.height
        nxt = (r + 1) * self.stride
        return min(self.height, nxt if self.mode == "centre" else nxt - self.half)

    def finish_row(self, r: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        final = self.final_rows(r)
        while self.base < self.height and (final - self.base >= self.tile_px or final == self.height):
            n = min(self.tile_px, self.height - self.base)
            w = self.wsum[:n]
            valid = w > 0
            probs = np.divide(self.acc[:, :n], w, out=np.zeros((self.n_classes, n, self.width),
                                                                np.float32), where=valid)
            row0 = self.base
            self.acc[:, : self.cap - n] = self.acc[:, n:]
            self.acc[:, self.cap - n:] = 0
            self.wsum[: self.cap - n] = self.wsum[n:]
            self.wsum[self.cap - n:] = 0
            self.base += n
            yield row0, probs, valid


# ------------------------------------------------------------------------------------------
# polygons: per-tile pieces + union-find across tile borders


class _UnionFind:
    """Disjoint sets over piece ids 1..n (0 is 'no piece')."""

    def __init__(self) -> None:
        self.parent = np.zeros(1024, np.int64)
        self.n = 0

    def add(self, k: int) -> int:
        """Make ``k`` new singleton ids; return the first."""
        first = self.n + 1
        need = self.n + k + 1
        if need > len(self.parent):
            grown = np.zeros(max(need, 2 * len(self.parent)), np.int64)
            grown[: len(self.parent)] = self.parent
            self.parent = grown
        self.parent[first:need] = np.arange(first, need)
        self.n += k
        return first

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = int(p[x])
        return x

    def union_pairs(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in set(zip(a.tolist(), b.tolist(), strict=True)):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def roots(self) -> np.ndarray:
        p = self.parent[: self.n + 1].copy()
        while True:
            q = p[p]
            if np.array_equal(q, p):
                return p
            p = q


def _vectorize(cls_tile: np.ndarray, prob_tile: np.ndarray) -> tuple[list[dict], np.ndarray,
                                                                      np.ndarray, np.ndarray, np.ndarray]:
    """Pieces of one tile in pixel coordinates: (geojson geoms, class ids, local label image,
    pixel counts, probability sums). A piece = one 4-connected component of one class."""
    from rasterio import features
    from rasterio.transform import Affine

    mask = (cls_tile != 0) & (cls_tile != NODATA)
    if not mask.any():
        return [], np.zeros(0, np.int32), np.zeros(cls_tile.shape, np.int32), np.zeros(0), np.zeros(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # identity transform: NotGeoreferencedWarning
        shapes = list(features.shapes(cls_tile, mask=mask, connectivity=4, transform=Affine.identity()))
        geoms = [g for g, _ in shapes]
        labels = features.rasterize(((g, i + 1) for i, g in enumerate(geoms)), out_shape=cls_tile.shape,
                                    fill=0, dtype="int32", transform=Affine.identity())
    n = len(geoms)
    flat = labels.ravel()
    px = np.bincount(flat, minlength=n + 1)[1:]
    psum = np.bincount(flat, weights=prob_tile.ravel().astype(np.float64), minlength=n + 1)[1:]
    return geoms, np.array([int(v) for _, v in shapes], np.int32), labels, px, psum


def _ring_area(ring: Sequence[Sequence[float]]) -> float:
    """|shoelace area| of a closed ring (pixel units: a hole's pixel count)."""
    a = 0.0
    for (x0, y0), (x1, y1) in zip(ring, ring[1:], strict=False):
        a += x0 * y1 - x1 * y0
    return abs(a) / 2


def _fill_small_holes(geom: dict, min_pixels: int) -> dict:
    rings = geom["coordinates"]
    if len(rings) == 1 or min_pixels <= 1:
        return geom
    kept = [rings[0]] + [r for r in rings[1:] if _ring_area(r) >= min_pixels]
    return {"type": "Polygon", "coordinates": kept}


class _Pieces:
    """Vectorizes output tiles, staging pieces for the server and joining them across borders.

    Pieces that touch no tile border are whole objects: those smaller than ``min_pixels`` are
    dropped here (noise never reaches the server). Holes smaller than ``min_pixels`` are filled.
    Groups of border pieces smaller than ``min_pixels`` in total are dropped by the server.
    """

    def __init__(self, grid: Grid, tile_px: int, min_pixels: int = 1) -> None:
        self.grid, self.tile_px, self.min_pixels = grid, tile_px, min_pixels
        self.uf = _UnionFind()
        self.prev_bottom = np.zeros(grid.width, np.int64)  # piece ids of the row above this tile row
        self.cur_bottom = np.zeros(grid.width, np.int64)
        self.left_edge: np.ndarray | None = None  # piece ids of the last column of the tile to the left
        self.count = 0  # pieces staged
        self.dropped = 0  # whole objects below min_pixels
        self._classes = np.zeros(1024, np.int32)  # class id of each piece id
        self.staged: list[np.ndarray] = []  # ids of the pieces sent to the server

    def start_row(self) -> None:
        self.prev_bottom, self.cur_bottom = self.cur_bottom, np.zeros(self.grid.width, np.int64)
        self.left_edge = None

    def skip_tile(self) -> None:
        self.left_edge = None

    def add_tile(self, row0: int, col0: int, cls_tile: np.ndarray, prob_tile: np.ndarray
                 ) -> list[tuple[int, int, int, float, bytes]]:
        import shapely

        geoms, classes, labels, px, psum = _vectorize(cls_tile, prob_tile)
        if not geoms:
            self.left_edge = None
            return []
        first = self.uf.add(len(geoms))
        self._remember_classes(first, classes)
        ids = np.where(labels > 0, labels.astype(np.int64) + (first - 1), 0)
        # pixels that share an edge across the left or top tile border and have the same class
        # belong to one object: join their pieces
        for a, b in ((self.left_edge, ids[:, 0]), (self.prev_bottom[col0:col0 + ids.shape[1]], ids[0, :])):
            if a is None:
                continue
            both = (a > 0) & (b > 0)
            if both.any():
                aa, bb = a[both], b[both]
                keep = self._classes[aa] == self._classes[bb]
                if keep.any():
                    self.uf.union_pairs(aa[keep], bb[keep])
        self.left_edge = ids[:, -1].copy()
        self.cur_bottom[col0:col0 + ids.shape[1]] = ids[-1, :]
        on_border = np.zeros(len(geoms) + 1, bool)
        on_border[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = True
        keep = np.flatnonzero(on_border[1:] | (px >= self.min_pixels))
        self.dropped += len(geoms) - len(keep)
        if not len(keep):
            return []
        shp = shapely.from_geojson([json.dumps(_fill_small_holes(geoms[i], self.min_pixels)) for i in keep])
        g = self.grid
        # world coordinates from GLOBAL pixel indices: a border vertex gets bit-identical
        # coordinates from both tiles, so their pieces share the edge exactly
        offset, scale, origin = np.array([col0, row0]), np.array([g.res, -g.res]), np.array([g.x0, g.y0])
        shp = shapely.transform(shp, lambda xy: (xy + offset) * scale + origin)
        blobs = shapely.to_wkb(shp)
        self.count += len(keep)
        self.staged.append(first + keep)
        return [(first + int(i), int(classes[i]), int(px[i]), float(psum[i]), bytes(blob))
                for i, blob in zip(keep, blobs, strict=True)]

    def _remember_classes(self, first: int, classes: np.ndarray) -> None:
        need = first + len(classes)
        if len(self._classes) < need:
            grown = np.zeros(max(need, 2 * len(self._classes)), np.int32)
            grown[: len(self._classes)] = self._classes
            self._classes = grown
        self._classes[first:need] = classes

    def groups(self) -> np.ndarray:
        """Root piece id of every piece id 0..n."""
        return self.uf.roots()


# ------------------------------------------------------------------------------------------
# report


@dataclass
class PredictReport:
    """What :func:`predict` did; ``str()`` is what the CLI prints."""

    run_id: int
    model: str
    out: str
    prob_out: str | None
    polygons_out: str | None
    grid: Grid
    window: int
    overlap: int
    stitch: str
    tile_px: int
    windows: int = 0
    windows_predicted: int = 0
    tiles: int = 0
    tiles_empty: int = 0  # output tiles without any imagery, not written
    polygons: int = 0
    pieces: int = 0
    min_pixels: int = 1
    dropped: int = 0  # objects inside one tile smaller than min_pixels
    appended: bool = False
    overviews: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self) -> str:
        g = self.grid
        minx, miny, maxx, maxy = g.bounds
        lines = [
            f"run {self.run_id}: model {self.model} predicted {g.width} x {g.height} px "
            f"(EPSG:{g.srid}, {g.res:.6g} units/px, extent {minx:.3f} {miny:.3f} {maxx:.3f} {maxy:.3f}) "
            f"in {self.seconds:.1f} s",
            f"windows: {self.windows_predicted} of {self.windows} predicted ({self.window} px, overlap "
            f"{self.overlap}, {self.stitch} stitching); tiles: {self.tiles} written, "
            f"{self.tiles_empty} without imagery skipped",
            f"class raster {self.out}: 8BUI, {self.tile_px} px tiles, NODATA {NODATA} where there "
            f"was no imagery" + (f"; overviews {', '.join(self.overviews)}" if self.overviews else ""),
        ]
        if self.prob_out:
            lines.append(f"probabilities {self.prob_out}: one 8BUI band per class, "
                         f"p = value / {PROB_SCALE}, NODATA {NODATA}")
        if self.polygons_out:
            lines.append(f"polygons {self.polygons_out}: {self.polygons} objects (from {self.pieces} "
                         f"tile pieces merged across tile borders); objects under {self.min_pixels} px "
                         f"left out ({self.dropped} inside tiles), holes under {self.min_pixels} px filled")
        lines += [f"note: {n}" for n in self.notes]
        if self.timing:
            lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timing.items()))
        lines.append("QGIS: Browser > PostgreSQL > this database: the tables open styled "
                     "(default styles in public.layer_styles)")
        return "\n".join(lines)

    def outputs(self) -> dict[str, Any]:
        return {"class_raster": self.out, "probabilities": self.prob_out,
                "polygons": self.polygons_out, "tiles": self.tiles, "tiles_empty": self.tiles_empty,
                "polygon_count": self.polygons, "pieces": self.pieces, "min_pixels": self.min_pixels,
                "objects_dropped": self.dropped,
                "windows": self.windows, "windows_predicted": self.windows_predicted,
                "width": self.grid.width, "height": self.grid.height, "srid": self.grid.srid,
                "resolution": self.grid.res, "overviews": self.overviews, "appended": self.appended,
                "seconds": round(self.seconds, 3),
                "timing": {k: round(v, 3) for k, v in self.timing.items()}, "notes": self.notes}


# ------------------------------------------------------------------------------------------
# planning: names, imagery, grid


@dataclass
class _Names:
    out: tuple[str, str]
    prob: tuple[str, str] | None
    polygons: tuple[str, str] | None

    @staticmethod
    def show(t: tuple[str, str] | None) -> str | None:
        return f"{t[0]}.{t[1]}" if t else None


@dataclass
class _Plan:
    predictor: Predictor
    model_name: str
    grid: Grid
    tile_px: int
    imagery_sql: str
    imagery_label: str
    needed_tiles: np.ndarray  # (tile rows, tile cols) bool
    dataset: str | None = None
    split: str | None = None
    notes: list[str] = field(default_factory=list)


def _escape(user_sql: str) -> str:
    if not usersql.stored(user_sql):
        raise errors.ConfigError("empty imagery SQL")
    return usersql.text(user_sql)


def _looks_like_sql(text: str) -> bool:
    return any(ch.isspace() for ch in text.strip()) or "(" in text


def _imagery_sql(conn: psycopg.Connection, imagery: str) -> tuple[str, str]:
    """(SQL returning ``rast`` for the ``tile`` relation, label) for a table name or SQL."""
    if _looks_like_sql(imagery):
        return _escape(imagery), "imagery SQL"
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
    return query.as_string(conn).replace("%", "%%"), f"imagery table {schema}.{name}"


def _probe(conn: psycopg.Connection, imagery_sql: str, label: str, extent: Sequence[float],
           srid: int, res: float, timeout_s: float) -> tuple:
    minx, miny, maxx, maxy = extent
    query = sql.SQL(sql_text("predict_probe")).format(imagery=sql.SQL(imagery_sql))
    try:
        with usersql.sandbox(conn, timeout_s):
            found = usersql.rows(conn, query, {"minx": minx, "miny": miny, "maxx": maxx, "maxy": maxy,
                                               "srid": srid, "res": res}, _PROBE_COLUMNS)
            row = found[0] if found else None
    except psycopg.Error as exc:
        raise _user_sql_error(exc, f"{label} fails over the extent") from exc
    if row is None:
        raise errors.NotFound(f"no imagery in the extent {minx:.3f} {miny:.3f} {maxx:.3f} {maxy:.3f} "
                              f"(EPSG:{srid}) from {label}: nothing predicted")
    return row


def _user_sql_error(exc: psycopg.Error, context: str) -> errors.PggeolearnError:
    state = getattr(exc, "sqlstate", None)
    if isinstance(exc, pge.QueryCanceled):
        return errors.QueryTimeout(f"{context}: statement timeout")
    if state is None or state[:2] in _INFRA_SQLSTATE:
        return translate(exc, context)
    return errors.RecipeError(f"{context}: {usersql.permission_hint(exc) or first_line(exc)}")


_PROBE_COLUMNS = [("srid", "integer"), ("scalex", "float8"), ("scaley", "float8"), ("skewx", "float8"),
                  ("skewy", "float8"), ("ulx", "float8"), ("uly", "float8"), ("bands", "integer"),
                  ("pixeltypes", "text[]")]


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


def _plan(conn: psycopg.Connection, p: Predictor, model_name: str, *, extent, extent_srid, dataset,
          split, imagery, tile_px, names: _Names, append: bool, timeout_s: float,
          grid_origin: Sequence[float] | None = None) -> _Plan:
    import shapely

    srid, res = int(p.srid), float(p.resolution)
    _check_srid(conn, srid, "the model's CRS")
    notes: list[str] = []
    region = None
    anchor: tuple[float, float] | None = None
    if dataset is not None:
        from pggeolearn import datasets

        ds = datasets.get(conn, dataset)
        if imagery is None:
            imagery_sql, label = _escape(ds.recipe.image_sql), f"dataset {dataset}'s image SQL"
        else:
            imagery_sql, label = _imagery_sql(conn, imagery)
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
        imagery_sql, label = _imagery_sql(conn, imagery)
        if extent is None:
            raise errors.ConfigError("give an extent (MINX MINY MAXX MAXY) or a dataset")
        src = int(extent_srid or srid)
        _check_srid(conn, src, "the extent's CRS")
        ext = _transform_extent(conn, extent, src, srid)
        if src != srid:
            notes.append(f"extent given in EPSG:{src} was transformed to the model's EPSG:{srid}")
    if grid_origin is not None:
        anchor = (float(grid_origin[0]), float(grid_origin[1]))
        notes.append(f"grid origin ({anchor[0]:.6f}, {anchor[1]:.6f}) as asked")
    elif anchor is None:
        found = _dataset_grid(conn, p, srid, res, notes)
        if found is not None:
            anchor, res = found

    if append:
        schema, name = names.out
        if relkind(conn, schema, name) is not None:
            got = _existing_grid(conn, schema, name)
            if got is not None:
                if got[0] != srid or abs(abs(got[1]) - res) > 1e-6 * res:
                    raise errors.SridMismatch(
                        f"cannot append to {schema}.{name}: it is EPSG:{got[0]} at {abs(got[1]):.6g}, "
                        f"the model predicts EPSG:{srid} at {res:.6g}")
                anchor, res = (got[2], got[3]), abs(float(got[1]))

    probe = _probe(conn, imagery_sql, label, ext, srid, res, timeout_s)
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

    nty, ntx = math.ceil(grid.height / tile_px), math.ceil(grid.width / tile_px)
    needed = np.ones((nty, ntx), bool)
    if region is not None:
        boxes = [shapely.box(grid.x0 + i * tile_px * res, grid.y0 - min((j + 1) * tile_px, grid.height) * res,
                             grid.x0 + min((i + 1) * tile_px, grid.width) * res, grid.y0 - j * tile_px * res)
                 for j in range(nty) for i in range(ntx)]
        shapely.prepare(region)
        hits = shapely.intersects(region, shapely.buffer(np.array(boxes), -0.25 * res, join_style="mitre"))
        needed = np.asarray(hits, bool).reshape(nty, ntx)
    return _Plan(p, model_name, grid, tile_px, imagery_sql, label, needed, dataset, split, notes)


def _needed_windows(st: Stitcher, needed_tiles: np.ndarray, tile_px: int) -> np.ndarray:
    out = np.zeros((st.nrows, st.ncols), bool)
    for r in range(st.nrows):
        for c in range(st.ncols):
            r0, r1, c0, c1 = st.contribution(r, c)
            if r1 <= r0 or c1 <= c0:
                continue
            out[r, c] = needed_tiles[r0 // tile_px:(r1 - 1) // tile_px + 1,
                                     c0 // tile_px:(c1 - 1) // tile_px + 1].any()
    return out


# ------------------------------------------------------------------------------------------
# reading imagery, one row band at a time, in a background thread


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


class _BandReader:
    """Reads the imagery of each needed row band in a thread; ``get()`` returns them in order."""

    def __init__(self, dsn: str, plan: _Plan, st: Stitcher, rows: Sequence[bool], timeout_s: float):
        self.dsn, self.plan, self.st, self.rows, self.timeout_s = dsn, plan, st, rows, timeout_s
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.stop = threading.Event()
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._run, name="pggeolearn-predict-reader", daemon=True)

    def start(self) -> _BandReader:
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
        st, g, p = self.st, self.plan.grid, self.plan.predictor
        t0 = time.perf_counter()
        top, left = st.origin(r, 0)
        bw = st.band_width
        bx0, by0 = g.x0 + left * g.res, g.y0 - top * g.res
        params = {"minx": bx0, "maxy": by0, "maxx": bx0 + bw * g.res, "miny": by0 - st.window * g.res,
                  "width": bw, "height": st.window, "res": g.res, "srid": g.srid}
        query = sql.SQL(sql_text("predict_band")).format(imagery=sql.SQL(self.plan.imagery_sql))
        label = f"{self.plan.imagery_label} (window row {r})"
        try:
            with usersql.sandbox(conn, self.timeout_s):
                rows = usersql.rows(conn, query, params, [("piece", "bytea"), ("warped", "boolean")],
                                    binary=True)
        except psycopg.Error as exc:
            raise _user_sql_error(exc, f"{self.plan.imagery_label} fails for window row {r}") from exc
        img = np.zeros((p.bands, st.window, bw), wkb.PIXEL_TYPES[input_pixel_types(p)[0]].dtype)
        valid = np.zeros((st.window, bw), bool)
        for buf, warped in rows:
            _paste(img, valid, buf, bool(warped), bx0, by0, g.res, int(p.bands), label)
        self.seconds += time.perf_counter() - t0
        return img, valid


# ------------------------------------------------------------------------------------------
# writing


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


class _Writer:
    """Everything that goes into the database during one run, on one transaction."""

    def __init__(self, w: psycopg.Connection, plan: _Plan, run_id: int, *, probabilities: bool,
                 vectorize: bool, min_pixels: int = 1):
        self.w, self.plan, self.run_id = w, plan, run_id
        self.schema = None
        self.probabilities, self.vectorize = probabilities, vectorize
        self.class_ids = model_class_ids(plan.predictor)
        self.identity_classes = np.array_equal(self.class_ids, np.arange(len(self.class_ids)))
        self.pieces = _Pieces(plan.grid, plan.tile_px, min_pixels) if vectorize else None
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


def _finish_polygons(w: psycopg.Connection, writer: _Writer, target: tuple[str, str], *,
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


def _save_styles(w: psycopg.Connection, p: Predictor, names: _Names, model_name: str) -> None:
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


# ------------------------------------------------------------------------------------------
# the entry point


def _names(out: str, polygons: str | None, probabilities: bool, vectorize: bool,
           overviews: Sequence[int] = ()) -> _Names:
    """The output tables, each name validated (63 bytes, with the overview prefix for rasters)."""
    o = TableName.parse(out, reserve=overview_prefix(overviews))
    prob = o.sibling("_prob").fits(overview_prefix(overviews)) if probabilities else None
    poly = None
    if vectorize:
        poly = TableName.parse(polygons, o.schema) if polygons else o.sibling("_polygons")
    return _Names(o.parts, prob.parts if prob else None, poly.parts if poly else None)


def _outputs(names: _Names, overviews: Sequence[int]) -> list[outputs.Output]:
    return [outputs.Output(TableName(*t), ov, what) for t, ov, what in (
        (names.out, overviews, "--out"), (names.prob, overviews, "the probability raster"),
        (names.polygons, (), "the polygon table")) if t]


def _reads(conn: psycopg.Connection, plan: _Plan, timeout_s: float) -> set[TableName]:
    """The tables the imagery SQL reads over the grid (its plan, not run)."""
    minx, miny, maxx, maxy = plan.grid.bounds
    query = sql.SQL(sql_text("predict_probe")).format(imagery=sql.SQL(plan.imagery_sql))
    with usersql.sandbox(conn, timeout_s):
        return outputs.tables_read(conn, query, {"minx": minx, "miny": miny, "maxx": maxx, "maxy": maxy,
                                                 "srid": plan.grid.srid, "res": plan.grid.res})


def predict(dsn_or_conn: psycopg.Connection | str | None, model: str | Predictor, *,
            out: str, imagery: str | None = None,
            extent: Sequence[float] | None = None, extent_srid: int | None = None,
            dataset: str | None = None, split: str = "test",
            overlap: int | None = None, stitch: str = "centre", probabilities: bool = False,
            vectorize: bool = True, polygons: str | None = None, min_pixels: int = 4,
            overwrite: bool = False, append: bool = False, force: bool = False, batch_size: int = 8,
            tile_px: int = 256, overviews: Sequence[int] = (2, 4), device: str | None = None,
            timeout_s: float = DEFAULT_TIMEOUT_S, progress: bool = True,
            grid_origin: Sequence[float] | None = None) -> PredictReport:
    """Run ``model`` over an extent (or a dataset split's area) and write the outputs.

    ``model``: a registry name, ``module:attribute``, or a :class:`Predictor` object.
    ``extent``: (minx, miny, maxx, maxy) in ``extent_srid`` (default: the model's CRS); or
    ``dataset`` (and ``split``): the area of that split's chips, imagery defaulting to the
    dataset's image SQL. ``imagery``: a raster table name or SQL returning ``rast`` that sees the
    ``tile`` relation (``tile_geom``, ``tile_rast``, ``tile_srid``, ``tile_res``) like a
    recipe's image SQL. ``out``: the class raster table; ``out_prob`` and ``out_polygons``
    (or ``polygons``) beside it. ``overlap`` defaults to 32 pixels (at most a quarter of the
    model's window). ``min_pixels``: smaller objects are left out of the polygon table and
    smaller holes filled (the class raster keeps every pixel). See the module docstring for
    stitching, memory and atomicity. The output grid is the model's dataset's (origin and
    exact resolution, so predictions fall on the chips' pixels) when the model has one in the
    same CRS and pixel size; else the imagery's own grid when it is the model's; else pixel
    edges on multiples of the resolution. ``grid_origin`` (x, y) says otherwise.
    """
    started = time.perf_counter()
    if stitch not in STITCH_MODES:
        raise errors.ConfigError(f"stitch must be one of {', '.join(STITCH_MODES)}, not {stitch!r}")
    if not isinstance(batch_size, int) or not 1 <= batch_size <= 4096:
        raise errors.ConfigError(f"batch size must be 1..4096, not {batch_size!r}")
    if not isinstance(min_pixels, int) or min_pixels < 1:
        raise errors.ConfigError(f"min pixels must be an integer >= 1, not {min_pixels!r}")
    if not isinstance(tile_px, int) or not 16 <= tile_px <= 4096:
        raise errors.ConfigError(f"output tile size must be 16..4096 pixels, not {tile_px!r}")
    if (extent is None) == (dataset is None):
        raise errors.ConfigError("give exactly one of an extent (MINX MINY MAXX MAXY) or a dataset")
    if extent is not None and len(extent) != 4:
        raise errors.ConfigError(f"extent needs 4 numbers (MINX MINY MAXX MAXY), got {len(extent)}")
    names = _names(out, polygons, probabilities, vectorize, overviews)
    dsn = dsn_of(dsn_or_conn)
    with connect(dsn, autocommit=True, application_name="pggeolearn predict") as control:
        require_schema(control)
        reads = [] if imagery is None or _looks_like_sql(imagery) else [TableName.parse(imagery)]
        outputs.check(control, _outputs(names, overviews), reads=reads, overwrite=overwrite,
                      append=append, force=force)
        p = load_model(control, model, device=device)
        model_name = model if isinstance(model, str) else str(p.name)
        if overlap is None:
            overlap = min(DEFAULT_OVERLAP, int(p.tile_px) // 4)
        if not 0 <= overlap < int(p.tile_px):
            raise errors.ConfigError(f"overlap must be 0..{int(p.tile_px) - 1} pixels "
                                     f"(model windows are {p.tile_px} px), not {overlap}")
        plan = _plan(control, p, model_name, extent=extent, extent_srid=extent_srid, dataset=dataset,
                     split=split, imagery=imagery, tile_px=tile_px, names=names, append=append,
                     timeout_s=timeout_s, grid_origin=grid_origin)
        outputs.refuse_reads(_outputs(names, overviews), _reads(control, plan, timeout_s))
        params = {"extent": list(extent) if extent is not None else None, "extent_srid": extent_srid,
                  "dataset": dataset, "split": split if dataset else None, "imagery": imagery,
                  "out": names.show(names.out), "overlap": overlap, "stitch": stitch,
                  "probabilities": probabilities, "vectorize": vectorize, "tile_px": tile_px,
                  "min_pixels": min_pixels, "grid_origin": list(grid_origin) if grid_origin else None,
                  "batch_size": batch_size, "overwrite": overwrite, "append": append,
                  "framework": str(getattr(p, "framework", "")), "window": int(p.tile_px)}
        g = plan.grid
        run = runs.Run.start(dsn, "predict", model=model_name, dataset=dataset, params=params,
                             extent=g.bounds, srid=g.srid)
        run_id = run.run_id
        report = PredictReport(run_id, model_name, names.show(names.out), names.show(names.prob),
                               names.show(names.polygons), g, int(p.tile_px), overlap, stitch, tile_px,
                               notes=list(plan.notes))
        try:
            _execute(dsn, plan, names, report, overlap=overlap, stitch=stitch, batch_size=batch_size,
                     probabilities=probabilities, vectorize=vectorize, min_pixels=min_pixels,
                     append=append,
                     overviews=overviews, timeout_s=timeout_s, progress=progress, started=started)
        except BaseException as exc:
            # the database gone: the next command marks the run failed; the tables were rolled back
            run.fail("interrupted" if isinstance(exc, KeyboardInterrupt) else (str(exc) or type(exc).__name__))
            if isinstance(exc, psycopg.Error):
                raise translate(exc, f"predict run {run_id}") from exc
            raise
        finally:
            run.close()
        from pggeolearn.qgis.project import refresh_after

        report.notes += refresh_after(control, model_name, dataset)  # the dataset's QGIS project
    return report


def _execute(dsn: str | None, plan: _Plan, names: _Names, report: PredictReport, *, overlap: int,
             stitch: str, batch_size: int, probabilities: bool, vectorize: bool, min_pixels: int,
             append: bool,
             overviews: Sequence[int], timeout_s: float, progress: bool, started: float) -> None:
    p, g = plan.predictor, plan.grid
    n_classes = len(p.classes)
    st = Stitcher(g.width, g.height, window=int(p.tile_px), overlap=overlap, mode=stitch,
                  n_classes=n_classes, tile_px=plan.tile_px)
    needed_w = _needed_windows(st, plan.needed_tiles, plan.tile_px)
    report.windows = int(needed_w.sum())
    predict_s = wait_s = 0.0
    with connect(dsn, application_name="pggeolearn predict writer") as w:
        with w.transaction():
            for schema in sorted({t[0] for t in (names.out, names.prob, names.polygons) if t}):
                if not w.execute("SELECT to_regnamespace(%s) IS NOT NULL", [schema]).fetchone()[0]:
                    w.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
                    report.notes.append(f"created schema {schema}")
            writer = _Writer(w, plan, report.run_id, probabilities=probabilities, vectorize=vectorize,
                             min_pixels=min_pixels)
            writer.create(names.out[0])
            reader = _BandReader(dsn, plan, st, needed_w.any(axis=1).tolist(), timeout_s).start()
            bar = tqdm(total=report.windows, unit="window", desc=f"predict {report.out}",
                       disable=not progress, leave=False)
            try:
                S, P = st.stride, st.window
                for r in range(st.nrows):
                    t0 = time.perf_counter()
                    band = reader.get()
                    wait_s += time.perf_counter() - t0
                    if band is not None:
                        img, valid = band
                        cols = [c for c in range(st.ncols) if needed_w[r, c]]
                        live = [c for c in cols if valid[:, c * S:c * S + P].any()]
                        bar.update(len(cols) - len(live))
                        for k in range(0, len(live), batch_size):
                            chunk = live[k:k + batch_size]
                            x = np.ascontiguousarray(np.stack([img[:, :, c * S:c * S + P] for c in chunk]))
                            t1 = time.perf_counter()
                            y = call_model(p, x, n_classes)
                            predict_s += time.perf_counter() - t1
                            for c, probs in zip(chunk, y, strict=True):
                                st.add(r, c, probs, valid[:, c * S:c * S + P])
                            report.windows_predicted += len(chunk)
                            bar.update(len(chunk))
                    for row0, probs, valid_rows in st.finish_row(r):
                        writer.tile_row(row0, probs, valid_rows)
            finally:
                bar.close()
                reader.close()
            report.tiles, report.tiles_empty = writer.tiles, writer.empty
            if writer.tiles == 0:
                raise errors.NotFound(f"no imagery under the extent from {plan.imagery_label}: "
                                      "nothing predicted, nothing written")
            t2 = time.perf_counter()
            report.overviews = _finish_raster(w, writer.cls_ident, names.out, append=append,
                                              algorithm="NearestNeighbour", overviews=overviews)
            if names.prob:
                _finish_raster(w, writer.prob_ident, names.prob, append=append,
                               algorithm="Bilinear", overviews=overviews)
            if names.polygons:
                report.pieces = writer.pieces.count
                report.min_pixels = min_pixels
                report.dropped = writer.pieces.dropped
                report.polygons = _finish_polygons(w, writer, names.polygons, append=append,
                                                   model_name=report.model, run_id=report.run_id)
            _save_styles(w, p, names, report.model)
            report.appended = append
            for t, what in ((names.out, "class raster"), (names.prob, "class probabilities"),
                            (names.polygons, "objects")):
                if t:
                    w.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(
                        sql.Identifier(*t), sql.Literal(
                            f"pggeolearn predict: {what} of model {report.model} (run {report.run_id})")))
            finalize_s = time.perf_counter() - t2
            report.timing = {"read": reader.seconds, "read wait": wait_s, "predict": predict_s,
                             "write": writer.write_s, "vectorize": writer.vector_s,
                             "finalize": finalize_s}
            report.seconds = time.perf_counter() - started
            runs.finish(w, report.run_id, report.outputs())


def call_model(p: Predictor, x: np.ndarray, n_classes: int) -> np.ndarray:
    y = np.asarray(p.predict_proba(x))
    want = (x.shape[0], n_classes, x.shape[2], x.shape[3])
    if y.shape != want:
        raise errors.ConfigError(f"model {p.name} returned probabilities of shape {y.shape}, "
                                 f"expected {want}")
    return y.astype(np.float32, copy=False)
