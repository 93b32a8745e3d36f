"""The framework adapters over GeoStream: MXNet GeoIter (Module.fit, Gluon, from_sql) and the
PyTorch IterableDataset / DataLoader (workers x ranks sharding, picklable, per-sample)."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import test_stream
from test_stream import N_TRAIN, NCOLS, NROWS, check_content, make_chip_dataset

from pggeolearn import errors

B = 8

# the chip-store fixtures of test_stream (a template with datasets tiny and big, cloned per test)
chips_template_dsn = test_stream.chips_template_dsn
chips_dsn, conn, tiny = test_stream.chips_dsn, test_stream.conn, test_stream.tiny


def _samples(batches) -> list[int]:
    out: list[int] = []
    for tile_ids, pad in batches:
        out += [int(t) for t in tile_ids[: len(tile_ids) - pad]]
    return out


# ------------------------------------------------------------------------- MXNet


def test_mxnet_import_restores_numpy_aliases_quietly():
    code = ("import warnings; warnings.simplefilter('error', FutureWarning); "
            "import pggeolearn.mxnet as m, numpy as np; "
            "print(m.mx.__version__, np.bool is bool, np.float is float, np.str is str)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1.9.1", "True", "True", "True"]


def test_geoiter_batches_and_epochs(tiny):
    from pggeolearn.mxnet import GeoIter, mx

    dsn, ds = tiny
    it = GeoIter(dsn, ds.name, batch_size=B, seed=1)
    (d,), (lab,) = it.provide_data, it.provide_label
    assert (d.name, d.shape, d.dtype, d.layout) == ("data", (B, 3, 16, 16), np.float32, "NCHW")
    assert (lab.name, lab.shape) == ("softmax_label", (B, 16, 16))
    stream = it.stream
    epochs = []
    for _ in range(2):
        batches = list(it)
        assert len(batches) == 5 and [b.pad for b in batches] == [0, 0, 0, 0, 3]
        for b in batches:
            x, y = b.data[0], b.label[0]
            assert isinstance(x, mx.nd.NDArray) and x.dtype == np.float32 and x.shape == (B, 3, 16, 16)
            assert x.context == mx.cpu() and y.dtype == np.float32
            raw = {"image": None, "label": y.asnumpy().astype(np.uint8), "tile_id": b.index}
            # undo the normalization done on the device: the chips come back exactly
            raw["image"] = np.rint(x.asnumpy() * stream.std[:, None, None]
                                   + stream.mean[:, None, None]).astype(np.uint8)
            check_content(raw)
        assert sorted(_samples((b.index, b.pad) for b in batches)) == list(range(N_TRAIN))
        epochs.append([b.index.tolist() for b in batches])
        it.reset()
    assert epochs[0] != epochs[1]  # reset() moved to the next epoch: a new shuffle
    assert epochs[0] == stream.plan(0)[0].tolist() and epochs[1] == stream.plan(1)[0].tolist()
    it.reset()  # nothing read since the last reset: the epoch does not move
    assert it.epoch == 2
    it.close()


def test_geoiter_normalizes_uint8_batches_on_the_device(tiny):
    """The GPU path (uint8 to the device, cast + normalize there) gives the CPU path's data."""
    from pggeolearn.mxnet import GeoIter

    dsn, ds = tiny
    cpu = GeoIter(dsn, ds.name, batch_size=B, seed=2)
    dev = GeoIter(dsn, ds.name, batch_size=B, seed=2, dtype=None)
    assert cpu.stream.out_dtype == np.float32 and dev.stream.out_dtype == np.uint8
    for a, b in zip(cpu, dev, strict=True):
        assert np.allclose(a.data[0].asnumpy(), b.data[0].asnumpy(), atol=1e-5)
        assert np.array_equal(a.label[0].asnumpy(), b.label[0].asnumpy())
    plain = GeoIter(dsn, ds.name, batch_size=B, shuffle=False, normalize=False, dtype=None)
    first = next(iter(plain))
    assert first.data[0].dtype == np.float32 and first.data[0].asnumpy()[0, 2, 0, 1] == 1.0
    for it in (cpu, dev, plain):
        it.close()


