"""SQL-driven sampling: a query returning (tile_id, weight) decides what an epoch draws;
deterministic per seed, sharded without overlap; unweighted epochs stay exactly-once."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from test_chips import make_data, make_dataset

from pggeolearn import chips, errors
from pggeolearn.stream import GeoStream, epoch_batches, epoch_order

IDS = np.arange(100, 160, dtype=np.int64)


def test_weighted_epochs_are_deterministic_per_seed_and_epoch():
    w = np.linspace(0, 3, len(IDS))
    a = epoch_order(IDS, seed=4, epoch=2, weights=w)
    assert np.array_equal(a, epoch_order(IDS, seed=4, epoch=2, weights=w))
    assert not np.array_equal(a, epoch_order(IDS, seed=4, epoch=3, weights=w))
    assert not np.array_equal(a, epoch_order(IDS, seed=5, epoch=2, weights=w))
    assert len(a) == len(IDS) and IDS[0] not in a  # weight 0 is never drawn


def test_weighted_shards_take_disjoint_positions_of_one_order():
    w = np.where(IDS % 2 == 0, 5.0, 1.0)
    full = epoch_order(IDS, seed=1, epoch=0, weights=w)
    world = 3
    parts = [epoch_batches(IDS, epoch=0, batch_size=4, seed=1, shard=s, world=world,
                           last_batch="discard", weights=w)[0].ravel() for s in range(world)]
    for s, part in enumerate(parts):
        assert np.array_equal(part, full[s::world][: len(part)])


def test_draws_follow_the_weights():
    w = np.where(IDS < 110, 9.0, 1.0)  # 10 heavy ids of 60: 90 / 140 of the mass
    counts = collections.Counter()
    for epoch in range(200):
        counts.update(epoch_order(IDS, seed=0, epoch=epoch, weights=w).tolist())
    heavy = sum(n for t, n in counts.items() if t < 110) / sum(counts.values())
    assert heavy == pytest.approx(90 / 140, abs=0.02)


def test_bad_weights_are_refused():
    for bad in (np.full(len(IDS), -1.0), np.zeros(len(IDS)), np.full(len(IDS), np.nan),
                np.ones(3)):
        with pytest.raises(errors.ConfigError, match="weights"):
            epoch_order(IDS, weights=bad)


@pytest.fixture
def built(conn, db_dsn):
    make_data(conn)
    make_dataset(conn)
    chips.build(conn, "small", progress=False)
    return db_dsn


def delivered(stream: GeoStream, epoch: int = 0) -> list[int]:
    out = []
    for batch in stream.iter_epoch(epoch):
        n = len(batch["tile_id"]) - int(batch["pad"])
        out += batch["tile_id"][:n].tolist()
    return out


def test_a_filter_query_streams_only_what_it_selects(conn, built):
    train = [r[0] for r in conn.execute(
        "SELECT tile_id FROM pggeolearn.chips WHERE dataset = 'small' AND split = 'train' "
        "ORDER BY tile_id")]
    clean = [r[0] for r in conn.execute(
        "SELECT tile_id FROM pggeolearn.chips WHERE dataset = 'small' AND split = 'train' "
        "AND nodata_frac = 0 AND class_counts[3] > 0")]  # chips with a class-2 square
    assert 0 < len(clean) < len(train)
    q = ("SELECT tile_id, 1 AS weight FROM pggeolearn.chips WHERE dataset = 'small' "
         "AND nodata_frac = 0 AND class_counts[3] > 0")
    with GeoStream(built, "small", batch_size=4, sampling=q) as s:
        got = delivered(s)
        assert len(got) == len(train) and set(got) == set(clean)
        assert got == delivered(s)  # same seed, same epoch: same draws


def test_weights_change_what_is_sampled(conn, built):
    heavy = conn.execute("SELECT min(tile_id) FROM pggeolearn.chips WHERE dataset = 'small' "
                         "AND split = 'train'").fetchone()[0]
    q = (f"SELECT tile_id, CASE WHEN tile_id = {heavy} THEN 50 ELSE 1 END AS weight "
         "FROM pggeolearn.chips WHERE dataset = 'small'")
    with GeoStream(built, "small", batch_size=4) as plain, \
            GeoStream(built, "small", batch_size=4, sampling=q) as weighted:
        once = collections.Counter(delivered(plain))
        assert set(once.values()) == {1}  # unweighted: exactly once
        many = collections.Counter(delivered(weighted))
        assert many[heavy] > len(once) / 3


def test_sampling_query_errors_are_one_line(conn, built):
    n = conn.execute("SELECT count(*) FROM pggeolearn.chips").fetchone()[0]
    for query, msg in (("SELECT 1", "tile_id and weight"),
                       ("SELECT tile_id, -1 AS weight FROM pggeolearn.chips", "finite and >= 0"),
                       ("SELECT tile_id, 0 AS weight FROM pggeolearn.chips", "no chip"),
                       ("DELETE FROM pggeolearn.chips RETURNING tile_id, 1 AS weight", "fails")):
        with pytest.raises(errors.ConfigError, match=msg):
            GeoStream(built, "small", sampling=query)
    assert conn.execute("SELECT count(*) FROM pggeolearn.chips").fetchone()[0] == n
