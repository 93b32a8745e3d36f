"""Read replicas: an embedded primary, a streaming standby made with pg_basebackup -R; chips
built on the primary, streamed from both, every chip exactly once across the shards."""

from __future__ import annotations

import collections

import psycopg
import pytest
from test_chips import make_data, make_dataset

from pggeolearn import chips, errors
from pggeolearn.db import cluster as cl
from pggeolearn.db import schema, security
from pggeolearn.db.replica import make_replica, wait_for_replay
from pggeolearn.stream import GeoStream, read_dsn


def test_read_dsn_spreads_shards():
    assert read_dsn("a", 5) == "a" and read_dsn(None, 1) is None
    assert [read_dsn(["p", "r1", "r2"], s) for s in range(5)] == ["p", "r1", "r2", "p", "r1"]
    with pytest.raises(errors.ConfigError):
        read_dsn([], 0)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base = tmp_path_factory.mktemp("replication")
    primary = cl.Cluster(base / "primary", settings={"fsync": "off"})
    try:
        primary.up(dbname="pggeolearn")
    except errors.MissingDependency as exc:
        pytest.skip(f"no PostgreSQL: {exc}")
    standby = None
    try:
        dsn = primary.dsn("pggeolearn")
        schema.upgrade(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            make_data(conn)
            security.grant(conn, "public", schema=True)  # recipe SQL may read the test tables
            make_dataset(conn)
        standby = make_replica(primary, base / "standby")
        yield primary, standby
    finally:
        if standby is not None:
            standby.destroy()
        primary.destroy()


def test_standby_streams_chips_built_on_the_primary(pair):
    primary, standby = pair
    p_dsn, s_dsn = primary.dsn("pggeolearn"), standby.dsn("pggeolearn")
    chips.build(p_dsn, "small", progress=False)  # after the base backup: arrives by streaming
    wait_for_replay(p_dsn, s_dsn)
    with psycopg.connect(s_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("DELETE FROM pggeolearn.chips")
    seen: collections.Counter[int] = collections.Counter()
    for part in range(2):
        with GeoStream([p_dsn, s_dsn], "small", batch_size=4, num_parts=2,
                       part_index=part) as s:
            assert s.dsn == (p_dsn, s_dsn)[part]
            for batch in s.iter_epoch(0):
                n = len(batch["tile_id"]) - int(batch["pad"])
                seen.update(batch["tile_id"][:n].tolist())
    with GeoStream(p_dsn, "small") as whole:
        assert sorted(seen) == sorted(whole.ids.tolist())
    assert set(seen.values()) == {1}


def test_training_streams_from_the_standby(pair):
    from pggeolearn.training import registry, train

    primary, standby = pair
    p_dsn, s_dsn = primary.dsn("pggeolearn"), standby.dsn("pggeolearn")
    chips.build(p_dsn, "small", progress=False)
    wait_for_replay(p_dsn, s_dsn)
    report = train(p_dsn, "small", "from-standby", epochs=1, width=4, depth=1, batch_size=4,
                   read_dsns=(s_dsn,), progress=False)
    assert report.saved and report.history[0]["train_loss"] > 0
    with psycopg.connect(p_dsn) as conn:  # the model and its run are on the primary
        assert registry.exists(conn, "from-standby")