def test_geoiter_num_parts_cover_exactly_once(tiny):
    from pggeolearn.mxnet import GeoIter

    dsn, ds = tiny
    got: list[int] = []
    for part in range(3):
        it = GeoIter(dsn, ds.name, batch_size=B, num_parts=3, part_index=part,
                     data_name="img", label_name="mask", label_dtype="int32")
        assert it.provide_data[0].name == "img" and it.provide_label[0].name == "mask"
        batches = list(it)
        assert batches[0].label[0].dtype == np.int32
        got += _samples((b.index, b.pad) for b in batches)
        it.close()
    assert sorted(got) == list(range(N_TRAIN))


def test_geoiter_module_fit(tiny):
    from pggeolearn.mxnet import GeoIter, mx

    dsn, ds = tiny
    it = GeoIter(dsn, ds.name, batch_size=B)
    data = mx.sym.Variable("data")
    net = mx.sym.Convolution(data, kernel=(3, 3), pad=(1, 1), num_filter=3, name="conv")
    net = mx.sym.SoftmaxOutput(net, multi_output=True, name="softmax")
    mod = mx.mod.Module(net, data_names=["data"], label_names=["softmax_label"], context=mx.cpu())
    seen: list[int] = []

    def count(param):
        seen.append(param.nbatch)

    mod.fit(it, num_epoch=1, optimizer="sgd", optimizer_params={"learning_rate": 0.01},
            eval_metric="acc", batch_end_callback=count)
    assert len(seen) == 5
    score = dict(mod.score(it, "acc"))
    assert 0 <= score["accuracy"] <= 1
    it.close()


def test_geoiter_gluon_loop(tiny):
    from pggeolearn.mxnet import GeoIter, mx

    gluon, autograd = mx.gluon, mx.autograd
    dsn, ds = tiny
    it = GeoIter(dsn, ds.name, batch_size=B, augment=True)
    net = gluon.nn.Conv2D(3, kernel_size=3, padding=1)
    net.initialize(mx.init.Xavier(), ctx=mx.cpu())
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss(axis=1)
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 0.05})
    losses = []
    for _ in range(3):
        it.reset()
        total, n = 0.0, 0
        for batch in it:
            x, y = batch.data[0], batch.label[0]
            with autograd.record():
                loss = loss_fn(net(x), y)
            loss.backward()
            trainer.step(x.shape[0])
            total += float(loss.mean().asscalar())
            n += 1
        losses.append(total / n)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]  # the label is learnable
    it.close()


def test_geoiter_from_sql_live_and_reuse(tiny, conn):
    from pggeolearn.mxnet import GeoIter

    dsn, ds = tiny
    r = ds.recipe
    kw = dict(extent=r.extent, srid=3857, tile_px=16, resolution=1.0, image_sql=r.image_sql,
              label_sql=r.label_sql, classes={1: "left", 2: "unused"}, batch_size=8)
    before = conn.execute("SELECT count(*) FROM pggeolearn.datasets").fetchone()[0]
    it = GeoIter.from_sql(dsn, **kw)
    assert it.stream.dataset_name == "tiny"  # same recipe hash: the dataset is reused
    assert it.stream.source == "live"
    assert sorted(_samples((b.index, b.pad) for b in it)) == list(range(NCOLS * NROWS))
    it.close()
    it = GeoIter.from_sql(dsn, **{**kw, "classes": {1: "other"}}, max_iter=2)
    assert it.stream.dataset_name.startswith("adhoc-")  # another recipe: created
    assert len(list(it)) == 2
    it.close()
    count = "SELECT count(*) FROM pggeolearn.datasets"
    assert conn.execute(count).fetchone()[0] == before + 1
    GeoIter.from_sql(dsn, **{**kw, "classes": {1: "other"}}).close()
    assert conn.execute(count).fetchone()[0] == before + 1
    with pytest.raises(errors.ConfigError):
        GeoIter.from_sql(dsn, **{**kw, "resolution": -1})


