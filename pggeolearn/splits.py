"""Spatial train/val/test splits of a dataset's chips, with a guard band and a leakage check.

Neighbouring tiles look alike (the same roof, the same road cut in two), so a random split per
tile leaks: the model is validated on near-copies of its training chips. Here tiles are grouped
into square **blocks** of ``block_m`` ground metres and whole blocks go to one split:

1. Eligible chips: imagery present and at most ``MAX_NODATA_FRAC`` (0.5) NODATA. Every other
   chip (orphans, empties, mostly-NODATA tiles) gets split ``'excluded'``, never streamed.
2. Blocks: tile centres in a ground-metre frame anchored at the extent's upper-left corner
   (CRS units converted with ``pggeolearn.ground_scale`` at the extent centre, so EPSG:3857
   metres become ground metres), cut into ``block_m`` squares. The default block is 120 m or
   three tiles, whichever is larger (Banepa's 34 m tiles: 120 m blocks; 128 m tiles: 384 m),
   shrunk by 1.5x steps (down to two tiles) until every split gets chips and the guard band
   takes at most ``MAX_GUARD_WASTE`` (20 %) of the usable chips: small areas keep their chips.
   Whatever the block, a guard band above 20 % is reported with a ``--block-m`` that wastes less.
3. Order: blocks sorted by ``sha256("<seed>:<row>:<col>")`` -- deterministic on every machine.
   In that order each block goes to the split (with a ratio > 0) whose tile count is furthest
   below its target ``ratio * eligible tiles``.
4. Guard band: a chip closer than ``guard_m`` ground metres to a chip of another split, or
   overlapping one, is excluded. Priority test > val > train: val chips near test chips and
   then train chips near the remaining val/test chips are excluded, so the small splits keep
   their chips. Distances come from the grid indices (tiles are axis-aligned boxes); a chip at
   exactly ``guard_m`` (a whole number of tiles) stays. The default guard is one tile, which on
   a grid without overlap removes exactly the ring of chips touching another split.
5. Checks: every split with a ratio > 0 must be non-empty, and with ``stratify`` must contain
   every class of the recipe (pixels in a kept chip). Stratification first moves blocks: for
   a split lacking a class, the smallest block holding that class is moved into it from a
   split that keeps the class elsewhere, and the guard is redone (a few moves at most). If
   the checks still fail the assignment is redone with derived seeds (``"<seed>:<attempt>"``,
   up to ``MAX_ATTEMPTS``); the first that passes is kept, else the best, with a warning.
   Deterministic too.

:func:`leakage` is an independent check in SQL over the stored footprints (PostGIS
``ST_DWithin`` on ground-scaled geometries): train chips within ``guard_m`` of a val/test chip.
It is 0 after :func:`assign_splits`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import psycopg

from pggeolearn import datasets, errors
from pggeolearn.db.errors import db_errors
from pggeolearn.resources import sql_text
from pggeolearn.split_defaults import DEFAULT_BLOCK_M, DEFAULT_RATIOS

SPLITS = ("train", "val", "test")
EXCLUDED = "excluded"
MAX_NODATA_FRAC = 0.5
MAX_ATTEMPTS = 64
MAX_GUARD_WASTE = 0.2  # the default block shrinks until the guard band takes at most this
_SHRINK_PY = 1e-7  # relative: Python excludes pairs closer than guard * (1 - 1e-7) ...
_SHRINK_SQL = 1e-6  # ... SQL counts pairs within guard * (1 - 1e-6): a superset is excluded

_NONE, _NODATA, _GUARD = -1, -2, -3  # codes besides 0 train, 1 val, 2 test


@dataclass
class SplitParams:
    """How splits were (or are to be) made; stored in ``datasets.stats["split_params"]``."""

    block_m: float | None = None  # None: max(DEFAULT_BLOCK_M, 3 tiles)
    ratios: tuple[float, float, float] = DEFAULT_RATIOS
    seed: int = 0
    guard_m: float | None = None  # None: one tile
    stratify: bool = False

    def validate(self) -> None:
        if self.block_m is not None and not (isinstance(self.block_m, int | float)
                                             and math.isfinite(self.block_m) and self.block_m > 0):
            raise errors.ConfigError(f"block size must be > 0 ground metres, not {self.block_m!r}")
        if self.guard_m is not None and not (math.isfinite(self.guard_m) and self.guard_m >= 0):
            raise errors.ConfigError(f"guard must be >= 0 ground metres, not {self.guard_m!r}")
        r = tuple(float(v) for v in self.ratios)
        if len(r) != 3 or any(not math.isfinite(v) or v < 0 for v in r) or r[0] <= 0:
            raise errors.ConfigError(
                f"ratios must be three numbers >= 0 (train, val, test) with train > 0, not {self.ratios!r}")
        self.ratios = r  # type: ignore[assignment]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratios"] = list(self.ratios)
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> SplitParams:
        data = dict(data or {})
        known = {k: data[k] for k in ("block_m", "ratios", "seed", "guard_m", "stratify") if k in data}
        if "ratios" in known:
            known["ratios"] = tuple(known["ratios"])
        return cls(**known)


@dataclass
class Grid:
    """What the split needs of a dataset's grid (CRS units unless said otherwise)."""

    ncols: int
    nrows: int
    stride: float  # distance between neighbouring tiles' origins
    size: float  # tile side
    scale: tuple[float, float]  # CRS units per ground metre along x and y

    @property
    def tile_ground_m(self) -> float:
        """A tile's side in ground metres (the shorter, if x and y scales differ)."""
        return self.size / max(self.scale)

    @property
    def default_block_m(self) -> float:
        return max(DEFAULT_BLOCK_M, 3 * self.tile_ground_m)


