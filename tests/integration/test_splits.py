"""Spatial splits: deterministic, every split non-empty, guard band, leakage 0 (and leakage
detected when forced), stratification. A 10 x 8 grid of 16 px tiles at 2 m (EPSG:3857)."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import psycopg
import pytest
import shapely

from pggeolearn import chips, datasets, errors, splits, wkb

UL = (9519900.0, 3202900.0)
PX, RES, NCOLS, NROWS = 16, 2.0, 10, 8
SIZE = PX * RES
N_TILES = NCOLS * NROWS
EXTENT = (UL[0], UL[1] - NROWS * SIZE, UL[0] + NCOLS * SIZE, UL[1])
SQUARES = (12, 47, 66)  # tiles with a class-2 square


def tile_ul(t: int, stride: float = SIZE) -> tuple[float, float]:
    r, c = divmod(t, NCOLS)
    return UL[0] + c * stride, UL[1] - r * stride


def make_data(conn: psycopg.Connection, overlap_px: int = 0) -> None:
    """public.img: one raster per grid tile (the image SQL picks the one at the tile's corner,
    so image_tile takes its exact-fit path); public.shapes: class 1 over the left half, class 2
    small squares in three tiles."""
    rng = np.random.default_rng(1)
    stride = (PX - overlap_px) * RES
    conn.execute("CREATE TABLE IF NOT EXISTS public.img (tile_id int, ds text, rast raster)")
    for t in range(N_TILES):
        x0, y0 = tile_ul(t, stride)
        data = rng.integers(1, 256, (3, PX, PX), dtype=np.uint8)
        tile = wkb.from_array(data, geotransform=(x0, RES, 0.0, y0, 0.0, -RES), srid=3857)
        conn.execute("INSERT INTO public.img VALUES (%s, %s, ST_RastFromWKB(%b))",
                     [t, f"ovl{overlap_px}", wkb.encode(tile)])
    conn.execute("CREATE TABLE IF NOT EXISTS public.shapes (class_id int, geom geometry(Polygon, 3857))")
    conn.execute("INSERT INTO public.shapes VALUES (1, ST_MakeEnvelope(%s, %s, %s, %s, 3857))",
                 [EXTENT[0], EXTENT[1], (EXTENT[0] + EXTENT[2]) / 2, EXTENT[3]])
    for t in SQUARES:
        x0, y0 = tile_ul(t, stride)
        conn.execute("INSERT INTO public.shapes VALUES (2, ST_MakeEnvelope(%s, %s, %s, %s, 3857))",
                     [x0 + 8, y0 - 20, x0 + 20, y0 - 8])


def make_dataset(conn, name="grid", overlap_px=0) -> datasets.Dataset:
    extent = EXTENT
    if overlap_px:  # same number of tiles: the stride shrinks
        stride = (PX - overlap_px) * RES
        extent = (UL[0], UL[1] - (SIZE + (NROWS - 1) * stride), UL[0] + SIZE + (NCOLS - 1) * stride, UL[1])
    return datasets.create(conn, datasets.Recipe(
        name=name, srid=3857, resolution=RES, tile_px=PX, overlap_px=overlap_px, extent=extent,
        image_sql=f"SELECT rast FROM public.img WHERE ds = 'ovl{overlap_px}' "
                  "AND abs(ST_UpperLeftX(rast) - ST_XMin(tile_geom)) < 0.01 "
                  "AND abs(ST_UpperLeftY(rast) - ST_YMax(tile_geom)) < 0.01",
        label_sql="SELECT geom, class_id FROM public.shapes WHERE geom && tile_geom",
        classes={1: "left", 2: "square"}))


@pytest.fixture
def built(conn):
    make_data(conn)
    make_dataset(conn)
    chips.build(conn, "grid", progress=False)
    return conn


def splits_of(conn, name="grid") -> dict[int, str]:
    return dict(conn.execute("SELECT tile_id, split FROM pggeolearn.chips WHERE dataset = %s",
                             [name]).fetchall())


def brute_force_leakage(conn, name: str, guard_m: float) -> int:
    """Train chips within guard_m ground metres of a val/test chip, by shapely on the stored
    footprints scaled to ground metres (independent of both implementations)."""
    ds = datasets.get(conn, name)
    kx, ky = splits.grid_of(conn, ds).scale
    rows = conn.execute("SELECT tile_id, split, ST_AsBinary(geom) FROM pggeolearn.chips "
                        "WHERE dataset = %s", [name]).fetchall()
    geoms = {t: shapely.affinity.scale(shapely.from_wkb(bytes(g)), 1 / kx, 1 / ky, origin=(0, 0))
             for t, _, g in rows}
    train = [t for t, s, _ in rows if s == "train"]
    other = [t for t, s, _ in rows if s in ("val", "test")]
    leaks = 0
    for a in train:
        for b in other:
            ga, gb = geoms[a], geoms[b]
            if ga.distance(gb) < guard_m * (1 - 1e-6) or ga.intersection(gb).area > 1e-3:
                leaks += 1
                break
    return leaks


def test_splits_are_deterministic_nonempty_and_leak_free(built):
    conn = built
    report = chips.assign_splits(conn, "grid", block_m=60, seed=0)
    first = splits_of(conn)
    assert all(report.counts[k] > 0 for k in ("train", "val", "test"))
    assert report.guard_excluded > 0 and report.leakage == 0
    assert chips.leakage(conn, "grid") == 0
    assert brute_force_leakage(conn, "grid", report.guard_m) == 0
    assert report.guard_m == pytest.approx(SIZE / max(splits.grid_of(conn, datasets.get(conn, "grid")).scale))
    again = chips.assign_splits(conn, "grid", block_m=60, seed=0)
    assert splits_of(conn) == first and again.counts == report.counts
    chips.assign_splits(conn, "grid", block_m=60, seed=1)
    assert splits_of(conn) != first
    stats = datasets.get(conn, "grid").stats
    assert stats["split_params"]["seed"] == 1 and stats["leakage"] == 0
    assert stats["splits"] == {**{k: sum(1 for v in splits_of(conn).values() if v == k)
                                  for k in ("train", "val", "test", "excluded")}, "unassigned": 0}


def test_build_keeps_the_stored_split_parameters(built):
    conn = built
    chips.assign_splits(conn, "grid", block_m=50, ratios=(0.6, 0.2, 0.2), seed=7, guard_m=5)
    chosen = splits_of(conn)
    report = chips.build(conn, "grid", progress=False, force=True)
    assert report.splits.params.seed == 7 and report.splits.params.block_m == 50
    assert splits_of(conn) == chosen


def test_leakage_detects_a_forced_bad_assignment(built):
    conn = built
    chips.assign_splits(conn, "grid", block_m=60)
    centre = 4 * NCOLS + 5
    conn.execute("UPDATE pggeolearn.chips SET split = 'train'")
    conn.execute("UPDATE pggeolearn.chips SET split = 'val' WHERE tile_id = %s", [centre])
    tile_m = SIZE / max(splits.grid_of(conn, datasets.get(conn, "grid")).scale)
    assert chips.leakage(conn, "grid", tile_m) == 8  # the touching ring
    assert chips.leakage(conn, "grid", 0) == 0  # touching is not overlapping
    assert chips.leakage(conn, "grid", 2.5 * tile_m) == brute_force_leakage(conn, "grid", 2.5 * tile_m) == 44
    conn.execute("UPDATE pggeolearn.chips SET split = 'test' WHERE tile_id = 0")
    assert chips.leakage(conn, "grid", tile_m) == 8 + 3


def test_overlapping_tiles_always_leak(conn):
    make_data(conn, overlap_px=4)
    make_dataset(conn, "ovl", overlap_px=4)
    report = chips.build(conn, "ovl", progress=False)
    assert report.stats["leakage"] == 0 and chips.leakage(conn, "ovl", 0) == 0
    assert brute_force_leakage(conn, "ovl", report.splits.guard_m) == 0
    centre = 4 * NCOLS + 5
    conn.execute("UPDATE pggeolearn.chips SET split = 'train'")
    conn.execute("UPDATE pggeolearn.chips SET split = 'test' WHERE tile_id = %s", [centre])
    assert chips.leakage(conn, "ovl", 0) == 8


def test_stratify_puts_every_class_in_every_split(built):
    conn = built
    plain = None
    for seed in range(30):  # a seed whose plain assignment leaves some split without squares
        r = chips.assign_splits(conn, "grid", block_m=40, seed=seed, guard_m=1)
        if any(2 in r.missing[k] for k in ("train", "val", "test")):
            plain = seed
            break
    assert plain is not None
    strat = chips.assign_splits(conn, "grid", block_m=40, seed=plain, guard_m=1, stratify=True)
    assert strat.attempts > 1 or strat.swaps > 0  # it had to work for it
    assert strat.seed_used == (str(plain) if strat.attempts == 1 else f"{plain}:{strat.attempts - 1}")
    assert all(not strat.missing[k] for k in ("train", "val", "test")), strat.missing
    rows = conn.execute("SELECT split, sum(class_counts[3]) FROM pggeolearn.chips "
                        "GROUP BY split").fetchall()
    assert all(n > 0 for s, n in rows if s != "excluded")
    assert chips.leakage(conn, "grid") == 0
    again = chips.assign_splits(conn, "grid", block_m=40, seed=plain, guard_m=1, stratify=True)
    assert again.seed_used == strat.seed_used


def test_too_few_blocks_warn_and_bad_parameters_fail(built):
    conn = built
    report = chips.assign_splits(conn, "grid", block_m=10_000)
    assert report.counts["train"] == 80 - 0 and report.counts["val"] == 0
    assert any("empty" in w for w in report.warnings)
    for kwargs in ({"block_m": 0}, {"ratios": (0.5, -0.1, 0.6)}, {"ratios": (0, 0.5, 0.5)},
                   {"guard_m": -1}, {"ratios": (0.7, 0.3)}):
        with pytest.raises(errors.ConfigError):
            chips.assign_splits(conn, "grid", **kwargs)
    with pytest.raises(errors.DatasetNotFound):
        chips.assign_splits(conn, "nope")


def test_no_chips_is_not_built(conn):
    make_data(conn)
    make_dataset(conn)
    with pytest.raises(errors.NotBuilt):
        chips.assign_splits(conn, "grid")


def test_plan_is_a_stable_function_of_its_inputs():
    """The same inputs give the same codes on every machine (sha256 block order)."""
    g = splits.Grid(ncols=10, nrows=8, stride=32.0, size=32.0, scale=(1.13, 1.13))
    ids = np.arange(80)
    eligible = np.ones(80, bool)
    eligible[[0, 1, 79]] = False
    codes = splits.plan(ids, eligible, g, splits.SplitParams(block_m=60), 28.0, "0")
    assert hashlib.sha256(codes.tobytes()).hexdigest()[:16] == "cd37c51547d191f0"
    assert set(codes[[0, 1, 79]]) == {-2}
    # no kept pair of different splits is closer than the guard
    rows, cols = np.divmod(ids, 10)
    kept = np.flatnonzero(codes >= 0)
    for a in kept:
        for b in kept:
            if codes[a] != codes[b]:
                gx = max(0.0, abs(cols[a] - cols[b]) * 32.0 - 32.0) / 1.13
                gy = max(0.0, abs(rows[a] - rows[b]) * 32.0 - 32.0) / 1.13
                assert math.hypot(gx, gy) >= 28.0 * (1 - 1e-6)


def test_default_blocks_adapt_to_a_small_area(built):
    conn = built
    rep = splits.assign_splits(conn, "grid")  # default block: adapted to the 10 x 8 tiles
    usable = N_TILES - rep.nodata_excluded
    assert all(rep.counts[s] > 0 for s in splits.SPLITS)
    assert rep.guard_excluded <= splits.MAX_GUARD_WASTE * usable
    assert not any("guard band excludes" in w for w in rep.warnings)
    # a block too large for the area: the waste is reported, with a block size that wastes less
    big = splits.assign_splits(conn, "grid", block_m=200)
    assert big.guard_excluded > splits.MAX_GUARD_WASTE * usable  # 17 of 80 with this seed
    msg = next(w for w in big.warnings if "guard band excludes" in w)
    assert f"{big.guard_excluded} of {usable} usable chips" in msg
    assert f"--block-m {rep.block_m:.0f} would exclude" in msg