def test_geoiter_from_sql_materialize_builds_chips(chips_dsn, conn):
    from pggeolearn.mxnet import GeoIter

    ds = make_chip_dataset(conn, "src", splits={})  # recipe + imagery only, no chips
    r = ds.recipe
    it = GeoIter.from_sql(chips_dsn, extent=r.extent, srid=3857, tile_px=16, resolution=1.0,
                          image_sql=r.image_sql, label_sql=r.label_sql,
                          classes={1: "left", 2: "unused"}, batch_size=4, materialize=True)
    assert it.stream.source == "chips" and it.stream.split == "train"
    train = [t for (t,) in conn.execute(
        "SELECT tile_id FROM pggeolearn.chips WHERE dataset = %s AND split = 'train' "
        "ORDER BY tile_id", [it.stream.dataset_name])]
    assert 0 < len(train) <= NCOLS * NROWS  # chips.build chose the splits
    got = _samples((b.index, b.pad) for b in it)
    assert sorted(got) == train
    it.close()


# ------------------------------------------------------------------------- PyTorch


@pytest.mark.torch
@pytest.mark.parametrize("num_workers", [0, 2])
def test_torch_loader_exactly_once_over_ranks_and_workers(tiny, num_workers):
    import torch

    from pggeolearn.torch import make_loader

    dsn, ds = tiny
    for world in (1, 2):
        per_epoch: dict[int, list[int]] = {0: [], 1: []}
        for rank in range(world):
            loader = make_loader(dsn, ds.name, "train", batch_size=B, num_workers=num_workers,
                                 rank=rank, world_size=world, seed=7)
            for epoch in (0, 1):
                for batch in loader:
                    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (B, 3, 16, 16)
                    assert batch["label"].dtype == torch.uint8
                    check_content({k: (v.numpy() if torch.is_tensor(v) else v)
                                   for k, v in batch.items()})
                    per_epoch[epoch] += _samples([(batch["tile_id"].tolist(), batch["pad"])])
        for epoch in (0, 1):
            assert sorted(per_epoch[epoch]) == list(range(N_TRAIN)), (world, epoch)
        assert per_epoch[0] != per_epoch[1]  # the loader moved the workers to the next epoch


@pytest.mark.torch
def test_torch_per_sample_with_collation(tiny):
    import torch

    from pggeolearn.torch import make_loader

    dsn, ds = tiny
    loader = make_loader(dsn, ds.name, batch_size=5, per_sample=True, num_workers=2, augment=True)
    got: list[int] = []
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 16, 16) and batch["image"].shape[0] <= 5
        lab = batch["label"]
        assert torch.equal(lab, batch["image"][:, 2] % 3)  # the augmentation was joint
        got += batch["tile_id"].tolist()
    assert sorted(got) == list(range(N_TRAIN))


@pytest.mark.torch
def test_torch_dataset_is_picklable_and_opens_nothing_early(tiny, conn):
    import torch

    from pggeolearn.torch import GeoDataset

    dsn, ds = tiny
    before = conn.execute("SELECT count(*) FROM pg_stat_activity").fetchone()[0]
    data = GeoDataset(dsn, ds.name, batch_size=B)
    clone = pickle.loads(pickle.dumps(data))
    assert conn.execute("SELECT count(*) FROM pg_stat_activity").fetchone()[0] == before
    batches = list(clone)
    assert len(batches) == 5 and clone.epoch == 1
    x = clone.normalize(batches[0]["image"])
    assert x.dtype == torch.float32
    mean = torch.tensor([b["mean"] for b in ds.stats["bands"]]).reshape(1, 3, 1, 1)
    std = torch.tensor([b["std"] for b in ds.stats["bands"]]).reshape(1, 3, 1, 1)
    assert torch.allclose(x, (batches[0]["image"].float() - mean) / std, atol=1e-4)
    pickle.dumps(clone)  # still picklable after use (device tensors are dropped)
    with pytest.raises(errors.ConfigError):
        GeoDataset(dsn, ds.name, rank=1)


@pytest.mark.torch
def test_adapters_import_only_their_framework():
    code = ("import sys, pggeolearn.torch; print('mxnet' in sys.modules); "
            "import pggeolearn.stream, pggeolearn.cli.main; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
