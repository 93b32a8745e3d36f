"""GeoStream against a real chip store: order, sharding, batches, augmentation, live mode.

The chips are written here (not by pggeolearn.chips) from WKB encoded with pggeolearn.wkb,
with content that names the tile: band 1 = tile id, band 3 = a per-pixel pattern (0..255
over a 16 x 16 tile) and the label = pattern % 3. So every delivered sample can be checked
against its tile id, and a joint augmentation must keep label == image[2] % 3.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import psycopg
import pytest
from click.testing import CliRunner
from conftest import USER, _clone, _drop, _with_dbname, as_role
from PIL import Image

from pggeolearn import datasets, errors, wkb
from pggeolearn.stream import (
    BATCH_KEYS,
    GeoStream,
    aug_code,
    dihedral,
    epoch_batches,
    epoch_order,
    normalize,
    shard_index,
)

NCOLS, NROWS = 7, 6  # 42 grid tiles
BIG_PX = 128  # 64 KiB per chip: 37 chips are more than the socket buffers hold
N_TRAIN, N_VAL, N_TEST = 37, 3, 2  # 37 is not divisible by the batch size 8


# ------------------------------------------------------------------------- fixture data


def tile_pattern(px: int) -> np.ndarray:
    """(px, px) uint8, different in every pixel of a 16 x 16 tile and not symmetric."""
    y, x = np.mgrid[0:px, 0:px]
    return ((y * px + x) % 256).astype(np.uint8)


def tile_arrays(tile_id: int, px: int) -> tuple[np.ndarray, np.ndarray]:
    """The image (3, px, px) and label (px, px) stored for ``tile_id``."""
    pat = tile_pattern(px)
    image = np.stack([np.full((px, px), tile_id % 256, np.uint8),
                      np.full((px, px), tile_id // 256, np.uint8), pat])
    return image, (pat % 3).astype(np.uint8)


def tile_geotransform(tile_id: int, px: int, nrows: int = NROWS, ncols: int = NCOLS):
    r, c = divmod(tile_id, ncols)
    return (float(c * px), 1.0, 0.0, float((nrows - r) * px), 0.0, -1.0)


def make_chip_dataset(conn: psycopg.Connection, name: str = "tiny", *, px: int = 16,
                      splits: dict[str, int] | None = None, stats: bool = True) -> datasets.Dataset:
    """A dataset (recipe created through pggeolearn.datasets) on a 7 x 6 grid of ``px`` tiles,
    with imagery + one polygon for live mode, and chips written directly into the store:
    tiles 0..36 train, 37..39 val, 40..41 test (by default)."""
    splits = {"train": N_TRAIN, "val": N_VAL, "test": N_TEST} if splits is None else splits
    width, height = NCOLS * px, NROWS * px
    img_table, poly_table = f"img_{name}", f"poly_{name}"
    # imagery on the grid, one raster per tile (as an import tiled like the grid leaves it),
    # each with the same content as its chip
    rasters = [wkb.encode(wkb.from_array(tile_arrays(t, px)[0], geotransform=tile_geotransform(t, px),
                                         srid=3857)) for t in range(NCOLS * NROWS)]
    conn.execute(f"CREATE TABLE public.{img_table} (rid serial PRIMARY KEY, rast raster)")
    conn.execute(f"INSERT INTO public.{img_table} (rast) SELECT ST_RastFromWKB(b) "
                 "FROM unnest(%s::bytea[]) AS b", [rasters])
    conn.execute(f"CREATE TABLE public.{poly_table} (id serial, geom geometry(Polygon, 3857), cls int)")
    conn.execute(f"INSERT INTO public.{poly_table} (geom, cls) VALUES "
                 "(ST_MakeEnvelope(0, 0, %s, %s, 3857), 1)", [width / 2, height])
    recipe = datasets.Recipe(
        name=name, srid=3857, resolution=1.0, tile_px=px,
        extent=(0.0, 0.0, float(width), float(height)),
        image_sql=f"SELECT rast FROM public.{img_table} WHERE ST_Intersects(rast, tile_geom)",
        label_sql=f"SELECT geom, cls AS class_id FROM public.{poly_table} WHERE geom && tile_geom",
        classes={1: "left", 2: "unused"})
    ds = datasets.create(conn, recipe)
    insert_chips(conn, ds, splits, px)
    if stats:
        train = np.stack([tile_arrays(t, px)[0] for t in range(splits.get("train", 0))]) \
            if splits.get("train") else np.zeros((1, 3, px, px))
        bands = [{"mean": float(b.mean()), "std": float(b.std()) or 1.0,
                  "min": float(b.min()), "max": float(b.max())}
                 for b in np.moveaxis(train, 1, 0).astype(np.float64)]
        conn.execute("UPDATE pggeolearn.datasets SET stats = %s WHERE name = %s",
                     [json.dumps({"bands": bands}), name])
    return datasets.get(conn, name)


def insert_chips(conn: psycopg.Connection, ds: datasets.Dataset, splits: dict[str, int],
                 px: int) -> None:
    tiles, images, labels, names = [], [], [], []
    t = 0
    for split, count in splits.items():
        for _ in range(count):
            image, label = tile_arrays(t, px)
            gt = tile_geotransform(t, px)
            tiles.append(t)
            images.append(wkb.encode(wkb.from_array(image, geotransform=gt, srid=3857)))
            labels.append(wkb.encode(wkb.from_array(label, geotransform=gt, srid=3857)))
            names.append(split)
            t += 1
    conn.execute(
        "INSERT INTO pggeolearn.chips (dataset, tile_id, geom, image, label, split, recipe_hash) "
        "SELECT %s, u.t, ST_Envelope(ST_RastFromWKB(u.l)), ST_RastFromWKB(u.i), "
        "ST_RastFromWKB(u.l), u.s, %s "
        "FROM unnest(%s::int[], %s::bytea[], %s::bytea[], %s::text[]) AS u(t, i, l, s)",
        [ds.name, ds.recipe_hash, tiles, images, labels, names])


def check_content(batch: dict, px: int = 16, augmented: bool = False) -> None:
    """Every sample of the batch is the chip its tile_id names."""
    for i, t in enumerate(batch["tile_id"]):
        image, label = batch["image"][i], batch["label"][i]
        assert (image[0] == t % 256).all() and (image[1] == t // 256).all(), f"tile {t}"
        assert (label == image[2] % 3).all(), f"tile {t}: label and image disagree"
        if not augmented:
            want_image, want_label = tile_arrays(int(t), px)
            assert np.array_equal(image, want_image) and np.array_equal(label, want_label)


def delivered(batches: list[dict]) -> list[int]:
    """Tile ids of real (not padded) samples, in delivery order."""
    out: list[int] = []
    for b in batches:
        n = len(b["tile_id"]) - b["pad"]
        out += [int(t) for t in b["tile_id"][:n]]
    return out


@pytest.fixture(scope="session")
def chips_template_dsn(pg_admin_dsn, template_dsn) -> str:
    """A template database holding datasets ``tiny`` (16 px chips) and ``big`` (128 px chips,
    no statistics), built once; every test gets its own clone (see ``chips_dsn``)."""
    name = _clone(pg_admin_dsn, template_dsn)
    dsn = _with_dbname(pg_admin_dsn, name)
    with psycopg.connect(as_role(dsn, USER), autocommit=True) as c:  # the non-superuser pipeline role
        make_chip_dataset(c, "tiny")
        make_chip_dataset(c, "big", px=BIG_PX, stats=False)
    yield dsn
    _drop(pg_admin_dsn, name)


@pytest.fixture
def chips_dsn(pg_admin_dsn, chips_template_dsn) -> str:
    name = _clone(pg_admin_dsn, chips_template_dsn)
    yield as_role(_with_dbname(pg_admin_dsn, name), USER)
    _drop(pg_admin_dsn, name)


@pytest.fixture
def conn(chips_dsn) -> psycopg.Connection:
    """An autocommit connection to this test's clone of the chip databases."""
    with psycopg.connect(chips_dsn, autocommit=True) as connection:
        yield connection


