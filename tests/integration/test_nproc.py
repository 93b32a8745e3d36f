"""``train(..., nproc=2)``: two CPU processes train one model data-parallel from the chip store.

Each rank records the tile ids it trained on through the ``on_chips`` hook (called in the rank,
with the ids of the batches the stream delivered), so the exactly-once check reads what the
ranks saw, not the sharding formula. Train has 9 chips: shards of 5 and 4, batches of 4, so
rank 1 takes one step of padding only (DDP needs equal step counts).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest

from pggeolearn import errors, predict, runs
from pggeolearn.training import launch, registry, train
from pggeolearn.training.loop import unpack_checkpoint

_spec = importlib.util.spec_from_file_location("train_fixtures", Path(__file__).with_name("test_train.py"))
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)

SPLITS = {"train": 9, "val": 5, "test": 2}
TINY = dict(width=4, depth=1, stem_stride=1, batch_size=4, lr=0.02, progress=False)
FRAMEWORKS = ["torch", "mxnet"]


def log_chips(folder: str, rank: int, epoch: int, tile_ids: np.ndarray) -> None:
    """The on_chips hook: appends what rank ``rank`` trained on to a file per (rank, epoch)."""
    with open(Path(folder) / f"rank{rank}-epoch{epoch}.json", "a") as f:
        f.write(json.dumps([int(t) for t in tile_ids]) + "\n")


def fail_in_rank_1(rank: int, epoch: int, tile_ids: np.ndarray) -> None:
    if rank == 1:
        raise RuntimeError("boom in the hook")


def read_log(folder: Path, rank: int, epoch: int) -> list[int]:
    lines = (folder / f"rank{rank}-epoch{epoch}.json").read_text().splitlines()
    return [t for line in lines for t in json.loads(line)]


@pytest.fixture
def rects9(conn):
    _fixtures.make_train_dataset(conn, splits=SPLITS)
    return conn


def _needs(framework: str) -> None:
    if framework == "torch":
        pytest.importorskip("torch")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_two_processes_train_once_per_chip_and_agree(db_dsn, rects9, tmp_path, framework):
    _needs(framework)
    conn = rects9
    seen = []
    report = train(db_dsn, "rects", "np2", framework=framework, epochs=2, nproc=2, seed=1,
                   on_chips=functools.partial(log_chips, str(tmp_path)), on_epoch=seen.append, **TINY)
    assert report.stopped == "completed" and report.saved and report.nproc == 2
    assert f"({framework} on 2 processes, rank 0 on " in str(report)
    assert [r["epoch"] for r in seen] == [1, 2]  # on_epoch reached the launcher from rank 0

    # every train chip exactly once per epoch over both ranks, no overlap, none of another split
    train_ids = {t for (t,) in conn.execute(
        "SELECT tile_id FROM pggeolearn.chips WHERE dataset = 'rects' AND split = 'train'")}
    for epoch in (0, 1):
        r0, r1 = read_log(tmp_path, 0, epoch), read_log(tmp_path, 1, epoch)
        assert sorted([len(r0), len(r1)]) == [4, 5]
        assert len(set(r0)) == len(r0) and len(set(r1)) == len(r1)
        assert not set(r0) & set(r1) and set(r0) | set(r1) == train_ids
    assert read_log(tmp_path, 0, 0) != read_log(tmp_path, 0, 1)  # reshuffled per epoch
    assert [h["chips"] for h in report.history] == [9, 9]

    # one run, one model, written once; rank 0's checkpoint holds rank 0's final weights
    assert len(report.rank_weights) == 2
    rows = conn.execute("SELECT status, checkpoint, params ->> 'nproc' FROM pggeolearn.runs"
                        " WHERE model = 'np2'").fetchall()
    assert len(rows) == 1 and rows[0][0] == "done" and rows[0][2] == "2"  # one run, written once
    _, weights, _, _ = unpack_checkpoint(bytes(rows[0][1]))
    assert hashlib.sha256(weights).hexdigest() == report.rank_weights[0]
    assert conn.execute("SELECT count(*) FROM pggeolearn.models WHERE name = 'np2'").fetchone()[0] == 1

    # the stored model loads and predicts, in memory and through predict() into PostGIS
    model = registry.load(conn, "np2", device="cpu")
    assert model.framework == framework
    assert model.predict(np.zeros((1, 3, 16, 16), np.uint8)).shape == (1, 16, 16)
    rep = predict.predict(db_dsn, "np2", out="public.np2_out", imagery="public.img_rects",
                          extent=(0, 0, 32, 16))
    tiles, width = conn.execute("SELECT count(*), sum(ST_Width(rast)) FROM public.np2_out").fetchone()
    assert rep.run_id and tiles >= 1 and width >= 32

    # the same final weights in both ranks (every BatchNorm running statistic included)
    assert report.rank_weights[0] == report.rank_weights[1]


def test_two_processes_learn_like_one(db_dsn, rects9):
    """torch: two ranks see the same global batches' chips as one process would (in another
    grouping), so the model learns as well: val mIoU above the all-background baseline."""
    _needs("torch")
    report = train(db_dsn, "rects", "np_learn", framework="torch", epochs=6, nproc=2, seed=0, **TINY)
    base = report.baselines["all background"].miou
    assert report.best.miou > base + 0.1, (report.best.miou, base)


def test_bad_nproc_is_one_line_and_writes_nothing(db_dsn, rects9):
    conn = rects9
    for kwargs, message in [(dict(nproc=0), r"--nproc must be >= 1, not 0"),
                            (dict(nproc=10), r"--nproc 10 is more than the 9 train chips of dataset rects"),
                            (dict(nproc=2, on_chips=lambda *a: None),
                             r"with nproc > 1 the training options must be picklable")]:
        with pytest.raises(errors.ConfigError, match=message) as info:
            train(db_dsn, "rects", "bad", **kwargs, **TINY)
        assert "\n" not in str(info.value)
    assert conn.execute("SELECT count(*) FROM pggeolearn.runs").fetchone()[0] == 0


def test_each_process_takes_its_own_gpu():
    assert launch.rank_device("auto", 1, 2, 0) == "cpu" and launch.rank_device("cpu", 1, 2, 4) == "cpu"
    assert launch.rank_device("gpu", 1, 2, 2) == "gpu:1" and launch.rank_device("auto", 0, 2, 3) == "gpu:0"
    assert launch.rank_device("gpu:2,3", 1, 2, 4) == "gpu:3"
    with pytest.raises(errors.ConfigError, match=r"^--nproc 2 needs a GPU per process, but 1 were "
                                                 r"given \(--device gpu:0\)$"):
        launch.rank_device("gpu:0", 0, 2, 4)
    with pytest.raises(errors.ConfigError, match=r"^--nproc 3 needs a GPU per process, but 2 are there"):
        launch.rank_device("gpu", 0, 3, 2)


def test_kvstore_role_after_mxnet_was_imported_is_one_line(monkeypatch):
    """DMLC_ROLE=server must be set before mxnet is imported (importing it runs the role)."""
    import pggeolearn.mxnet  # noqa: F401

    monkeypatch.setenv("DMLC_ROLE", "server")
    with pytest.raises(errors.ConfigError, match=r"^DMLC_ROLE=server, but mxnet was imported before"):
        train(None, "rects", "m")


def test_a_failing_rank_stops_all_with_one_line(db_dsn, rects9):
    _needs("torch")
    t0 = time.monotonic()
    with pytest.raises(errors.WorkerFailed, match=r"^training process 1 of 2 failed: "
                                                  r"RuntimeError: boom in the hook$"):
        train(db_dsn, "rects", "np_fail", framework="torch", epochs=50, nproc=2, on_chips=fail_in_rank_1,
              **TINY)
    assert time.monotonic() - t0 < 120
    assert mp.active_children() == []  # no rank left behind
    with pytest.raises(errors.ModelNotFound):
        registry.get(rects9, "np_fail")
    # rank 0's run is failed (by rank 0 as it was stopped, or reaped once its lock was gone)
    assert [r.status for r in runs.list_runs(rects9, model="np_fail")] == ["failed"]
