"""Seeded synthetic aerial scenes for tests and the end-to-end demo.

:func:`make_scene` writes three files that look like what a user brings to pggeolearn:

* an RGB GeoTIFF (EPSG:3857, uint8, tiled 256, deflate) showing vegetation, roads and roofs;
* ``roads.geojson``: OSM-like road centre lines (``osm_id``, ``highway``, ``name``);
* ``buildings.geojson``: OSM-like building footprints (``osm_id``, ``building``, ``levels``).

The vector files are in CRS84 lon/lat, like an OSM extract. The labels a DBA would define in SQL
(roads buffered by half their class width in ground metres -> class 1, buildings -> class 2)
match what is painted in the image, so a small segmentation model can learn them.
:func:`scene_label_reference` rasterizes exactly those labels with shapely + rasterio, as an
independent reference for the SQL rasterizer.

Everything is drawn from ``np.random.default_rng(seed)``: the same seed (and arguments) give
byte-identical files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np
import rasterio
import shapely
from rasterio.crs import CRS
from rasterio.features import rasterize
from rasterio.transform import Affine
from rasterio.warp import transform_geom
from shapely import affinity
from shapely.geometry import LineString, box, shape

__all__ = [
    "ROAD_WIDTHS_M",
    "Scene",
    "lonlat_to_mercator",
    "make_scene",
    "mercator_to_lonlat",
    "scene_label_reference",
    "scene_variant",
    "utm_epsg",
]

#: Semi-major axis of WGS84, the sphere radius of EPSG:3857.
EARTH_RADIUS_M = 6378137.0

#: Full painted width (ground metres) per highway class; buffer radius is half of it.
ROAD_WIDTHS_M: dict[str, float] = {
    "primary": 10.0,
    "secondary": 8.0,
    "residential": 6.0,
    "service": 4.0,
    "track": 3.0,
}

# Paint order: later classes are painted over earlier ones at junctions.
_ROAD_ORDER = ("track", "service", "residential", "secondary", "primary")

_ROAD_RGB: dict[str, tuple[float, float, float]] = {
    "primary": (88.0, 89.0, 94.0),  # dark asphalt
    "secondary": (104.0, 104.0, 107.0),  # asphalt
    "residential": (146.0, 139.0, 128.0),  # light, dusty
    "service": (160.0, 155.0, 146.0),  # concrete / gravel
    "track": (152.0, 128.0, 98.0),  # dirt
}

# (rgb, texture, weight) -- texture: 0 flat/stained, 1 corrugated sheet, 2 corrugated + gable.
_ROOFS: tuple[tuple[tuple[float, float, float], int, float], ...] = (
    ((160.0, 68.0, 52.0), 2, 0.22),  # red corrugated
    ((122.0, 80.0, 58.0), 2, 0.16),  # brown corrugated
    ((172.0, 170.0, 164.0), 0, 0.28),  # grey concrete
    ((200.0, 198.0, 190.0), 0, 0.12),  # light concrete
    ((58.0, 100.0, 154.0), 1, 0.14),  # blue sheet
    ((150.0, 150.0, 152.0), 1, 0.08),  # galvanised sheet
)

_BACKGROUND = {
    "dry": (136.0, 122.0, 84.0),
    "green": (66.0, 94.0, 46.0),
    "soil": (156.0, 127.0, 96.0),
    "canopy": (36.0, 56.0, 31.0),
}

_NAMES_A = (
    "Araniko", "Bhaktapur", "Dhulikhel", "Panauti", "Nala", "Sanga", "Kavre", "Chandeshwori",
    "Tindobato", "Bhimsen", "Ganesh", "Saraswati", "Janagal", "Kharkhare", "Ugrachandi",
)
_NAMES_B = ("Marg", "Road", "Sadak", "Path", "Galli", "Tole Marg")


@dataclass
class Scene:
    """Files and grid of one synthetic scene (see :func:`make_scene`)."""

    image_path: Path
    roads_path: Path
    buildings_path: Path
    srid: int
    bounds: tuple[float, float, float, float]
    resolution: float
    road_widths_m: dict[str, float] = field(default_factory=lambda: dict(ROAD_WIDTHS_M))

    @property
    def width(self) -> int:
        return int(round((self.bounds[2] - self.bounds[0]) / self.resolution))

    @property
    def height(self) -> int:
        return int(round((self.bounds[3] - self.bounds[1]) / self.resolution))

    @property
    def transform(self) -> Affine:
        return Affine(self.resolution, 0.0, self.bounds[0], 0.0, -self.resolution, self.bounds[3])


# --------------------------------------------------------------------------------------------
# projections


def lonlat_to_mercator(lon, lat):
    """Spherical Web Mercator (EPSG:3857) forward projection; works on scalars and arrays."""
    lon = np.asarray(lon, dtype=np.float64)
    lat = np.asarray(lat, dtype=np.float64)
    x = EARTH_RADIUS_M * np.radians(lon)
    y = EARTH_RADIUS_M * np.log(np.tan(np.pi / 4.0 + np.radians(lat) / 2.0))
    return x, y


def mercator_to_lonlat(x, y):
    """Inverse of :func:`lonlat_to_mercator`."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    lon = np.degrees(x / EARTH_RADIUS_M)
    lat = np.degrees(2.0 * np.arctan(np.exp(y / EARTH_RADIUS_M)) - np.pi / 2.0)
    return lon, lat


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the WGS84 UTM zone containing (lon, lat): 326zz north, 327zz south."""
    zone = int(math.floor((lon + 180.0) / 6.0)) % 60 + 1
    return (32600 if lat >= 0 else 32700) + zone


# --------------------------------------------------------------------------------------------
# layout (vector geometry in a local ground-metre frame: origin at the upper-left corner of
# the image, x to the east, y to the south -- i.e. pixel coordinates times pixel_m)


def _curve(rng, p0, p1, amp_frac: float, step_m: float, pin_end: bool) -> LineString:
    """A gently curving polyline from p0 towards p1 (a smooth lateral offset of the chord)."""
    p0 = np.asarray(p0, dtype=np.float64)
    p1 = np.asarray(p1, dtype=np.float64)
    d = p1 - p0
    length = float(np.hypot(*d))
    n = max(8, int(length / step_m) + 1)
    s = np.linspace(0.0, 1.0, n)
    normal = np.array([-d[1], d[0]]) / length
    f1, f2 = rng.uniform(0.5, 1.4), rng.uniform(1.5, 3.0)
    ph1, ph2 = rng.uniform(0.0, 2.0 * np.pi, 2)
    a1 = rng.uniform(-1.0, 1.0) * amp_frac * length
    a2 = rng.uniform(-1.0, 1.0) * amp_frac * length * 0.25
    off = a1 * np.sin(np.pi * f1 * s + ph1) + a2 * np.sin(np.pi * f2 * s + ph2)
    off -= off[0] * (1.0 - s) + off[-1] * s if pin_end else off[0]
    pts = p0 + s[:, None] * d + off[:, None] * normal
    return LineString(pts)


def _tangent(line: LineString, dist: float) -> np.ndarray:
    a = line.interpolate(max(dist - 2.0, 0.0))
    b = line.interpolate(min(dist + 2.0, line.length))
    t = np.array([b.x - a.x, b.y - a.y])
    return t / (np.hypot(*t) or 1.0)


@dataclass
class _Building:
    poly: shapely.Polygon  # local metre frame
    kind: str
    levels: int
    angle: float  # direction of the width axis (radians, local frame)
    cx: float
    cy: float
    width: float
    depth: float


def _make_roads(rng, extent: float, n_roads: int) -> list[tuple[LineString, str]]:
    """Long edge-to-edge main roads (some crossing) plus shorter branches."""
    if n_roads <= 0:
        return []
    scene = box(0.0, 0.0, extent, extent)
    margin = 40.0
    n_main = min(n_roads, max(2, round(extent / 200.0)))
    roads: list[tuple[LineString, str]] = []
    lo, hi = 0.08 * extent, 0.92 * extent
    same: dict[bool, list[LineString]] = {True: [], False: []}
    for k in range(n_main):
        horizontal = k % 2 == 0
        cls = "primary" if k % 3 == 0 else "secondary"
        for _ in range(50):
            a, b = rng.uniform(lo, hi, 2)
            if horizontal:
                p0, p1 = (-margin, a), (extent + margin, b)
            else:
                p0, p1 = (a, -margin), (b, extent + margin)
            if rng.random() < 0.5:
                p0, p1 = p1, p0
            line = _curve(rng, p0, p1, amp_frac=0.06, step_m=8.0, pin_end=True)
            # roads of the same orientation stay apart; the others cross them
            if not shapely.dwithin(np.array(same[horizontal], dtype=object), line, 60.0).any():
                roads.append((line, cls))
                same[horizontal].append(line)
                break

    n_branch = n_roads - len(roads)
    # parents are picked in proportion to their length inside the scene (main roads count x2)
    weights = [g.intersection(scene).length * 2.0 for g, _ in roads]
    attempts = 0
    while n_branch > 0 and attempts < 40 * (n_roads + 1):
        attempts += 1
        wsum = float(np.sum(weights))
        if wsum <= 0:
            break
        pi = int(rng.choice(len(roads), p=np.asarray(weights) / wsum))
        parent, pcls = roads[pi]
        dist = rng.uniform(0.0, parent.length)
        start = parent.interpolate(dist)
        if not scene.contains(start):
            continue
        tx, ty = _tangent(parent, dist)
        ang = math.atan2(ty, tx) + rng.choice([-1.0, 1.0]) * math.radians(rng.uniform(65, 115))
        length = rng.uniform(60.0, min(320.0, max(80.0, 0.6 * extent)))
        end = (start.x + length * math.cos(ang), start.y + length * math.sin(ang))
        line = _curve(rng, (start.x, start.y), end, amp_frac=0.05, step_m=6.0, pin_end=False)
        if pcls == "track":
            cls = "track"
        else:
            cls = str(rng.choice(["residential", "service", "track"], p=[0.55, 0.27, 0.18]))
        if line.intersection(scene).length < 30.0:
            continue
        # away from its junction the branch keeps a clearance from every road (room for houses)
        clearance = 20.0 + ROAD_WIDTHS_M[cls] / 2.0
        head = start.buffer(ROAD_WIDTHS_M[pcls] / 2.0 + clearance / 0.8)
        tail = line.difference(head)
        others = np.array([g for g, _ in roads], dtype=object)
        if shapely.dwithin(others, tail, clearance).any():
            continue
        roads.append((line, cls))
        weights.append(line.intersection(scene).length)
        n_branch -= 1
    return roads


def _rects(cx, cy, w, d, ang) -> np.ndarray:
    """Rectangles (N,) with centres, width along ``ang`` and depth across it."""
    c, s = np.cos(ang), np.sin(ang)
    hw, hd = w / 2.0, d / 2.0
    corners = []
    for a, b in ((-1, -1), (1, -1), (1, 1), (-1, 1), (-1, -1)):
        corners.append(np.stack([cx + a * hw * c - b * hd * s, cy + a * hw * s + b * hd * c], -1))
    return shapely.polygons(np.stack(corners, axis=1))


def _rects_overlap(cx, cy, w, d, ang, pairs: np.ndarray) -> np.ndarray:
    """For index pairs (2, n): do the two rectangles intersect (touching counts)?"""
    i, j = pairs
    c, s = np.cos(ang), np.sin(ang)
    axes_u = np.stack([c, s], -1)  # along the width
    axes_v = np.stack([-s, c], -1)  # along the depth
    delta = np.stack([cx[j] - cx[i], cy[j] - cy[i]], -1)
    hit = np.ones(pairs.shape[1], dtype=bool)
    for k in (i, j):
        for n in (axes_u[k], axes_v[k]):
            ri = (w[i] / 2) * np.abs((axes_u[i] * n).sum(-1)) + (d[i] / 2) * np.abs(
                (axes_v[i] * n).sum(-1))
            rj = (w[j] / 2) * np.abs((axes_u[j] * n).sum(-1)) + (d[j] / 2) * np.abs(
                (axes_v[j] * n).sum(-1))
            hit &= np.abs((delta * n).sum(-1)) <= ri + rj + 1e-9
    return hit


def _building_dims(rng, kinds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(kinds)
    w = np.where(kinds == "school", rng.uniform(16, 25, n),
                 np.where(kinds == "residential", rng.uniform(6, 14, n), rng.uniform(6, 20, n)))
    d = np.where(kinds == "school", rng.uniform(10, 18, n),
                 np.where(kinds == "residential", rng.uniform(6, 11, n), rng.uniform(6, 15, n)))
    return w, d


def _make_buildings(rng, extent: float, roads, n_buildings: int):
    """Non-overlapping rectangles near roads (aligned with them) and scattered in the fields."""
    if n_buildings <= 0:
        return []
    scene = box(0.0, 0.0, extent, extent)
    n_cand = max(64, 8 * n_buildings)
    kinds = rng.choice(np.array(["residential", "yes", "school"]), n_cand, p=[0.55, 0.42, 0.03])
    w, d = _building_dims(rng, kinds)
    cx = rng.uniform(-15.0, extent + 15.0, n_cand)
    cy = rng.uniform(-15.0, extent + 15.0, n_cand)
    ang = np.where(rng.random(n_cand) < 0.4, 0.0, rng.uniform(0.0, np.pi / 2.0, n_cand))

    if roads:
        # ~70 % of candidates line up along roads, facing them
        lines = np.array([g for g, _ in roads], dtype=object)
        cls = [c for _, c in roads]
        weight = np.array([g.intersection(scene).length for g in lines])
        weight *= np.array([{"track": 0.3, "residential": 1.6}.get(c, 1.0) for c in cls])
        along = rng.random(n_cand) < 0.7
        if weight.sum() > 0 and along.any():
            idx = np.flatnonzero(along)
            ri = rng.choice(len(lines), len(idx), p=weight / weight.sum())
            dist = rng.random(len(idx)) * shapely.length(lines[ri])
            p = shapely.line_interpolate_point(lines[ri], dist)
            pa = shapely.line_interpolate_point(lines[ri], np.maximum(dist - 2.0, 0.0))
            pb = shapely.line_interpolate_point(lines[ri], dist + 2.0)
            tx = shapely.get_x(pb) - shapely.get_x(pa)
            ty = shapely.get_y(pb) - shapely.get_y(pa)
            norm = np.hypot(tx, ty)
            norm[norm == 0] = 1.0
            tx, ty = tx / norm, ty / norm
            side = rng.choice([-1.0, 1.0], len(idx))
            half = np.array([ROAD_WIDTHS_M[cls[i]] / 2.0 for i in ri])
            setback = half + rng.uniform(1.8, 9.0, len(idx)) + d[idx] / 2.0
            cx[idx] = shapely.get_x(p) - ty * side * setback
            cy[idx] = shapely.get_y(p) + tx * side * setback
            jitter = np.where(rng.random(len(idx)) < 0.15, rng.uniform(0, np.pi, len(idx)),
                              rng.normal(0.0, np.radians(4.0), len(idx)))
            ang[idx] = np.arctan2(ty, tx) + jitter

    # a few candidates centred on the scene edges, tried first (realistic clipping cases)
    n_edge = min(8, n_cand)
    t = rng.uniform(0.1, 0.9, n_edge) * extent
    edge_side = np.arange(n_edge) % 4
    cx[:n_edge] = np.select([edge_side == 0, edge_side == 1, edge_side == 2], [0.0, extent, t], t)
    cy[:n_edge] = np.select([edge_side == 2, edge_side == 3], [0.0, extent], t)

    polys = _rects(cx, cy, w, d, ang)
    ok = shapely.intersects(polys, scene)
    if roads:
        # keep-out zone per road segment: small polygons with tight bounding boxes
        zones = []
        for g, c in roads:
            xy = shapely.get_coordinates(g)
            segs = shapely.linestrings(np.stack([xy[:-1], xy[1:]], axis=1))
            zones.append(shapely.buffer(segs, ROAD_WIDTHS_M[c] / 2.0 + 1.5))
        hit = shapely.STRtree(np.concatenate(zones)).query(polys, predicate="intersects")[0]
        ok[hit] = False
    cand = np.flatnonzero(ok)
    # greedy acceptance in candidate order, keeping a 2 m gap between buildings: bounding-box
    # pairs from an STRtree, refined exactly with the separating-axis test for rectangles
    gap = 2.0
    ca, sa = np.abs(np.cos(ang[cand])), np.abs(np.sin(ang[cand]))
    ex = (w[cand] * ca + d[cand] * sa + gap) / 2.0
    ey = (w[cand] * sa + d[cand] * ca + gap) / 2.0
    boxes = shapely.box(cx[cand] - ex, cy[cand] - ey, cx[cand] + ex, cy[cand] + ey)
    pairs = shapely.STRtree(boxes).query(boxes)
    pairs = pairs[:, pairs[0] != pairs[1]]
    pairs = pairs[:, _rects_overlap(cx[cand], cy[cand], w[cand] + gap, d[cand] + gap,
                                    ang[cand], pairs)]
    order = np.argsort(pairs[0], kind="stable")
    src, dst = pairs[0][order], pairs[1][order]
    starts = np.searchsorted(src, np.arange(len(cand) + 1))
    taken = np.zeros(len(cand), dtype=bool)
    accepted: list[int] = []
    for i in range(len(cand)):
        if taken[dst[starts[i]:starts[i + 1]]].any():
            continue
        taken[i] = True
        accepted.append(int(cand[i]))
        if len(accepted) >= n_buildings:
            break
    acc = np.array(accepted, dtype=np.int64)
    levels = np.where(kinds[acc] == "school", rng.integers(1, 3, len(acc)),
                      rng.choice([1, 2, 3, 4], len(acc), p=[0.35, 0.35, 0.2, 0.1]))
    return [
        _Building(polys[i], str(kinds[i]), int(lv), float(ang[i]), float(cx[i]), float(cy[i]),
                  float(w[i]), float(d[i]))
        for i, lv in zip(acc, levels, strict=True)
    ]


# --------------------------------------------------------------------------------------------
# painting (pixel coordinates: geometry in metres / pixel_m, identity transform)


_CHUNK_ROWS = 256


class _Noise:
    """A lattice of random values, smoothly interpolated onto the (h, w) pixel grid on demand
    (by row blocks or at given pixels), so full-resolution noise is never held in memory."""

    def __init__(self, grid: np.ndarray, h: int, w: int, cell_px: float, off: np.ndarray):
        self.grid = grid
        self.yi, self.fy = self._axis(h, cell_px, float(off[0]))
        self.xi, self.fx = self._axis(w, cell_px, float(off[1]))

    @staticmethod
    def _axis(n: int, cell_px: float, off: float):
        t = (np.arange(n, dtype=np.float64) + off * cell_px) / cell_px
        i = t.astype(np.int64)
        f = (t - i).astype(np.float32)
        return i, f * f * (np.float32(3.0) - np.float32(2.0) * f)

    def rows(self, r0: int, r1: int) -> np.ndarray:
        g, yi = self.grid, self.yi[r0:r1]
        lat = g[yi] + (g[yi + 1] - g[yi]) * self.fy[r0:r1, None]  # (n, gw)
        a = np.take(lat, self.xi, axis=1)
        b = np.take(lat, self.xi + 1, axis=1)
        b -= a
        b *= self.fx
        a += b
        return a

    def at(self, rr: np.ndarray, cc: np.ndarray) -> np.ndarray:
        g, y0, x0 = self.grid, self.yi[rr], self.xi[cc]
        fy, fx = self.fy[rr], self.fx[cc]
        top = g[y0, x0] + (g[y0, x0 + 1] - g[y0, x0]) * fx
        bot = g[y0 + 1, x0] + (g[y0 + 1, x0 + 1] - g[y0 + 1, x0]) * fx
        return top + (bot - top) * fy

    def full(self) -> np.ndarray:
        return self.rows(0, len(self.yi))


def _lattice(h: int, w: int, cell_px: float) -> tuple[int, int]:
    return int(math.ceil(h / cell_px)) + 2, int(math.ceil(w / cell_px)) + 2


def _value_noise(rng, h: int, w: int, cell_px: float) -> _Noise:
    """Smooth value noise in [0, 1) with the given feature size (pixels)."""
    cell_px = max(float(cell_px), 1.5)
    grid = rng.random(_lattice(h, w, cell_px), dtype=np.float32)
    return _Noise(grid, h, w, cell_px, rng.random(2))


def _fbm(rng, h: int, w: int, octaves, pixel_m: float) -> _Noise:
    """Multi-scale value noise; octaves = [(feature size in metres, weight), ...].

    The coarse octaves are summed on the lattice of the finest one, so only one
    full-resolution interpolation is needed.
    """
    total = sum(wt for _, wt in octaves)
    finest = max(min(size for size, _ in octaves) / pixel_m, 1.5)
    gh, gw = _lattice(h, w, finest)
    grid = np.zeros((gh, gw), dtype=np.float32)
    for size_m, wt in octaves:
        rel = size_m / pixel_m / finest
        octave = (rng.random((gh, gw), dtype=np.float32) if rel < 1.5
                  else _value_noise(rng, gh, gw, rel).full())
        grid += octave * np.float32(wt / total)
    return _Noise(grid, h, w, finest, rng.random(2))


def _smoothstep(lo: float, hi: float, x: np.ndarray) -> np.ndarray:
    t = x - np.float32(lo)
    t *= np.float32(1.0 / (hi - lo))
    np.clip(t, 0.0, 1.0, out=t)
    r = t * t
    t *= np.float32(-2.0)
    t += np.float32(3.0)
    r *= t
    return r


def _polygon_dicts(geoms) -> list[dict]:
    """GeoJSON-like dicts for simple polygons (faster than ``__geo_interface__``)."""
    coords, idx = shapely.get_coordinates(geoms, return_index=True)
    cuts = np.flatnonzero(np.diff(idx)) + 1
    return [{"type": "Polygon", "coordinates": [c.tolist()]} for c in np.split(coords, cuts)]


def _burn(shapes, shape_hw, dtype="int32", all_touched=False) -> np.ndarray:
    shapes = [(g, v) for g, v in shapes
              if isinstance(g, dict) or (g is not None and not g.is_empty)]
    if not shapes:
        return np.zeros(shape_hw, dtype=dtype)
    return rasterize(shapes, out_shape=shape_hw, fill=0, transform=Affine.identity(),
                     all_touched=all_touched, dtype=dtype)


def _blur_rows(img: np.ndarray, r0: int, r1: int) -> np.ndarray:
    """Binomial 3x3 blur of rows r0:r1 of img (3, h, w), edges replicated."""
    h = img.shape[1]
    q = np.float32(0.25)
    blk = img[:, r0:r1]
    v = blk * np.float32(0.5)
    v[:, 1:] += blk[:, :-1] * q
    v[:, :-1] += blk[:, 1:] * q
    v[:, 0] += img[:, max(r0 - 1, 0)] * q
    v[:, -1] += img[:, min(r1, h - 1)] * q
    o = v * np.float32(0.5)
    o[:, :, 1:] += v[:, :, :-1] * q
    o[:, :, :-1] += v[:, :, 1:] * q
    o[:, :, 0] += v[:, :, 0] * q
    o[:, :, -1] += v[:, :, -1] * q
    return o


def _render(rng, size: int, pixel_m: float, roads, buildings):
    """Paint the scene; returns (rgb uint8 (3,h,w), painted label uint8 (h,w))."""
    h = w = size
    px = 1.0 / pixel_m
    bg = {k: np.array(v, dtype=np.float32) for k, v in _BACKGROUND.items()}

    # -- background: moisture-driven grass/soil, bare patches, tree clumps, fine texture
    moist = _fbm(rng, h, w, [(220.0, 0.45), (70.0, 0.3), (22.0, 0.15), (7.0, 0.1)], pixel_m)
    soil = _fbm(rng, h, w, [(130.0, 0.7), (30.0, 0.3)], pixel_m)
    trees = _fbm(rng, h, w, [(28.0, 0.6), (9.0, 0.3), (3.0, 0.1)], pixel_m)
    fine = _value_noise(rng, h, w, 1.6 * px)
    img = np.empty((3, h, w), dtype=np.float32)
    for r0 in range(0, h, _CHUNK_ROWS):
        r1 = min(h, r0 + _CHUNK_ROWS)
        m = moist.rows(r0, r1)
        t_green = _smoothstep(0.38, 0.62, m)
        t_soil = _smoothstep(0.62, 0.72, soil.rows(r0, r1))
        t_soil *= np.float32(0.85)
        t_tree = _smoothstep(0.6, 0.68, trees.rows(r0, r1))
        t_tree *= _smoothstep(0.42, 0.58, m)
        bright = fine.rows(r0, r1)
        bright *= np.float32(0.28)
        bright += np.float32(0.86)
        for c in range(3):
            v = t_green * (bg["green"][c] - bg["dry"][c])
            v += bg["dry"][c]
            v += (bg["soil"][c] - v) * t_soil
            v += (bg["canopy"][c] - v) * t_tree
            v *= bright
            img[c, r0:r1] = v

    painted = np.zeros((h, w), dtype=np.uint8)
    img2 = img.reshape(3, -1)

    # -- roads: per-road colour jitter, darker edges (shoulders) outside every road's core
    if roads:
        order = sorted(range(len(roads)), key=lambda i: _ROAD_ORDER.index(roads[i][1]))
        lines_px = [affinity.scale(roads[i][0], px, px, origin=(0, 0)) for i in order]
        widths = np.array([ROAD_WIDTHS_M[roads[i][1]] for i in order]) * px
        edge = np.maximum(0.5, 0.1 * widths / px) * px
        outer = _burn([(shapely.buffer(g, wd / 2.0), k + 1)
                       for k, (g, wd) in enumerate(zip(lines_px, widths, strict=True))], (h, w))
        inner = _burn([(shapely.buffer(g, wd / 2.0 - e), 1)
                       for g, wd, e in zip(lines_px, widths, edge, strict=True)
                       if wd / 2.0 - e > 0.25], (h, w), dtype="uint8")
        lut = np.zeros((len(order) + 1, 3), dtype=np.float32)
        for k, i in enumerate(order):
            lut[k + 1] = np.array(_ROAD_RGB[roads[i][1]]) + rng.normal(0.0, 5.0)
        flat = np.flatnonzero(outer)
        rr, cc = np.divmod(flat, w)
        rid = outer.ravel()[flat]
        shade = fine.at(rr, cc)
        shade *= np.float32(0.14)
        shade += np.float32(0.93)
        shade[inner.ravel()[flat] == 0] *= np.float32(0.8)
        for c in range(3):
            img2[c, flat] = lut[rid, c] * shade
        painted.ravel()[flat] = 1

    # -- buildings: shadow (not labelled), then textured roofs with darker eaves
    if buildings:
        n = len(buildings)
        levels = np.array([b.levels for b in buildings], dtype=np.float64)
        # ridge along the long side; (half_len, half_wid) along / across the ridge, in pixels
        long_w = np.array([b.width >= b.depth for b in buildings])
        ang = np.array([b.angle for b in buildings]) + np.where(long_w, 0.0, np.pi / 2.0)
        half_len = np.array([max(b.width, b.depth) for b in buildings]) * px / 2.0
        half_wid = np.array([min(b.width, b.depth) for b in buildings]) * px / 2.0
        cx = np.array([b.cx for b in buildings]) * px
        cy = np.array([b.cy for b in buildings]) * px
        ca, sa = np.cos(ang), np.sin(ang)
        corners = np.stack([
            np.stack([cx + i * half_len * ca - j * half_wid * sa,
                      cy + i * half_len * sa + j * half_wid * ca], -1)
            for i, j in ((-1, -1), (1, -1), (1, 1), (-1, 1))
        ], axis=1)  # (n, 4, 2)

        sun = rng.uniform(0.0, 2.0 * np.pi)  # shadows point away from the sun
        slen = (1.2 + 1.6 * levels) * px
        moved = corners + np.stack([-math.cos(sun) * slen, -math.sin(sun) * slen], -1)[:, None]
        shadows = shapely.convex_hull(shapely.multipoints(np.concatenate([corners, moved], 1)))
        sflat = np.flatnonzero(_burn(zip(_polygon_dicts(shadows), repeat(1)), (h, w), "uint8"))
        for c, f in enumerate((0.42, 0.45, 0.55)):
            img2[c, sflat] *= np.float32(f)

        rings = np.concatenate([corners, corners[:, :1]], axis=1)
        dtype = "uint16" if n < 65535 else "int32"
        bid = _burn(
            (({"type": "Polygon", "coordinates": [r.tolist()]}, k + 1)
             for k, r in enumerate(rings)),
            (h, w), dtype,
        )
        p = np.array([r[2] for r in _ROOFS])
        pick = rng.choice(len(_ROOFS), n, p=p / p.sum())
        base = np.array([_ROOFS[i][0] for i in pick], dtype=np.float32)
        base += rng.normal(0.0, 7.0, (n, 1)).astype(np.float32)
        base *= rng.uniform(0.9, 1.08, (n, 1)).astype(np.float32)
        tex = np.array([_ROOFS[i][1] for i in pick])
        # the sunny half of a gabled roof is brighter
        toward_sun = np.sign(-sa * math.cos(sun) + ca * math.sin(sun))
        toward_sun[toward_sun == 0] = 1.0
        gable = np.where(tex == 2, 0.11 * toward_sun, 0.0).astype(np.float32)
        ripple = np.where(tex >= 1, 0.06, 0.0).astype(np.float32)
        stain = np.where(tex == 0, 0.2, 0.0).astype(np.float32)
        eave = float(np.clip(0.6 * px, 0.5, 2.0))
        in_len = (half_len - eave).astype(np.float32)
        in_wid = (half_wid - eave).astype(np.float32)
        cx, cy = cx.astype(np.float32), cy.astype(np.float32)
        ca, sa = ca.astype(np.float32), sa.astype(np.float32)

        flat = np.flatnonzero(bid)
        b = bid.ravel()[flat].astype(np.int64) - 1
        rr, cc = np.divmod(flat, w)
        x = (cc + 0.5).astype(np.float32) - cx[b]
        y = (rr + 0.5).astype(np.float32) - cy[b]
        u = x * ca[b] + y * sa[b]  # along the ridge (pixels)
        v = y * ca[b] - x * sa[b]  # across the ridge
        shade = np.ones(len(flat), dtype=np.float32)
        shade += ripple[b] * np.sin(v * np.float32(2.0 * np.pi * pixel_m / 1.4))
        shade += gable[b] * np.sign(v)
        shade *= 1.0 + stain[b] * (fine.at(rr, cc) - np.float32(0.5))
        shade[(np.abs(u) > in_len[b]) | (np.abs(v) > in_wid[b])] *= np.float32(0.8)
        for c in range(3):
            img2[c, flat] = base[b, c] * shade
        painted.ravel()[flat] = 2

    # -- optics: slight blur (binomial 3x3), then per-pixel sensor noise and quantisation
    out = np.empty((3, h, w), dtype=np.uint8)
    scale = np.float32(3.0 * math.sqrt(12.0))  # uniform noise, std 3 DN
    for r0 in range(0, h, _CHUNK_ROWS):
        r1 = min(h, r0 + _CHUNK_ROWS)
        o = _blur_rows(img, r0, r1)
        noise = rng.random(o.shape, dtype=np.float32)
        noise -= np.float32(0.5)
        noise *= scale
        o += noise
        o += np.float32(0.5)
        np.clip(o, 0.0, 255.0, out=o)
        out[:, r0:r1] = o
    return out, painted


# --------------------------------------------------------------------------------------------
# output


def _round_coords(coords, ndigits: int = 8) -> list[list[float]]:
    return [[round(float(x), ndigits), round(float(y), ndigits)] for x, y in coords]


def _write_geojson(path: Path, features: list[dict]) -> None:
    fc = {
        "type": "FeatureCollection",
        "name": path.stem,
        "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:OGC:1.3:CRS84"}},
        "features": features,
    }
    path.write_text(json.dumps(fc, separators=(",", ":")) + "\n", encoding="utf-8")


def _road_name(rng, cls: str) -> str | None:
    if cls in ("service", "track"):
        return None
    a = _NAMES_A[int(rng.integers(len(_NAMES_A)))]
    b = _NAMES_B[int(rng.integers(len(_NAMES_B)))]
    return f"{a} {b}"


def make_scene(
    out_dir: Path,
    *,
    size_px: int = 1024,
    seed: int = 0,
    center_lonlat: tuple[float, float] = (85.52, 27.63),
    pixel_m: float = 0.5,
    n_roads: int | None = None,
    n_buildings: int | None = None,
) -> Scene:
    """Generate a synthetic aerial scene with roads and buildings and write it to ``out_dir``.

    Writes ``scene.tif`` (RGB uint8, EPSG:3857, tiled 256, deflate, no nodata),
    ``roads.geojson`` (LineStrings) and ``buildings.geojson`` (Polygons), both CRS84 lon/lat.

    Grid: EPSG:3857, north-up, square ``size_px`` x ``size_px`` pixels, centred on
    ``center_lonlat``. ``pixel_m`` is the *ground* sampling distance in metres. Web Mercator
    stretches ground distances by 1/cos(latitude), so the EPSG:3857 pixel size is
    ``resolution = pixel_m / cos(lat_centre)`` (spherical scale factor; on the WGS84 ellipsoid
    the true scale differs by < 0.5 %, and it varies with latitude across the scene by
    ~tan(lat)*extent/R, i.e. < 0.1 % for a few km).

    Roads are painted with full width ``ROAD_WIDTHS_M[highway]`` ground metres (primary 10,
    secondary 8, residential 6, service 4, track 3), i.e. the width of ``ST_Buffer(centre line,
    width / 2)`` computed in metres; buildings are painted with their footprint, and their
    shadows (not part of the label) fall next to them. Buildings never overlap each other or a
    road buffer (1.5 m clearance). Some roads and buildings cross the scene edges.

    ``n_roads`` / ``n_buildings`` default to a density that scales with the scene area
    (about 0.26 km2 at the defaults: 3 main roads + 9 branches, 280 buildings); they are upper
    bounds, fewer may be placed when the scene runs out of room.

    Deterministic: same arguments -> byte-identical files.
    """
    return _make_scene(
        out_dir, size_px=size_px, seed=seed, center_lonlat=center_lonlat, pixel_m=pixel_m,
        n_roads=n_roads, n_buildings=n_buildings,
    )[0]


def _make_scene(
    out_dir: Path,
    *,
    size_px: int = 1024,
    seed: int = 0,
    center_lonlat: tuple[float, float] = (85.52, 27.63),
    pixel_m: float = 0.5,
    n_roads: int | None = None,
    n_buildings: int | None = None,
) -> tuple[Scene, np.ndarray]:
    """:func:`make_scene`, also returning the label mask as painted (uint8, 0/1/2)."""
    if size_px < 16:
        raise ValueError("size_px must be >= 16")
    if pixel_m <= 0:
        raise ValueError("pixel_m must be > 0")
    lon0, lat0 = (float(v) for v in center_lonlat)
    if not (-180.0 <= lon0 <= 180.0 and -85.0 < lat0 < 85.0):
        raise ValueError(f"center_lonlat out of range: {center_lonlat}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    extent = size_px * pixel_m  # ground metres
    area_km2 = extent * extent / 1e6
    if n_roads is None:
        n_roads = max(2, round(extent / 200.0)) + round(area_km2 * 34.0)
    if n_buildings is None:
        n_buildings = round(area_km2 * 1070.0)

    roads = _make_roads(rng, extent, int(n_roads))
    buildings = _make_buildings(rng, extent, roads, int(n_buildings))
    rgb, painted = _render(rng, size_px, pixel_m, roads, buildings)

    # -- georeferencing
    resolution = pixel_m / math.cos(math.radians(lat0))
    cx, cy = (float(v) for v in lonlat_to_mercator(lon0, lat0))
    half = size_px * resolution / 2.0
    bounds = (cx - half, cy - half, cx + half, cy + half)
    if bounds[0] < -math.pi * EARTH_RADIUS_M or bounds[2] > math.pi * EARTH_RADIUS_M:
        raise ValueError("the scene would cross the antimeridian; move center_lonlat")
    transform = Affine(resolution, 0.0, bounds[0], 0.0, -resolution, bounds[3])
    k = resolution / pixel_m  # EPSG:3857 units per ground metre

    def to_lonlat(xy: np.ndarray) -> np.ndarray:
        lon, lat = mercator_to_lonlat(bounds[0] + xy[:, 0] * k, bounds[3] - xy[:, 1] * k)
        return np.stack([lon, lat], axis=-1)

    image_path = out_dir / "scene.tif"
    profile = {
        "driver": "GTiff", "width": size_px, "height": size_px, "count": 3, "dtype": "uint8",
        "crs": CRS.from_epsg(3857), "transform": transform, "tiled": True,
        "blockxsize": 256, "blockysize": 256, "compress": "deflate", "predictor": 2,
        "interleave": "pixel", "photometric": "RGB", "num_threads": "ALL_CPUS",
    }
    with rasterio.Env(GDAL_PAM_ENABLED="NO"):
        with rasterio.open(image_path, "w", **profile) as dst:
            dst.write(rgb)

    road_features = []
    for i, (line, cls) in enumerate(roads):
        ll = shapely.transform(line, to_lonlat)
        road_features.append({
            "type": "Feature",
            "properties": {"osm_id": 100_000_001 + i, "highway": cls,
                           "name": _road_name(rng, cls)},
            "geometry": {"type": "LineString", "coordinates": _round_coords(ll.coords)},
        })
    building_features = []
    for i, bld in enumerate(buildings):
        ll = shapely.orient_polygons(shapely.transform(bld.poly, to_lonlat))
        building_features.append({
            "type": "Feature",
            "properties": {"osm_id": 500_000_001 + i, "building": bld.kind,
                           "levels": bld.levels},
            "geometry": {"type": "Polygon",
                         "coordinates": [_round_coords(ll.exterior.coords)]},
        })
    roads_path = out_dir / "roads.geojson"
    buildings_path = out_dir / "buildings.geojson"
    _write_geojson(roads_path, road_features)
    _write_geojson(buildings_path, building_features)

    scene = Scene(
        image_path=image_path,
        roads_path=roads_path,
        buildings_path=buildings_path,
        srid=3857,
        bounds=bounds,
        resolution=resolution,
        road_widths_m=dict(ROAD_WIDTHS_M),
    )
    return scene, painted


# --------------------------------------------------------------------------------------------
# reference labels


def _read_geometries(path: Path) -> list[dict]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return data["features"]


def scene_label_reference(
    scene: Scene,
    *,
    width: int,
    height: int,
    transform: Affine,
    all_touched: bool = False,
    crs: int | str | CRS | None = None,
) -> np.ndarray:
    """Rasterize the scene's truth labels onto a grid (``crs`` defaults to ``scene.srid``).

    Roads (class 1) are buffered by ``scene.road_widths_m[highway] / 2`` ground metres in the
    local UTM zone of the scene centre; buildings are class 2; the higher class wins where they
    overlap. Returns uint8 ``(height, width)`` with 0 for background.
    """
    target = scene.srid if crs is None else crs
    dst_crs = CRS.from_epsg(target) if isinstance(target, int) else CRS.from_user_input(target)
    cx = (scene.bounds[0] + scene.bounds[2]) / 2.0
    cy = (scene.bounds[1] + scene.bounds[3]) / 2.0
    lon, lat = (float(v) for v in mercator_to_lonlat(cx, cy))
    utm = CRS.from_epsg(utm_epsg(lon, lat))
    lonlat = CRS.from_user_input("OGC:CRS84")

    shapes: list[tuple[object, int]] = []
    roads = _read_geometries(scene.roads_path)
    if roads:
        in_utm = transform_geom(lonlat, utm, [f["geometry"] for f in roads])
        buffers = [
            shapely.buffer(shape(g), scene.road_widths_m[f["properties"]["highway"]] / 2.0)
            for g, f in zip(in_utm, roads, strict=True)
        ]
        out = transform_geom(utm, dst_crs, [b.__geo_interface__ for b in buffers])
        shapes += [(g, 1) for g in out]
    buildings = _read_geometries(scene.buildings_path)
    if buildings:
        out = transform_geom(lonlat, dst_crs, [f["geometry"] for f in buildings])
        shapes += [(g, 2) for g in out]
    if not shapes:
        return np.zeros((height, width), dtype=np.uint8)
    return rasterize(shapes, out_shape=(height, width), fill=0, transform=transform,
                     all_touched=all_touched, dtype="uint8")


# --------------------------------------------------------------------------------------------
# the scene zoo: the same scene as the imagery users bring (other CRSs, grids, pixel types)

#: How uint8 RGB values map to other pixel types (value -> value * scale + offset).
_VARIANT_SCALE = {"uint8": (1, 0), "uint16": (257, 0), "int16": (100, -12000),
                  "float32": (1 / 255, 0)}


def scene_variant(
    scene: Scene,
    path: str | Path,
    *,
    crs: int | None = None,
    resolution: float | None = None,
    shift_px: tuple[float, float] = (0.0, 0.0),
    dtype: str = "uint8",
    bands: int = 3,
    nodata: float | None = None,
    nodata_edge_px: int = 0,
    alpha: bool = False,
) -> Path:
    """Write the scene's image as another kind of file, for tests on real-looking imagery.

    ``crs`` / ``resolution``: warped (nearest) onto that CRS (EPSG code) and square pixel size
    (default: the scene's CRS; GDAL's suggested resolution), the grid origin moved by
    ``shift_px`` pixels (x right, y down) so it is not aligned with the scene's grid.
    ``dtype``: uint8, uint16 (x257), int16 (x100 - 12000) or float32 (/255). ``bands``: 1 (the
    mean of RGB), 3 (RGB) or 4 and more (RGB, then bands derived from them). ``nodata``:
    written as the file's NODATA value; the area outside the warped scene and a band of
    ``nodata_edge_px`` pixels along the left and bottom edges get it. ``alpha``: a last alpha
    band (255 on imagery, 0 outside and on the edge band) instead of a NODATA value.
    """
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    if dtype not in _VARIANT_SCALE:
        raise ValueError(f"dtype must be one of {', '.join(_VARIANT_SCALE)}")
    if bands < 1 or bands == 2:
        raise ValueError("bands must be 1 or >= 3")
    if alpha and nodata is not None:
        raise ValueError("give alpha or nodata, not both")
    path = Path(path)
    with rasterio.open(scene.image_path) as src:
        rgb = src.read()
        dst_crs = CRS.from_epsg(crs or scene.srid)
        if crs is None and resolution is None and shift_px == (0.0, 0.0):
            transform, width, height = src.transform, src.width, src.height
        else:
            transform, width, height = calculate_default_transform(
                src.crs, dst_crs, src.width, src.height, *src.bounds, resolution=resolution)
            transform = transform @ Affine.translation(-shift_px[0], -shift_px[1])
            width, height = width + 2, height + 2  # room for the shift
        out = np.zeros((3, height, width), np.uint8)
        covered = np.zeros((height, width), np.uint8)
        reproject(rgb, out, src_transform=src.transform, src_crs=src.crs, dst_transform=transform,
                  dst_crs=dst_crs, resampling=Resampling.nearest)
        reproject(np.ones(rgb.shape[1:], np.uint8), covered, src_transform=src.transform,
                  src_crs=src.crs, dst_transform=transform, dst_crs=dst_crs,
                  resampling=Resampling.nearest, dst_nodata=0)
    valid = covered.astype(bool)
    if nodata_edge_px:
        valid[:, :nodata_edge_px] = False
        valid[-nodata_edge_px:, :] = False
    f = out.astype(np.float64)
    layers = [f.mean(axis=0)] if bands == 1 else list(f)
    for k in range(3, bands):  # derived bands: weighted mixes of RGB
        w = np.roll(np.array([0.6, 0.3, 0.1]), k)
        layers.append(np.tensordot(w, f, axes=1))
    scale, offset = _VARIANT_SCALE[dtype]
    data = np.stack(layers) * scale + offset
    if dtype != "float32":
        data = np.rint(data)
    data = data.astype(dtype)
    if nodata is not None:
        data[:, ~valid] = nodata
    profile = {"driver": "GTiff", "width": width, "height": height, "count": len(data) + alpha,
               "dtype": dtype, "crs": dst_crs, "transform": transform, "nodata": nodata,
               "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
    with rasterio.Env(GDAL_PAM_ENABLED="NO"), rasterio.open(path, "w", **profile) as dst:
        dst.write(data, indexes=list(range(1, len(data) + 1)))
        if alpha:
            top = np.iinfo(dtype).max if dtype != "float32" else 1.0
            dst.write(np.where(valid, top, 0).astype(dtype), len(data) + 1)
            from rasterio.enums import ColorInterp

            interp = ([ColorInterp.gray] if len(data) == 1 else
                      [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
                      + [ColorInterp.undefined] * (len(data) - 3))
            dst.colorinterp = [*interp, ColorInterp.alpha]
    return path


def write_osm(scene: Scene, path: str | Path) -> Path:
    """Write the scene's roads and buildings as an OpenStreetMap XML file (``.osm``).

    Loading it with ``osm2pgsql --create`` gives the tables DBAs already have from OSM
    (``planet_osm_line`` with ``highway``, ``planet_osm_polygon`` with ``building``, geometry
    column ``way`` in EPSG:3857), so tutorials and the demo exercise the real osm2pgsql path.
    """
    from xml.sax.saxutils import quoteattr

    path = Path(path)
    roads = json.loads(scene.roads_path.read_text())["features"]
    buildings = json.loads(scene.buildings_path.read_text())["features"]
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             '<osm version="0.6" generator="pggeolearn.synthetic">']
    ways: list[str] = []
    node_id = 0
    for way_id, feat in enumerate(roads + buildings, start=1):
        coords = feat["geometry"]["coordinates"]
        ring = feat["geometry"]["type"] == "Polygon"
        pts = coords[0][:-1] if ring else coords
        refs = []
        for lon, lat in pts:
            node_id += 1
            lines.append(f'  <node id="{node_id}" version="1" lat="{lat:.8f}" lon="{lon:.8f}"/>')
            refs.append(node_id)
        if ring:
            refs.append(refs[0])
        tags = {k: v for k, v in feat["properties"].items()
                if k in ("highway", "name", "building") and v is not None}
        if "levels" in feat["properties"]:
            tags["building:levels"] = feat["properties"]["levels"]
        body = "".join(f'<nd ref="{r}"/>' for r in refs)
        body += "".join(f"<tag k={quoteattr(str(k))} v={quoteattr(str(v))}/>" for k, v in tags.items())
        ways.append(f'  <way id="{way_id}" version="1">{body}</way>')
    lines += ways + ["</osm>", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