@pytest.fixture
def tiny(chips_dsn, conn) -> tuple[str, datasets.Dataset]:
    return chips_dsn, datasets.get(conn, "tiny")


@pytest.fixture
def big(chips_dsn, conn) -> tuple[str, datasets.Dataset]:
    return chips_dsn, datasets.get(conn, "big")


# ------------------------------------------------------------------------- the pure rule


@pytest.mark.parametrize("last_batch", ["pad", "discard"])
def test_rule_exactly_once_for_every_combination(last_batch):
    ids = np.arange(100, 137)  # 37 ids
    for parts, workers, batch in itertools.product([1, 2, 3, 4], [0, 1, 2, 3], [8, 5, 1]):
        for epoch in (0, 1):
            got: list[int] = []
            world = parts * max(1, workers)
            for part in range(parts):
                for worker in range(max(1, workers)):
                    shard, w = shard_index(parts, part, workers, worker)
                    assert w == world
                    mine = epoch_order(ids, seed=3, epoch=epoch)[shard::world]
                    b_ids, pads = epoch_batches(ids, epoch=epoch, batch_size=batch, seed=3,
                                                shard=shard, world=world, last_batch=last_batch)
                    assert b_ids.shape == (len(pads), batch)
                    assert (pads[:-1] == 0).all()  # padding only in the final batch
                    real = [t for row, p in zip(b_ids, pads, strict=True) for t in row[:batch - p]]
                    if last_batch == "pad":
                        assert real == mine.tolist()  # the shard's list, in order
                        if len(pads) and pads[-1]:  # pads repeat the shard's first samples
                            assert b_ids[-1, batch - pads[-1]:].tolist() == \
                                np.resize(mine, pads[-1]).tolist()
                    else:
                        assert real == mine[: len(mine) // batch * batch].tolist()
                    got += real
            combo = (parts, workers, batch, epoch)
            if last_batch == "pad":
                assert sorted(got) == ids.tolist(), combo  # exactly once over all shards
            else:
                assert len(got) == len(set(got)), combo


def test_rule_shuffle_is_seeded_by_seed_and_epoch():
    ids = np.arange(37)
    a = epoch_order(ids, seed=1, epoch=0)
    assert np.array_equal(a, epoch_order(ids, seed=1, epoch=0))
    assert not np.array_equal(a, epoch_order(ids, seed=1, epoch=1))
    assert not np.array_equal(a, epoch_order(ids, seed=2, epoch=0))
    assert sorted(a.tolist()) == ids.tolist()
    assert np.array_equal(epoch_order(ids, shuffle=False, epoch=5), ids)


def test_rule_rollover_carries_leftovers_into_the_next_epoch():
    ids = np.arange(37)
    for world, batch in [(1, 8), (2, 8), (3, 5), (1, 50)]:
        for shard in range(world):
            stream: list[int] = []
            for e in range(6):
                stream += epoch_order(ids, seed=0, epoch=e)[shard::world].tolist()
            got: list[int] = []
            for e in range(5):
                b_ids, pads = epoch_batches(ids, epoch=e, batch_size=batch, shard=shard,
                                            world=world, last_batch="rollover")
                assert (pads == 0).all() and b_ids.shape[1] == batch
                got += b_ids.reshape(-1).tolist()
            n = len(ids[shard::world])
            assert got == stream[: (5 * n) // batch * batch]


def test_rule_rejects_bad_shards():
    with pytest.raises(errors.ConfigError):
        shard_index(2, 2, 1, 0)
    with pytest.raises(errors.ConfigError):
        shard_index(1, 0, 2, 2)
    with pytest.raises(errors.ConfigError):
        epoch_batches(np.arange(3), epoch=0, batch_size=2, last_batch="keep")


def test_dihedral_covers_the_eight_symmetries():
    a = tile_pattern(16)
    outs = {dihedral(a, k).tobytes() for k in range(8)}
    assert len(outs) == 8
    assert np.array_equal(dihedral(a, 0), a)
    rect = np.arange(12).reshape(3, 4)
    assert all(dihedral(rect, k).shape == (3, 4) for k in range(8))


# ------------------------------------------------------------------------- real streams


@pytest.mark.parametrize("parts,workers", [(1, 0), (2, 3), (3, 2), (4, 1)])
def test_streams_deliver_every_chip_exactly_once(tiny, parts, workers):
    dsn, ds = tiny
    ids = np.arange(N_TRAIN)
    got: list[int] = []
    for part in range(parts):
        for worker in range(max(1, workers)):
            s = GeoStream(dsn, ds.name, batch_size=8, seed=5, epoch=2, num_parts=parts,
                          part_index=part, num_workers=workers, worker_id=worker, chunk_size=7)
            batches = list(s)
            for b in batches:
                check_content(b)
            plan, pads = s.plan(2)
            assert [b["tile_id"].tolist() for b in batches] == plan.tolist()
            assert [b["pad"] for b in batches] == pads.tolist()
            got += delivered(batches)
    assert sorted(got) == ids.tolist()


def test_batch_layout_and_tile_info(tiny):
    dsn, ds = tiny
    s = GeoStream(dsn, ds.name, batch_size=8, shuffle=False)
    assert len(s) == 5 and s.num_samples == N_TRAIN
    assert s.image_shape == (3, 16, 16) and s.image_dtype == np.uint8
    batches = list(s)
    assert len(batches) == 5
    for b in batches:
        assert tuple(b) == BATCH_KEYS
        assert b["image"].shape == (8, 3, 16, 16) and b["image"].dtype == np.uint8
        assert b["label"].shape == (8, 16, 16) and b["label"].dtype == np.uint8
        assert b["tile_id"].dtype == np.int64 and b["transform"].shape == (8, 6)
        info = s.tile_info(b["tile_id"])
        for i, t in enumerate(b["tile_id"]):
            assert tuple(b["transform"][i]) == info[int(t)].transform == tile_geotransform(int(t), 16)
            assert b["srid"][i] == info[int(t)].srid == 3857
    assert [b["pad"] for b in batches] == [0, 0, 0, 0, 3]
    assert batches[-1]["tile_id"].tolist() == [32, 33, 34, 35, 36, 0, 1, 2]
    assert s.tile_info([8])[8].bounds == (16.0, 64.0, 32.0, 80.0)


def test_epochs_shuffle_deterministically_and_advance(tiny):
    dsn, ds = tiny
    s = GeoStream(dsn, ds.name, batch_size=8, seed=11)
    first = delivered(list(s))
    assert s.epoch == 1
    second = delivered(list(s))
    assert s.epoch == 2
    assert sorted(first) == sorted(second) == list(range(N_TRAIN))
    assert first != second
    again = GeoStream(dsn, ds.name, batch_size=8, seed=11)
    assert delivered(list(again)) == first
    assert delivered(list(again.iter_epoch(1))) == second
    assert again.epoch == 1  # iter_epoch leaves the epoch alone


def test_cursor_transport_matches_copy(tiny):
    dsn, ds = tiny
    kw = dict(batch_size=6, seed=2, epoch=4, split="all")
    copy = list(GeoStream(dsn, ds.name, transport="copy", **kw))
    cursor = list(GeoStream(dsn, ds.name, transport="cursor", fetch_bytes=2000, chunk_size=10, **kw))
    assert len(copy) == len(cursor) == 7
    for a, b in zip(copy, cursor, strict=True):
        for key in BATCH_KEYS:
            assert np.array_equal(a[key], b[key])
        check_content(b)
    assert sorted(delivered(copy)) == list(range(N_TRAIN + N_VAL + N_TEST))


@pytest.mark.parametrize("transport", ["copy", "cursor"])
def test_parallel_connections_keep_the_order(tiny, conn, transport):
    dsn, ds = tiny
    kw = dict(batch_size=8, seed=6, split="all", transport=transport)
    one = list(GeoStream(dsn, ds.name, **kw))
    s = GeoStream(dsn, ds.name, connections=3, fetch_bytes=3 * 1000, **kw)  # groups of 3 chips
    three = list(s)
    assert [b["tile_id"].tolist() for b in three] == [b["tile_id"].tolist() for b in one]
    for a, b in zip(one, three, strict=True):
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
        check_content(b)


def test_last_batch_discard_and_rollover(tiny):
    dsn, ds = tiny
    discard = list(GeoStream(dsn, ds.name, batch_size=8, last_batch="discard"))
    assert len(discard) == 4 and all(b["pad"] == 0 for b in discard)
    roll = GeoStream(dsn, ds.name, batch_size=8, last_batch="rollover", seed=1)
    e0, e1 = list(roll), list(roll)
    assert [len(e0), len(e1)] == [4, 5]  # 37 -> 32 + 5 left; 5 + 37 = 42 -> 40 + 2 left
    leftover = epoch_order(np.arange(N_TRAIN), seed=1, epoch=0)[32:].tolist()
    assert e1[0]["tile_id"][:5].tolist() == leftover
    for b in e0 + e1:
        check_content(b)


def test_val_and_test_splits(tiny):
    dsn, ds = tiny
    assert sorted(delivered(list(GeoStream(dsn, ds.name, split="val", batch_size=2)))) == [37, 38, 39]
    assert sorted(delivered(list(GeoStream(dsn, ds.name, split="test", batch_size=4)))) == [40, 41]


def test_joint_augmentation_is_seeded_per_tile(tiny):
    dsn, ds = tiny
    kw = dict(batch_size=8, seed=4, epoch=3, split="all")
    plain = list(GeoStream(dsn, ds.name, **kw))
    aug = list(GeoStream(dsn, ds.name, augment=True, **kw))
    codes = set()
    for p, a in zip(plain, aug, strict=True):
        assert np.array_equal(p["tile_id"], a["tile_id"])
        check_content(a, augmented=True)
        for i, t in enumerate(a["tile_id"]):
            code = aug_code(4, 3, int(t))
            codes.add(code)
            assert np.array_equal(a["image"][i], dihedral(p["image"][i], code))
            assert np.array_equal(a["label"][i], dihedral(p["label"][i], code))
    assert len(codes) == 8  # all flips/rotations occur over 42 tiles
    again = list(GeoStream(dsn, ds.name, augment=True, **kw))
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(aug, again, strict=True))
    other_epoch = list(GeoStream(dsn, ds.name, augment=True, **{**kw, "shuffle": False}))
    assert other_epoch  # same tiles, other order: still consistent
    for b in other_epoch:
        check_content(b, augmented=True)


def test_normalization(tiny, conn):
    dsn, ds = tiny
    s = GeoStream(dsn, ds.name, batch_size=8)
    bands = ds.stats["bands"]
    assert np.allclose(s.mean, [b["mean"] for b in bands]) and np.allclose(s.std, [b["std"] for b in bands])
    assert s.normalization == {"mean": s.mean.tolist(), "std": s.std.tolist()}
    raw = next(iter(s))
    f = GeoStream(dsn, ds.name, batch_size=8, dtype="float32")
    flt = next(iter(f))
    assert flt["image"].dtype == np.float32
    want = (raw["image"].astype(np.float32) - s.mean[:, None, None]) / s.std[:, None, None]
    assert np.allclose(flt["image"], want, atol=1e-5)
    assert np.allclose(s.normalize(raw["image"]), want, atol=1e-5)
    assert raw["image"].dtype == np.uint8  # normalize() does not touch the batch

    e = GeoStream(dsn, ds.name, normalize=([10, 20, 30], [2, 4, 8]))
    assert e.mean.tolist() == [10, 20, 30]
    assert GeoStream(dsn, ds.name, normalize=False).mean is None
    with pytest.raises(errors.ConfigError, match="3 means"):
        GeoStream(dsn, ds.name, normalize=([1, 2], [1, 2]))
    conn.execute("UPDATE pggeolearn.datasets SET stats = NULL")
    assert GeoStream(dsn, ds.name).mean is None  # default: stats when there are some
    with pytest.raises(errors.ConfigError, match="no band statistics"):
        GeoStream(dsn, ds.name, normalize=True)
    assert np.array_equal(normalize(raw["image"], None, None), raw["image"].astype(np.float32))


def test_max_batches(tiny):
    dsn, ds = tiny
    s = GeoStream(dsn, ds.name, batch_size=4, max_batches=3)
    assert len(s) == 3 and len(list(s)) == 3


def test_clear_errors(tiny, conn):
    dsn, ds = tiny
    with pytest.raises(errors.DatasetNotFound, match="nope"):
        GeoStream(dsn, "nope")
    with pytest.raises(errors.ConfigError, match="unknown split 'training'"):
        GeoStream(dsn, ds.name, split="training")
    with pytest.raises(errors.NotBuilt, match="no chips in this split .*train 37"):
        GeoStream(dsn, ds.name, split="excluded")
    with pytest.raises(errors.ConfigError):
        GeoStream(dsn, ds.name, transport="http")
    with pytest.raises(errors.ConfigError):
        GeoStream(dsn, ds.name, num_parts=2, part_index=2)
    conn.execute("UPDATE pggeolearn.chips SET recipe_hash = 'older' WHERE tile_id IN (3, 4)")
    with pytest.raises(errors.NotBuilt, match="2 chip.* of split train were built from an older recipe"):
        GeoStream(dsn, ds.name)
    conn.execute("DELETE FROM pggeolearn.chips")
    with pytest.raises(errors.NotBuilt, match="no chips yet"):
        GeoStream(dsn, ds.name)


# ------------------------------------------------------------------------- live mode


def test_live_mode_reads_the_recipe_exactly_once(tiny, conn):
    dsn, ds = tiny
    conn.execute("DELETE FROM pggeolearn.chips")  # no chip store needed
    got: list[int] = []
    for part in range(2):
        s = GeoStream.live(dsn, ds.name, batch_size=8, connections=2, seed=9, num_parts=2,
                           part_index=part)
        assert s.image_shape == (3, 16, 16) and len(s.ids) == NCOLS * NROWS
        batches = list(s)
        assert [b["tile_id"].tolist() for b in batches] == s.plan(0)[0].tolist()
        for b in batches:
            for i, t in enumerate(b["tile_id"]):
                image, _ = tile_arrays(int(t), 16)
                assert np.array_equal(b["image"][i], image), f"tile {t}"
                col = int(t) % NCOLS
                # the polygon covers the left 3.5 columns of tiles: class 1 there
                want = 1 if col < 3 else (0 if col > 3 else None)
                if want is not None:
                    assert (b["label"][i] == want).all(), f"tile {t}"
                else:
                    assert (b["label"][i][:, :8] == 1).all() and (b["label"][i][:, 8:] == 0).all()
        got += delivered(batches)
    assert sorted(got) == list(range(NCOLS * NROWS))
    with pytest.raises(errors.ConfigError, match="live mode"):
        GeoStream.live(dsn, ds.name, split="train")


# ------------------------------------------------------------------------- show-batch


def test_show_batch_writes_a_png(tiny, tmp_path):
    from pggeolearn.cli.main import cli

    dsn, ds = tiny
    out = tmp_path / "batch.png"
    result = CliRunner().invoke(cli, ["--dsn", dsn, "show-batch", ds.name, "--split", "train",
                                      "--out", str(out), "--augment", "--n", "8"])
    assert result.exit_code == 0, result.output
    assert "left" in result.output
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        # 16 px tiles drawn 8x (>= 128 px) in 4 columns x 2 rows with 4 px gaps
        assert img.size == (4 * 128 + 5 * 4, 2 * 128 + 3 * 4)
        pixels = np.asarray(img)
    cell = pixels[4:132, 4:132]
    assert len(np.unique(cell.reshape(-1, 3), axis=0)) > 3  # a picture, not a flat fill

    small = tmp_path / "val.png"
    result = CliRunner().invoke(cli, ["--dsn", dsn, "show-batch", ds.name, "--split", "val",
                                      "--out", str(small), "--n", "8"])
    assert result.exit_code == 0, result.output
    with Image.open(small) as img:
        assert img.size == (3 * 128 + 4 * 4, 128 + 2 * 4)  # only the 3 val chips


def test_show_batch_unknown_dataset_is_one_line(tiny, tmp_path):
    dsn, _ = tiny
    proc = subprocess.run([sys.executable, "-m", "pggeolearn", "--dsn", dsn, "show-batch", "nope",
                           "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: unknown dataset 'nope'")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_stream_import_is_numpy_and_psycopg_only():
    code = ("import sys, pggeolearn.stream; "
            "print([m for m in ('mxnet', 'torch', 'PIL', 'rasterio') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