@dataclass
class SplitReport:
    """Outcome of :func:`assign_splits`; ``str()`` is what the CLI prints."""

    dataset: str
    params: SplitParams
    block_m: float  # effective (ground metres)
    guard_m: float  # effective (ground metres)
    counts: dict[str, int]
    nodata_excluded: int
    guard_excluded: int
    blocks: dict[str, int]
    seed_used: str
    attempts: int
    swaps: int = 0
    missing: dict[str, list[int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    leakage: int | None = None

    def to_json(self) -> dict[str, Any]:
        return self.params.to_json() | {
            "block_m_effective": self.block_m, "guard_m_effective": self.guard_m,
            "blocks": self.blocks,
            "seed_used": self.seed_used, "attempts": self.attempts, "swaps": self.swaps,
            "missing_classes": {k: v for k, v in self.missing.items() if v},
        }

    def __str__(self) -> str:
        p = self.params
        c = self.counts
        lines = [
            f"splits of {self.dataset}: train {c.get('train', 0)} / val {c.get('val', 0)} / "
            f"test {c.get('test', 0)} chips; excluded {c.get(EXCLUDED, 0)} "
            f"({self.nodata_excluded} no imagery or > {MAX_NODATA_FRAC:.0%} NODATA, "
            f"{self.guard_excluded} in guard bands)",
            f"blocks of {self.block_m:g} m: train {self.blocks.get('train', 0)} / val "
            f"{self.blocks.get('val', 0)} / test {self.blocks.get('test', 0)}; ratios "
            f"{','.join(f'{r:g}' for r in p.ratios)}; seed {p.seed}"
            + (f" (used {self.seed_used!r} after {self.attempts} attempts)" if self.attempts > 1 else "")
            + (f", {self.swaps} block(s) moved to stratify" if self.swaps else "")
            + f"; guard {self.guard_m:.1f} m" + ("; stratified" if p.stratify else ""),
        ]
        if self.leakage is not None:
            lines.append(f"leakage check: {self.leakage} train chips within the guard of val/test")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# the assignment itself (no database: unit-testable)


def _block_order(keys: np.ndarray, seed: str) -> np.ndarray:
    """Indices sorting block keys (row, col) by sha256 of "seed:row:col"."""
    h = [int.from_bytes(hashlib.sha256(f"{seed}:{r}:{c}".encode()).digest()[:8], "big")
         for r, c in keys]
    return np.lexsort((keys[:, 1], keys[:, 0], np.array(h, dtype=np.uint64)))


def _neighbour_offsets(grid: Grid, guard_m: float) -> list[tuple[int, int]]:
    """Grid offsets (drow, dcol) of tiles closer than the guard (or overlapping), not (0, 0)."""
    sx, sy = grid.scale
    reach = guard_m * max(sx, sy) + grid.size
    k = int(math.ceil(reach / grid.stride)) + 1
    limit = guard_m * (1 - _SHRINK_PY)
    out = []
    for dr in range(-k, k + 1):
        for dc in range(-k, k + 1):
            if dr == 0 and dc == 0:
                continue
            gx = abs(dc) * grid.stride - grid.size
            gy = abs(dr) * grid.stride - grid.size
            overlap = gx < 0 and gy < 0
            dist = math.hypot(max(gx, 0.0) / sx, max(gy, 0.0) / sy)
            if overlap or (guard_m > 0 and dist < limit):
                out.append((dr, dc))
    return out


def _shifted_any(mask: np.ndarray, offsets: list[tuple[int, int]]) -> np.ndarray:
    """out[r, c] = any(mask[r + dr, c + dc]) over the offsets (outside the grid: False)."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dr, dc in offsets:
        if abs(dr) >= h or abs(dc) >= w:
            continue
        src = mask[max(dr, 0):h + min(dr, 0), max(dc, 0):w + min(dc, 0)]
        out[max(-dr, 0):h + min(-dr, 0), max(-dc, 0):w + min(-dc, 0)] |= src
    return out


class _Planner:
    """Blocks of the eligible tiles and the guard geometry of one grid, reused across seeds."""

    def __init__(self, tile_ids: np.ndarray, eligible: np.ndarray, grid: Grid,
                 params: SplitParams, guard_m: float, block_m: float | None = None):
        self.grid, self.params = grid, params
        self.rows, self.cols = np.divmod(tile_ids, grid.ncols)
        self.idx = np.flatnonzero(eligible)
        self.n = len(tile_ids)
        sx, sy = grid.scale
        cx = (self.cols[self.idx] * grid.stride + grid.size / 2) / sx
        cy = (self.rows[self.idx] * grid.stride + grid.size / 2) / sy
        block = block_m or params.block_m or grid.default_block_m
        brow = np.floor(cy / block).astype(np.int64)
        bcol = np.floor(cx / block).astype(np.int64)
        self.keys, inverse, self.sizes = np.unique(
            np.stack([brow, bcol], 1).reshape(-1, 2), axis=0, return_inverse=True,
            return_counts=True)
        self.inverse = inverse.reshape(-1)  # eligible tile -> block
        self.offsets = _neighbour_offsets(grid, guard_m)

    def assign(self, seed: str) -> np.ndarray:
        """Split per block: in sha256 order, each block to the split furthest below target."""
        ratios = np.asarray(self.params.ratios, dtype=np.float64)
        target = ratios / ratios.sum() * len(self.idx)
        got = np.zeros(3)
        block_split = np.empty(len(self.keys), dtype=np.int8)
        active = np.flatnonzero(ratios > 0)
        self.order = _block_order(self.keys, seed) if len(self.keys) else np.zeros(0, np.int64)
        for b in self.order:
            k = active[int(np.argmax(target[active] - got[active]))]
            block_split[b] = k
            got[k] += self.sizes[b]
        return block_split

    def codes(self, block_split: np.ndarray) -> np.ndarray:
        """Per tile: the block's split, then the guard band (val near test, then train near
        val/test -> excluded)."""
        codes = np.full(self.n, _NODATA, dtype=np.int8)
        codes[self.idx] = block_split[self.inverse]
        if self.offsets:
            board = np.full((self.grid.nrows, self.grid.ncols), _NONE, dtype=np.int8)
            board[self.rows, self.cols] = codes
            for split in (1, 0):
                near = _shifted_any(board > split, self.offsets)
                board[(board == split) & near] = _GUARD
            codes = board[self.rows, self.cols]
        return codes

    def swap(self, block_split: np.ndarray, codes: np.ndarray, present: np.ndarray,
             class_ids: list[int], missing: dict[str, list[int]]) -> bool:
        """Stratification step: move one block holding a missing class into the split that
        lacks it, taken from a split that keeps that class in another block. Smallest block
        first, then the seeded order. False when no such move exists."""
        kept = codes >= 0
        has = np.zeros((len(self.keys), len(class_ids)), dtype=bool)  # block holds class (kept)
        elig_kept = kept[self.idx]
        np.logical_or.at(has, self.inverse[elig_kept], present[self.idx][elig_kept])
        rank = np.empty(len(self.order), dtype=np.int64)
        rank[self.order] = np.arange(len(self.order))
        for k, name in enumerate(SPLITS):
            for cls in missing.get(name, []):
                j = class_ids.index(cls)
                # blocks with the class in any eligible tile (kept or not: a move may free it)
                holder = np.zeros(len(self.keys), dtype=bool)
                np.logical_or.at(holder, self.inverse, present[self.idx, j])
                cands = []
                for b in np.flatnonzero(holder & (block_split != k)):
                    # the split it leaves keeps the class elsewhere, or had it not from b
                    others = (has[:, j] & (block_split == block_split[b])).sum() - has[b, j]
                    if others >= 1 or not has[b, j]:
                        cands.append(b)
                if cands:
                    b = min(cands, key=lambda b: (self.sizes[b], rank[b]))
                    block_split[b] = k
                    return True
        return False


def plan(tile_ids: np.ndarray, eligible: np.ndarray, grid: Grid, params: SplitParams,
         guard_m: float, seed: str) -> np.ndarray:
    """Split codes per tile: 0 train, 1 val, 2 test, -2 excluded (nodata), -3 excluded (guard).

    ``tile_ids`` index the grid (row * ncols + col); ``eligible`` says which may be trained on.
    """
    planner = _Planner(tile_ids, eligible, grid, params, guard_m)
    return planner.codes(planner.assign(seed))


def _check(codes: np.ndarray, params: SplitParams, class_present: np.ndarray,
           class_ids: list[int]) -> tuple[int, dict[str, list[int]], list[str]]:
    """(failures, missing classes per split, empty splits) of an assignment."""
    failures = 0
    missing: dict[str, list[int]] = {}
    empty: list[str] = []
    for k, name in enumerate(SPLITS):
        if params.ratios[k] <= 0:
            continue
        sel = codes == k
        if not sel.any():
            empty.append(name)
            failures += 10  # an empty split is worse than a missing class
            missing[name] = list(class_ids)
            continue
        present = class_present[sel].any(axis=0) if class_present.size else np.zeros(0, bool)
        missing[name] = [c for c, p in zip(class_ids, present, strict=True) if not p]
        if params.stratify:
            failures += len(missing[name])
    return failures, missing, empty


# ------------------------------------------------------------------------------------------
# database side


def grid_of(conn: psycopg.Connection, ds: datasets.Dataset) -> Grid:
    r = ds.recipe
    minx, miny, maxx, maxy = r.extent
    with db_errors("ground scale"):
        scale = conn.execute(
            "SELECT pggeolearn.ground_scale(ST_Centroid(ST_MakeEnvelope(%s, %s, %s, %s, %s)))",
            [minx, miny, maxx, maxy, r.srid]).fetchone()[0]
    return Grid(ncols=ds.ncols, nrows=ds.nrows, stride=(r.tile_px - r.overlap_px) * r.resolution,
                size=r.tile_px * r.resolution, scale=(float(scale[0]), float(scale[1])))


def assign_splits(conn: psycopg.Connection, dataset: str, *, block_m: float | None = None,
                  ratios: tuple[float, float, float] = DEFAULT_RATIOS, seed: int = 0,
                  guard_m: float | None = None, stratify: bool = False) -> SplitReport:
    """Assign every chip of ``dataset`` to train/val/test/excluded (see the module docstring).

    ``block_m`` None means max(120 m, three tiles), shrunk until the guard band wastes at most
    20 % of the usable chips (module docstring); ``guard_m`` None one tile. Stores the
    splits; :func:`pggeolearn.chips.assign_splits` also recomputes the statistics in the same
    transaction (they carry the parameters, so the next ``chips build`` splits the same way).
    """
    params = SplitParams(block_m=block_m, ratios=tuple(ratios), seed=int(seed), guard_m=guard_m,
                         stratify=bool(stratify))
    params.validate()
    ds = datasets.get(conn, dataset)
    dataset = ds.name  # "NAME@N" of the current version N is NAME
    grid = grid_of(conn, ds)
    guard = grid.tile_ground_m if guard_m is None else float(guard_m)
    block = params.block_m or grid.default_block_m
    class_ids = sorted(ds.recipe.classes)
    with db_errors(f"splits of {dataset}"):
        rows = conn.execute(sql_text("chips_split_tiles"),
                            {"dataset": dataset, "max_nodata": MAX_NODATA_FRAC}).fetchall()
    if not rows:
        raise errors.NotBuilt(f"dataset {dataset} has no chips yet (run: pggeolearn chips build {dataset})")
    tile_ids = np.array([r[0] for r in rows], dtype=np.int64)
    eligible = np.array([bool(r[1]) for r in rows])
    present = np.zeros((len(rows), len(class_ids)), dtype=bool)
    for i, (_, _, counts) in enumerate(rows):
        if counts:
            for j, cid in enumerate(class_ids):
                present[i, j] = cid < len(counts) and (counts[cid] or 0) > 0

    n_usable = max(int(eligible.sum()), 1)
    tried: list[tuple[float, int, float]] = []  # (block m, failures, guard waste)

    def attempt_with(b: float) -> tuple[tuple[int, int, np.ndarray, str, int], int]:
        out = _attempts(tile_ids, eligible, grid, params, guard, b, present, class_ids)
        tried.append((b, out[0][0], float((out[0][2] == _GUARD).sum()) / n_usable))
        return out

    if params.block_m:
        best, attempts = attempt_with(block)
    else:  # the default adapts: the largest block with every split filled and <= 20 % waste
        for block in _block_candidates(grid):
            best, attempts = attempt_with(block)
            if tried[-1][1] == 0 and tried[-1][2] <= MAX_GUARD_WASTE:
                break
        else:  # none fits: the fewest failures, then the least waste
            block = min(tried, key=lambda t: (t[1], t[2]))[0]
            best, attempts = attempt_with(block)
    _, best_attempt, codes, seed_used, swaps = best
    failures, missing, empty = _check(codes, params, present, class_ids)

    names = np.array(list(SPLITS) + [EXCLUDED, EXCLUDED], dtype=object)
    labels = names[np.where(codes >= 0, codes, np.where(codes == _NODATA, 3, 4))]
    counts = {name: int((labels == name).sum()) for name in (*SPLITS, EXCLUDED)}
    blocks = _count_blocks(tile_ids, codes, grid, block)
    warnings = []
    waste = float((codes == _GUARD).sum()) / n_usable
    if waste > MAX_GUARD_WASTE:  # say what it costs, and which block size would cost less
        if params.block_m:
            for b in _block_candidates(grid):
                attempt_with(b)
        fits = [t for t in tried if t[1] == 0 and t[2] < waste]
        hint = ""
        if fits:
            b, _, w = max(fits, key=lambda t: t[0])
            hint = f"; --block-m {b:.0f} would exclude {w:.0%}"
        warnings.append(f"the guard band excludes {int((codes == _GUARD).sum())} of "
                        f"{int(eligible.sum())} usable chips ({waste:.0%}) with {block:g} m "
                        f"blocks{hint}")
    if empty:
        warnings.append(f"split(s) {', '.join(empty)} are empty: too few blocks of {block:g} m "
                        f"({int(eligible.sum())} usable chips); try a smaller --block-m or --guard-m")
    if params.stratify:
        for name, miss in missing.items():
            if miss and name not in empty:
                warnings.append(f"{name} has no pixels of class(es) {', '.join(map(str, miss))} "
                                f"after {attempts} seeds")
    report = SplitReport(
        dataset=dataset, params=params, block_m=block, guard_m=guard, counts=counts,
        nodata_excluded=int((codes == _NODATA).sum()), guard_excluded=int((codes == _GUARD).sum()),
        blocks=blocks, seed_used=seed_used, attempts=best_attempt + 1, swaps=swaps,
        missing=missing, warnings=warnings)
    with db_errors(f"splits of {dataset}"), conn.transaction():
        conn.execute(sql_text("chips_set_splits"),
                     {"dataset": dataset, "tile_ids": tile_ids.tolist(), "splits": labels.tolist()})
        report.leakage = leakage(conn, dataset, guard)
    return report


def _block_candidates(grid: Grid) -> list[float]:
    """Block sizes to try, largest first: the default, then / 1.5 each step down to two tiles."""
    out, b = [], grid.default_block_m
    while b >= 2 * grid.tile_ground_m - 1e-9 or not out:
        out.append(b)
        b /= 1.5
    return out


def _attempts(tile_ids: np.ndarray, eligible: np.ndarray, grid: Grid, params: SplitParams,
              guard: float, block: float, present: np.ndarray, class_ids: list[int]
              ) -> tuple[tuple[int, int, np.ndarray, str, int], int]:
    """((failures, attempt, codes, seed used, swaps) of the best seed, seeds tried) with blocks
    of ``block`` m: seeds derived until the checks pass (module docstring, step 5)."""
    planner = _Planner(tile_ids, eligible, grid, params, guard, block)
    max_swaps = min(len(planner.keys), 4 * len(SPLITS) * len(class_ids))
    best: tuple[int, int, np.ndarray, str, int] | None = None
    attempts = 0
    for attempt in range(MAX_ATTEMPTS):
        attempts = attempt + 1
        seed_used = str(params.seed) if attempt == 0 else f"{params.seed}:{attempt}"
        block_split = planner.assign(seed_used)
        swaps = 0
        while True:
            codes = planner.codes(block_split)
            failures, missing, _ = _check(codes, params, present, class_ids)
            if failures == 0 or not params.stratify or swaps >= max_swaps:
                break
            if not planner.swap(block_split, codes, present, class_ids, missing):
                break
            swaps += 1
        if best is None or failures < best[0]:
            best = (failures, attempt, codes, seed_used, swaps)
        if failures == 0 or not eligible.any():
            break
    assert best is not None
    return best, attempts


def _count_blocks(tile_ids: np.ndarray, codes: np.ndarray, grid: Grid,
                  block: float) -> dict[str, int]:
    sx, sy = grid.scale
    rows, cols = np.divmod(tile_ids, grid.ncols)
    brow = np.floor((rows * grid.stride + grid.size / 2) / sy / block).astype(np.int64)
    bcol = np.floor((cols * grid.stride + grid.size / 2) / sx / block).astype(np.int64)
    out = {}
    for k, name in enumerate(SPLITS):
        sel = codes == k
        out[name] = int(len(np.unique(np.stack([brow[sel], bcol[sel]], 1), axis=0))) if sel.any() else 0
    return out


def leakage(conn: psycopg.Connection, dataset: str, guard_m: float | None = None) -> int:
    """Train chips closer than ``guard_m`` ground metres to a val/test chip (or overlapping one).

    ``guard_m`` None: the guard the stored splits were made with, else one tile. Computed in
    SQL from the stored footprints, independently of how :func:`assign_splits` works.
    """
    ds = datasets.get(conn, dataset)
    dataset = ds.name  # "NAME@N" of the current version N is NAME
    grid = grid_of(conn, ds)
    if guard_m is None:
        stored = (ds.stats or {}).get("split_params") or {}
        guard_m = stored.get("guard_m_effective", grid.tile_ground_m)
    if guard_m < 0:
        raise errors.ConfigError(f"guard must be >= 0 ground metres, not {guard_m!r}")
    sx, sy = grid.scale
    params = {"dataset": dataset, "gx": guard_m * sx, "gy": guard_m * sy, "kx": 1.0 / sx,
              "ky": 1.0 / sy, "guard": guard_m * (1 - _SHRINK_SQL),
              "min_area": 1e-6 * grid.size * grid.size}
    with db_errors(f"leakage check of {dataset}"):
        return int(conn.execute(sql_text("chips_leakage"), params).fetchone()[0])
