"""The model registry (pggeolearn.models): save, load, predict_proba, list, drop, export/import.

Models here are untrained U-Nets with random weights: the registry must give back a model that
predicts exactly like the one saved, whatever the weights are.
"""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from pggeolearn import errors
from pggeolearn.training import registry
from pggeolearn.training.registry import Architecture, ModelRecord

NORM = {"mean": [100.0, 90.0, 80.0], "std": [50.0, 40.0, 30.0]}


def framework_model(framework: str, cfg: Architecture, seed: int = 0, normalization=NORM):
    if framework == "mxnet":
        from pggeolearn.training.models_mx import MxModel

        return MxModel(cfg, "cpu", seed=seed, normalization=normalization, train=False)
    pytest.importorskip("torch")
    from pggeolearn.training.models_torch import TorchModel

    return TorchModel(cfg, "cpu", seed=seed, normalization=normalization, train=False)


def record_of(model, name: str = "m", framework: str = "mxnet", **kw) -> ModelRecord:
    cfg = model.cfg
    values = dict(
        name=name, dataset="ds", recipe_hash="abc", framework=framework,
        architecture=cfg.to_json(), hyperparameters={"lr": 0.001, "batch_size": 8},
        classes={0: "background", 1: "road", 2: "building"}, normalization=NORM, tile_px=32,
        resolution=0.5, srid=3857, bands=3, weights=model.get_weights(),
        metrics={"epochs": [], "best": {"miou": 0.5, "iou": [0.6, 0.4, float("nan")]}},
        best_epoch=1)
    values.update(kw)
    return ModelRecord(**values)


def images(n: int = 3, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


@pytest.mark.parametrize("framework", ["mxnet", "torch"])
def test_saved_model_loads_and_predicts_identically(conn, framework):
    cfg = Architecture(in_channels=3, num_classes=3, width=4, depth=2, stem_stride=2)
    model = framework_model(framework, cfg, seed=5)
    registry.save(conn, record_of(model, framework=framework))
    x = images()
    expected = model.predict_proba(x)

    loaded = registry.load(conn, "m", device="cpu")
    got = loaded.predict_proba(x)
    assert got.dtype == np.float32 and got.shape == (3, 3, 32, 32)
    assert np.array_equal(got, expected)
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-5)
    assert loaded.classes == {0: "background", 1: "road", 2: "building"}
    assert (loaded.name, loaded.framework, loaded.tile_px, loaded.resolution, loaded.srid,
            loaded.bands) == ("m", framework, 32, 0.5, 3857, 3)
    assert loaded.normalization == NORM and loaded.num_classes == 3
    assert np.array_equal(loaded.predict(x), expected.argmax(1).astype(np.uint8))
    # small batches give the same answer as one big one
    assert np.allclose(loaded.predict_proba(x, batch_size=1), expected, atol=1e-6)
    # a freshly built model with other weights does not
    other = framework_model(framework, cfg, seed=6)
    assert not np.allclose(other.predict_proba(x), expected)


def test_normalization_is_applied_inside_predict_proba(conn):
    cfg = Architecture(in_channels=3, num_classes=2, width=4, depth=1, stem_stride=1)
    model = framework_model("mxnet", cfg, seed=1)
    registry.save(conn, record_of(model, classes={0: "background", 1: "x"}))
    x = images(2, 16)
    raw = framework_model("mxnet", cfg, seed=1, normalization=None)
    raw.set_weights(model.get_weights())
    mean = np.array(NORM["mean"], np.float32).reshape(1, 3, 1, 1)
    inv = 1 / np.array(NORM["std"], np.float32).reshape(1, 3, 1, 1)
    by_hand = raw.predict_proba((x.astype(np.float32) - mean) * inv)
    assert np.allclose(registry.load(conn, "m", device="cpu").predict_proba(x), by_hand, atol=1e-6)
    assert not np.allclose(raw.predict_proba(x.astype(np.float32)), by_hand, atol=1e-3)


