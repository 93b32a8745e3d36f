"""Polygons from the class raster: each output tile is labelled on the client (4-connected
pixels of one class are one piece, :mod:`.components`), pieces under ``min_pixels`` inside the
tile are left out, the rest vectorized (``rasterio.features.shapes``); pieces that share an edge
across a tile border are joined by a union-find over the border pixels, and the server
dissolves each group (``sql/predict_polygons.sql``, written by :mod:`.sink`)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence

import numpy as np

from pggeolearn.predict.components import label_components
from pggeolearn.predict.grid import NODATA, Grid

__all__ = ["Pieces"]


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


def _vectorize(cls_tile: np.ndarray, prob_tile: np.ndarray, min_pixels: int
               ) -> tuple[list[dict], np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Pieces of one tile in pixel coordinates: (geojson geoms, class ids, local label image
    (0: no piece, k: geoms[k - 1]), pixel counts, probability sums, pieces left out). A piece is
    one 4-connected component of one class; components under ``min_pixels`` that touch no tile
    border are left out before anything is vectorized."""
    from rasterio import features
    from rasterio.transform import Affine

    comp, comp_class = label_components(cls_tile, (0, NODATA))
    n = len(comp_class)
    if not n:
        return [], np.zeros(0, np.int32), np.zeros(cls_tile.shape, np.int32), np.zeros(0), np.zeros(0), 0
    size = np.bincount(comp.ravel(), minlength=n + 1)
    keep = size >= min_pixels
    keep[np.concatenate([comp[0], comp[-1], comp[:, 0], comp[:, -1]])] = True  # judged once joined
    keep[0] = False
    new_id = np.zeros(n + 1, np.int32)
    new_id[keep] = np.arange(1, int(keep.sum()) + 1)
    labels = new_id[comp]
    kept = int(keep.sum())
    if not kept:
        return [], np.zeros(0, np.int32), labels, np.zeros(0), np.zeros(0), n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # identity transform: NotGeoreferencedWarning
        # each label is one 4-connected component: one shape per label, its value the label
        shapes = features.shapes(labels, mask=labels > 0, connectivity=4, transform=Affine.identity())
        geoms: list[dict] = [{}] * kept
        for g, v in shapes:
            geoms[int(v) - 1] = g
    flat = labels.ravel()
    px = np.bincount(flat, minlength=kept + 1)[1:]
    psum = np.bincount(flat, weights=prob_tile.ravel().astype(np.float64), minlength=kept + 1)[1:]
    return geoms, comp_class[keep[1:]].astype(np.int32), labels, px, psum, n - kept


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


class Pieces:
    """Vectorizes output tiles, staging pieces for the server and joining them across borders.

    Pieces that touch no tile border are whole objects: those smaller than ``min_pixels`` are
    left out before vectorizing (noise costs one labelling pass, never a polygon). Pieces on a
    tile border are judged by the size of their group once joined: groups smaller than
    ``min_pixels`` in total are dropped by the server. Holes smaller than ``min_pixels`` are
    filled. ``min_pixels`` 0 or 1 keeps every piece.
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

        geoms, classes, labels, px, psum, dropped = _vectorize(cls_tile, prob_tile, self.min_pixels)
        self.dropped += dropped
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
        shp = shapely.from_geojson([json.dumps(_fill_small_holes(g, self.min_pixels)) for g in geoms])
        g = self.grid
        # world coordinates from GLOBAL pixel indices: a border vertex gets bit-identical
        # coordinates from both tiles, so their pieces share the edge exactly
        offset, scale, origin = np.array([col0, row0]), np.array([g.res, -g.res]), np.array([g.x0, g.y0])
        shp = shapely.transform(shp, lambda xy: (xy + offset) * scale + origin)
        blobs = shapely.to_wkb(shp)
        self.count += len(geoms)
        self.staged.append(np.arange(first, first + len(geoms)))
        return [(first + i, int(classes[i]), int(px[i]), float(psum[i]), bytes(blob))
                for i, blob in enumerate(blobs)]

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