def test_sizes_that_are_not_a_multiple_are_padded_and_cropped(conn):
    cfg = Architecture(in_channels=3, num_classes=3, width=4, depth=2, stem_stride=2)  # multiple 8
    registry.save(conn, record_of(framework_model("mxnet", cfg)))
    loaded = registry.load(conn, "m", device="cpu")
    out = loaded.predict_proba(images(2, 20))
    assert out.shape == (2, 3, 20, 20)
    assert loaded.predict_proba(images(0, 32)).shape == (0, 3, 32, 32)
    with pytest.raises(errors.ConfigError, match=r"takes \(N, 3, H, W\) images"):
        loaded.predict_proba(np.zeros((1, 4, 32, 32), np.uint8))
    with pytest.raises(errors.ConfigError, match="add a leading axis"):
        loaded.predict_proba(np.zeros((3, 32, 32), np.uint8))


def test_names_list_show_drop(conn):
    cfg = Architecture(in_channels=3, num_classes=3, width=4, depth=1, stem_stride=1)
    model = framework_model("mxnet", cfg)
    registry.save(conn, record_of(model, name="b"))
    registry.save(conn, record_of(model, name="a"))
    with pytest.raises(errors.AlreadyExists, match="model a exists"):
        registry.save(conn, record_of(model, name="a"))
    registry.save(conn, record_of(model, name="a", best_epoch=7), overwrite=True)
    listed = registry.list_models(conn)
    assert [m.name for m in listed] == ["a", "b"]
    assert listed[0].weights == b"" and listed[0].weights_size == len(model.get_weights())
    assert listed[0].best_epoch == 7 and listed[0].created_at is not None
    rec = registry.get(conn, "a")
    assert rec.metrics["best"]["iou"] == [0.6, 0.4, None]  # NaN stored as null
    text = rec.describe()
    assert "model a (mxnet)" in text and "0=background, 1=road, 2=building" in text
    assert "best epoch 7" in text and "val mIoU 0.500" in text

    # a checkpoint of the model's training goes with it
    conn.execute("INSERT INTO pggeolearn.runs (kind, model, checkpoint) VALUES ('train', 'a', '\\x00')")
    registry.drop(conn, "a")
    assert conn.execute("SELECT count(*) FROM pggeolearn.runs WHERE checkpoint IS NOT NULL").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM pggeolearn.runs").fetchone()[0] == 1  # history stays
    with pytest.raises(errors.ModelNotFound, match=r"unknown model 'a' \(known: b\)"):
        registry.get(conn, "a")
    with pytest.raises(errors.ModelNotFound, match="unknown model 'a'"):
        registry.drop(conn, "a")
    with pytest.raises(errors.ModelNotFound, match="unknown model 'a'"):
        registry.load(conn, "a")


@pytest.mark.parametrize("framework", ["mxnet", "torch"])
def test_export_is_self_contained(conn, tmp_path, framework):
    cfg = Architecture(in_channels=3, num_classes=3, width=4, depth=2, stem_stride=2)
    model = framework_model(framework, cfg, seed=2)
    registry.save(conn, record_of(model, name="exp", framework=framework))
    out = registry.export(conn, "exp", tmp_path / "exp.zip")
    with zipfile.ZipFile(out) as z:
        assert sorted(z.namelist()) == sorted(["model.json", registry.WEIGHT_FILES[framework]])
    with pytest.raises(errors.AlreadyExists):
        registry.export(conn, "exp", out)
    x = images()
    from_file = registry.load_file(out, device="cpu")
    assert np.array_equal(from_file.predict_proba(x), model.predict_proba(x))
    assert from_file.classes == {0: "background", 1: "road", 2: "building"}

    # into another name (or database): the same model
    registry.import_file(conn, out, name="exp2")
    assert np.array_equal(registry.load(conn, "exp2", device="cpu").predict_proba(x), model.predict_proba(x))
    with pytest.raises(errors.AlreadyExists):
        registry.import_file(conn, out, name="exp2")

    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(errors.ConfigError, match="not a pggeolearn model file"):
        registry.load_file(bad)
    with pytest.raises(errors.ConfigError, match="not found"):
        registry.load_file(tmp_path / "missing.zip")


def test_weights_that_do_not_fit_are_one_clear_line(conn):
    small = framework_model("mxnet", Architecture(3, 3, width=4, depth=1, stem_stride=1))
    big = Architecture(3, 3, width=8, depth=1, stem_stride=1)
    registry.save(conn, record_of(small, architecture=big.to_json()))
    with pytest.raises(errors.ConfigError, match="do not fit this U-Net") as info:
        registry.load(conn, "m", device="cpu")
    assert "\n" not in str(info.value)
    with pytest.raises(errors.ConfigError, match="GPU 0 was asked for"):
        registry.load(conn, "m", device="gpu:0")
