"""``pggeolearn.training.train`` against a real chip store: learning, determinism, resume,
Ctrl-C, early stopping, time limit, bad input; and the Banepa end-to-end check (slow).

The fixture chips are written directly (seeded, 16 px, 3 bands) with splits chosen here: the
label is a few random rectangles, painted bright in the image, so a tiny U-Net learns them in
an epoch or two while an untrained one does not.
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import psycopg
import pytest

from pggeolearn import datasets, errors, wkb
from pggeolearn.stream import GeoStream
from pggeolearn.training import metrics as M
from pggeolearn.training import registry, train

PX = 16
# Banepa under a 3-minute CPU budget, scored on the test split (all background: 0.263); 10
# minutes reach 0.714 (README, bench_train.py): a short run must get well past the trivial map
TEST_MARGIN, TEST_FLOOR, BUILDING_FLOOR = 0.3, 0.6, 0.5
TINY = dict(width=4, depth=1, stem_stride=1, batch_size=4, lr=0.02, progress=False)


# ------------------------------------------------------------------------------- fixture data


def chip_arrays(tile_id: int, px: int, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Image (3, px, px) and label (px, px) of ``tile_id``: rectangles of the class ids
    ``ids``, the i-th bright in band i % 3, over dim noise."""
    rng = np.random.default_rng(1000 + tile_id)
    label = np.zeros((px, px), np.uint8)
    for i in rng.integers(0, len(ids), 2):
        y, x = rng.integers(0, px - 4, 2)
        h, w = rng.integers(3, px // 2, 2)
        label[y:y + h, x:x + w] = ids[i]
    image = rng.integers(0, 60, (3, px, px)).astype(np.uint8)
    for i, k in enumerate(ids):
        image[i % 3][label == k] += 150
    return image, label


def make_train_dataset(conn: psycopg.Connection, name: str = "rects", *,
                       splits: dict[str, int] | None = None, nclasses: int = 1,
                       ids: list[int] | None = None, px: int = PX) -> datasets.Dataset:
    """A dataset with chips written straight into the store (train 16, val 4, test 2 by
    default) and the statistics chips.build would store (bands, class pixels of train)."""
    splits = {"train": 16, "val": 4, "test": 2} if splits is None else splits
    ncols = 6
    n = max(sum(splits.values()), 1)
    nrows = math.ceil(n / ncols)
    width, height = ncols * px, nrows * px
    conn.execute(f"CREATE TABLE IF NOT EXISTS public.img_{name} (rid serial, rast raster)")
    grid = [wkb.encode(wkb.from_array(np.full((3, px, px), 9, np.uint8), srid=3857, geotransform=(
        float(c * px), 1.0, 0.0, float(height - r * px), 0.0, -1.0)))
        for r in range(nrows) for c in range(ncols)]  # the recipe only needs imagery on the grid
    conn.execute(f"INSERT INTO public.img_{name} (rast) SELECT ST_RastFromWKB(b)"
                 " FROM unnest(%s::bytea[]) AS b", [grid])
    conn.execute(f"CREATE TABLE IF NOT EXISTS public.poly_{name} (geom geometry(Polygon, 3857), cls int)")
    ids = ids or list(range(1, nclasses + 1))
    # the recipe's polygon carries a declared class (undeclared ids are refused at create)
    conn.execute(f"INSERT INTO public.poly_{name} VALUES (ST_MakeEnvelope(0, 0, 3, 3, 3857), %s)", [ids[0]])
    classes = {k: f"class{k}" for k in ids}
    ds = datasets.create(conn, datasets.Recipe(
        name=name, srid=3857, resolution=1.0, tile_px=px, extent=(0, 0, width, height),
        image_sql=f"SELECT rast FROM public.img_{name} WHERE ST_Intersects(rast, tile_geom)",
        label_sql=f"SELECT geom, cls AS class_id FROM public.poly_{name} WHERE geom && tile_geom",
        classes=classes))
    rows, train_images, class_pixels = [], [], np.zeros(max(ids) + 1, np.int64)
    t = 0
    for split, count in splits.items():
        for _ in range(count):
            image, label = chip_arrays(t, px, ids)
            r, c = divmod(t, ncols)
            gt = (float(c * px), 1.0, 0.0, float(height - r * px), 0.0, -1.0)
            counts = np.bincount(label.ravel(), minlength=max(ids) + 1)
            rows.append((t, wkb.encode(wkb.from_array(image, geotransform=gt, srid=3857)),
                         wkb.encode(wkb.from_array(label, geotransform=gt, srid=3857)), split,
                         counts.tolist()))
            if split == "train":
                train_images.append(image)
                class_pixels += counts
            t += 1
    with conn.cursor() as cur:
        for tile, img, lab, split, counts in rows:
            cur.execute(
                "INSERT INTO pggeolearn.chips (dataset, tile_id, geom, image, label, split,"
                " class_counts, recipe_hash) SELECT %s, %s, ST_Envelope(r), r, ST_RastFromWKB(%s),"
                " %s, %s, %s FROM ST_RastFromWKB(%s) AS r",
                [name, tile, lab, split, counts, ds.recipe_hash, img])
    if train_images:
        stack = np.stack(train_images).astype(np.float64)
        bands = [{"band": i + 1, "mean": float(stack[:, i].mean()), "std": float(stack[:, i].std()),
                  "min": float(stack[:, i].min()), "max": float(stack[:, i].max())} for i in range(3)]
        stats = {"bands": bands, "class_pixels": {str(k): int(v) for k, v in enumerate(class_pixels)},
                 "class_freq": {str(k): float(v / class_pixels.sum()) for k, v in enumerate(class_pixels)},
                 "splits": splits}
        conn.execute("UPDATE pggeolearn.datasets SET stats = %s WHERE name = %s", [json.dumps(stats), name])
    return datasets.get(conn, name)


@pytest.fixture
def rects(conn):
    make_train_dataset(conn)
    return conn


def runs(conn, model: str) -> list[tuple]:
    return conn.execute("SELECT run_id, status, checkpoint IS NOT NULL, error FROM pggeolearn.runs"
                        " WHERE model = %s ORDER BY run_id", [model]).fetchall()


def val_metrics(report) -> list[dict]:
    return [h["val"] for h in report.history]


# ------------------------------------------------------------------------------------ training


def test_train_learns_saves_and_reloads_identically(db_dsn, rects, tmp_path):
    conn = rects
    report = train(db_dsn, "rects", "m1", epochs=2, plot=tmp_path / "curves.png", **TINY)
    assert report.stopped == "completed" and len(report.history) == 2 and report.saved
    base = report.baselines["all background"]
    assert report.best.miou > base.miou + 0.15, str(report)  # it learned something
    assert report.baselines["majority class"].extra["same_as"] == "all background"
    text = str(report)
    assert "model (epoch" in text and "all background" in text and "IoU class1" in text
    assert (tmp_path / "curves.png").stat().st_size > 2000
    # the share of each epoch spent waiting for chips is measured and shown
    assert all(0.0 <= h["data_wait"] < 1.0 for h in report.history) and "data wait" in text

    # the run row: done, with a checkpoint and the per-epoch metrics
    [(run_id, status, has_ckpt, error)] = runs(conn, "m1")
    assert (run_id, status, has_ckpt, error) == (report.run_id, "done", True, None)
    outputs = conn.execute("SELECT outputs FROM pggeolearn.runs WHERE run_id = %s", [run_id]).fetchone()[0]
    assert len(outputs["epochs"]) == 2 and outputs["best_epoch"] == report.best_epoch

    # the registry row describes the model; loaded back, it scores exactly what training measured
    rec = registry.get(conn, "m1")
    assert rec.classes == {0: "background", 1: "class1"} and rec.bands == 3 and rec.tile_px == PX
    assert rec.metrics["best"]["miou"] == pytest.approx(report.best.miou)
    assert rec.best_epoch == report.best_epoch and len(rec.metrics["epochs"]) == 2
    model = registry.load(conn, "m1", device="cpu")
    cm = np.zeros((2, 2), np.int64)
    with GeoStream(db_dsn, "rects", split="val", batch_size=4, shuffle=False, normalize=False) as s:
        for batch in s:
            n = 4 - batch["pad"]
            probs = model.predict_proba(batch["image"][:n])
            assert probs.shape == (n, 2, PX, PX) and probs.dtype == np.float32
            cm += M.confusion_matrix(probs.argmax(1), batch["label"][:n], 2)
    assert M.mean_iou(cm) == report.best.miou


def test_sampling_query_decides_what_training_sees(db_dsn, rects):
    conn = rects
    few = ("SELECT tile_id, 1 AS weight FROM pggeolearn.chips WHERE dataset = 'rects' "
           "AND split = 'train' ORDER BY tile_id LIMIT 2")
    a = train(db_dsn, "rects", "all", epochs=1, seed=3, **TINY)
    b = train(db_dsn, "rects", "few", epochs=1, seed=3, sampling=few, **TINY)
    assert b.history[0]["train_loss"] != a.history[0]["train_loss"]
    with pytest.raises(errors.ConfigError, match="sampling query fails"):
        train(db_dsn, "rects", "bad", epochs=1, sampling="SELECT 1", **TINY)
    assert not registry.exists(conn, "bad")


def test_score_chips_feeds_the_next_sampling_query(db_dsn, rects):
    conn = rects
    report = train(db_dsn, "rects", "scored", epochs=1, seed=3, score_chips=True, **TINY)
    assert any("chip_scores" in n for n in report.notes), report.notes
    train_ids = {r[0] for r in conn.execute(
        "SELECT tile_id FROM pggeolearn.chips WHERE dataset = 'rects' AND split = 'train'")}
    scored = dict(conn.execute("SELECT tile_id, loss FROM pggeolearn.chip_scores "
                               "WHERE model = 'scored' AND split = 'train'").fetchall())
    assert set(scored) == train_ids and all(v is not None and v >= 0 for v in scored.values())
    hard = ("SELECT tile_id, loss AS weight FROM pggeolearn.chip_scores WHERE model = 'scored' "
            "AND split = 'train'")
    again = train(db_dsn, "rects", "hard", epochs=1, seed=3, sampling=hard, **TINY)
    assert again.saved


def test_same_seed_same_metrics_mxnet(db_dsn, rects):
    a = train(db_dsn, "rects", "a", epochs=2, seed=3, **TINY)
    b = train(db_dsn, "rects", "b", epochs=2, seed=3, **TINY)
    assert val_metrics(a) == val_metrics(b)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    c = train(db_dsn, "rects", "c", epochs=2, seed=4, **TINY)
    assert [h["train_loss"] for h in c.history] != [h["train_loss"] for h in a.history]


def test_same_seed_same_metrics_torch(db_dsn, rects):
    pytest.importorskip("torch")
    a = train(db_dsn, "rects", "ta", framework="torch", epochs=2, seed=3, **TINY)
    b = train(db_dsn, "rects", "tb", framework="torch", epochs=2, seed=3, **TINY)
    assert a.framework == "torch" and a.device == "cpu"
    assert val_metrics(a) == val_metrics(b)
    assert a.best.miou > a.baselines["all background"].miou + 0.1, str(a)
    model = registry.load(rects, "ta", device="cpu")
    assert model.framework == "torch" and model.predict(np.zeros((1, 3, PX, PX), np.uint8)).shape == (1, PX, PX)


def stop_after(epoch: int):
    def on_epoch(record: dict) -> None:
        if record["epoch"] == epoch:
            raise KeyboardInterrupt
    return on_epoch


@pytest.mark.parametrize("framework", ["mxnet", "torch"])
def test_ctrl_c_then_resume_equals_one_uninterrupted_run(db_dsn, rects, framework):
    if framework == "torch":
        pytest.importorskip("torch")
    straight = train(db_dsn, "rects", "straight", framework=framework, epochs=3, seed=1, **TINY)

    cut = train(db_dsn, "rects", "cut", framework=framework, epochs=3, seed=1,
                on_epoch=stop_after(1), **TINY)
    assert cut.interrupted and cut.stopped == "interrupted (Ctrl-C) after epoch 1"
    assert "resume with: pggeolearn train rects --model cut --resume" in str(cut)
    assert cut.saved and registry.exists(rects, "cut")  # the best model so far is usable
    [(_, status, has_ckpt, error)] = runs(rects, "cut")
    assert status == "failed" and has_ckpt and "interrupted after epoch 1" in error

    # without --resume the name is taken; with it, training continues where it stopped
    with pytest.raises(errors.AlreadyExists, match="--resume"):
        train(db_dsn, "rects", "cut", framework=framework, epochs=3, **TINY)
    opts = {k: v for k, v in TINY.items() if k != "width"}  # taken from the checkpoint
    resumed = train(db_dsn, "rects", "cut", epochs=3, resume=True, **opts)
    assert resumed.resumed_from == 1 and resumed.framework == framework
    assert val_metrics(resumed) == val_metrics(straight)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]
    states = runs(rects, "cut")
    assert [s[1:3] for s in states] == [("failed", False), ("done", True)]  # one checkpoint kept

    # asking for a different architecture on resume, or for no more epochs, is refused
    with pytest.raises(errors.ConfigError, match="--width 8 differs from the checkpoint's 4"):
        train(db_dsn, "rects", "cut", epochs=5, resume=True, width=8, progress=False)
    with pytest.raises(errors.ConfigError, match="trained 3 epochs already"):
        train(db_dsn, "rects", "cut", epochs=3, resume=True, progress=False)


def test_time_limit_and_early_stopping(db_dsn, rects):
    r = train(db_dsn, "rects", "quick", epochs=5, time_limit_min=1e-4, **TINY)
    assert len(r.history) == 1 and r.stopped.startswith("time limit") and r.saved
    # patience 1: training stops at the first epoch whose val mIoU is not a new best
    r = train(db_dsn, "rects", "flat", epochs=6, patience=1, **(TINY | {"lr": 1e-30}))
    miou = [h["val"]["miou"] for h in r.history]
    new_best = [miou[i] > max(miou[:i]) + 1e-6 for i in range(1, len(miou))]
    if len(miou) < 6:
        assert r.stopped.startswith("early stopping") and not new_best[-1] and all(new_best[:-1])
        assert r.best_epoch == len(miou) - 1
    else:
        assert all(new_best) and r.stopped == "completed"


def test_class_weights_change_training(db_dsn, conn):
    make_train_dataset(conn, nclasses=2)
    a = train(db_dsn, "rects", "w", epochs=1, **TINY)
    b = train(db_dsn, "rects", "nw", epochs=1, class_weights=False, **TINY)
    assert a.history[0]["train_loss"] != b.history[0]["train_loss"]
    assert registry.get(conn, "w").hyperparameters["class_weights"] is True
    assert a.best.iou.__len__() == 3


def test_sparse_class_ids_map_to_channels(db_dsn, conn):
    """Classes 2 and 5: three output channels (ids 0, 2, 5), labels mapped in training, ids
    mapped back by LoadedModel.predict."""
    make_train_dataset(conn, ids=[2, 5])
    report = train(db_dsn, "rects", "sparse", epochs=4, **TINY)
    assert len(report.best.iou) == 3 and "IoU class5" in str(report)
    assert report.best.miou > report.baselines["all background"].miou + 0.1, str(report)
    # the same pictures with ids 1 and 2 train exactly the same way
    make_train_dataset(conn, "dense", ids=[1, 2])
    dense = train(db_dsn, "dense", "dense", epochs=4, **TINY)
    assert val_metrics(dense) == val_metrics(report)
    model = registry.load(conn, "sparse", device="cpu")
    assert model.num_classes == 3 and model.class_ids.tolist() == [0, 2, 5]
    cm = np.zeros((6, 6), np.int64)
    with GeoStream(db_dsn, "rects", split="val", batch_size=4, shuffle=False, normalize=False) as s:
        for batch in s:
            n = 4 - batch["pad"]
            pred = model.predict(batch["image"][:n])
            assert set(np.unique(pred)) <= {0, 2, 5}
            cm += M.confusion_matrix(pred, batch["label"][:n], 6)
    sub = cm[np.ix_([0, 2, 5], [0, 2, 5])]
    assert sub.sum() == cm.sum() and M.mean_iou(sub) == report.best.miou


# ------------------------------------------------------------------------------------ bad input


def nothing_written(conn) -> bool:
    return conn.execute("SELECT (SELECT count(*) FROM pggeolearn.runs) +"
                        " (SELECT count(*) FROM pggeolearn.models)").fetchone()[0] == 0


def test_dataset_not_built_or_split_empty(db_dsn, conn):
    make_train_dataset(conn, "nochips", splits={})
    with pytest.raises(errors.NotBuilt, match="has no chips yet .*chips build nochips"):
        train(db_dsn, "nochips", "m", **TINY)
    make_train_dataset(conn, "noval", splits={"train": 4, "test": 2})
    with pytest.raises(errors.NotBuilt, match="no chips in split val \\(it has: test 2, train 4\\)"):
        train(db_dsn, "noval", "m", **TINY)
    make_train_dataset(conn, "notrain", splits={"val": 4})
    with pytest.raises(errors.NotBuilt, match="no chips in split train"):
        train(db_dsn, "notrain", "m", **TINY)
    with pytest.raises(errors.DatasetNotFound, match="unknown dataset 'nope'"):
        train(db_dsn, "nope", "m", **TINY)
    assert nothing_written(conn)


def test_bad_options_are_one_line_and_write_nothing(db_dsn, rects):
    conn = rects
    # torch is optional: without it --framework torch is refused (one line) before the device
    torch_gpu = ((errors.ConfigError, "GPU") if importlib.util.find_spec("torch")
                 else (errors.MissingDependency, r"needs PyTorch \(pip install 'pggeolearn\[torch\]'\)"))
    cases = [
        (dict(device="gpu:0"), errors.ConfigError, "GPU"),
        (dict(device="gpu:7", framework="torch"), *torch_gpu),
        (dict(device="tpu"), errors.ConfigError, "bad device"),
        (dict(depth=5), errors.ConfigError, "multiple of 32px"),
        (dict(width=1), errors.ConfigError, "width must be"),
        (dict(epochs=0), errors.ConfigError, "epochs must be >= 1"),
        (dict(framework="jax"), errors.ConfigError, "framework must be"),
        (dict(plot="/nonexistent/dir/c.png"), errors.ConfigError, "does not exist"),
        (dict(resume=True), errors.NotFound, "no checkpoint of model m"),
        (dict(colour="red"), errors.ConfigError, "unknown training option"),
    ]
    for extra, exc, pattern in cases:
        with pytest.raises(exc, match=pattern) as info:
            train(db_dsn, "rects", "m", **(TINY | extra))
        assert "\n" not in str(info.value)
    with pytest.raises(errors.ConfigError, match="bad model name"):
        train(db_dsn, "rects", "no spaces", **TINY)
    assert nothing_written(conn)


def test_name_taken_and_overwrite(db_dsn, rects):
    train(db_dsn, "rects", "same", epochs=1, **TINY)
    first = registry.get(rects, "same").weights
    with pytest.raises(errors.AlreadyExists, match="model same exists .*--overwrite"):
        train(db_dsn, "rects", "same", epochs=1, **TINY)
    assert registry.get(rects, "same").weights == first
    train(db_dsn, "rects", "same", epochs=1, overwrite=True, **(TINY | {"seed": 9}))
    assert registry.get(rects, "same").weights != first
    assert registry.get(rects, "same").hyperparameters["seed"] == 9


def test_resume_with_other_classes_is_refused(db_dsn, conn):
    make_train_dataset(conn, "one")
    make_train_dataset(conn, "two", nclasses=2)
    r = train(db_dsn, "one", "m", epochs=2, on_epoch=stop_after(1), **TINY)
    assert r.interrupted
    with pytest.raises(errors.ConfigError, match=r"classes \{0=background, 1=class1\} differ from "
                                                 r"dataset two's \{0=background, 1=class1, 2=class2\}"):
        train(db_dsn, "two", "m", epochs=2, resume=True, progress=False)


# ------------------------------------------------------------------------------------ Banepa


@pytest.mark.slow
@pytest.mark.banepa
def test_banepa_buildings_beat_the_baselines_by_a_margin(conn, db_dsn, banepa):
    """The real thing, shortened for CI: default settings under a 3-minute budget on the CPU,
    scored on the untouched test split, by a margin over the all-background map."""
    from pggeolearn import chips, demo
    from pggeolearn.evaluate import evaluate

    image_table, _, label_sql, classes, res = demo.load_banepa(conn, banepa)
    datasets.create(conn, demo.recipe("banepa", image_table, label_sql, classes, res))
    chips.build(db_dsn, "banepa", jobs=2, progress=False)
    report = train(db_dsn, "banepa", "banepa-unet", epochs=100, time_limit_min=3, device="cpu",
                   progress=False)
    test = evaluate(db_dsn, "banepa-unet", dataset="banepa", split="test", progress=False)
    background_only = report.baselines["all background"].miou
    assert test.scores.miou > background_only + TEST_MARGIN, str(test)
    assert test.scores.miou >= TEST_FLOOR, f"{test}\n{report}"
    assert test.scores.iou[1] >= BUILDING_FLOOR, str(test)


def test_mxnet_data_parallel_over_two_contexts():
    """The multi-GPU path (batches split over contexts, gradients summed) on two CPU contexts:
    the same loss and predictions as one context, and the copies stay in sync."""
    from pggeolearn.training.models_mx import MxModel, mx
    from pggeolearn.training.registry import Architecture

    cfg = Architecture(3, 2, width=4, depth=1, stem_stride=1)
    one = MxModel(cfg, seed=0, normalization=None)
    two = MxModel(cfg, seed=0, normalization=None, ctx=[mx.cpu(0), mx.cpu(1)])
    two.set_weights(one.get_weights())
    rng = np.random.default_rng(0)
    x = mx.nd.array(rng.normal(size=(6, 3, 16, 16)))
    y = mx.nd.array(rng.integers(0, 2, (6, 16, 16)))
    weights = np.array([1.0, 3.0], np.float32)
    a, b = one.eval_step(x, y, 1, weights), two.eval_step(x, y, 1, weights)
    assert a[0] == pytest.approx(b[0], rel=1e-5) and a[1] == b[1]
    assert np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3]) and len(a[2]) == 5
    loss = two.train_step(x, y, 0, 0.01, weights)
    assert math.isfinite(loss) and loss > 0
    for p in two.net.collect_params().values():
        copies = [d.asnumpy() for d in p.list_data()]
        assert len(copies) == 2 and np.array_equal(copies[0], copies[1]), p.name


def test_time_limit_is_a_budget_not_a_patience(db_dsn, rects):
    # no patience given: under a time limit nothing but the budget (or the epochs) stops a run
    r = train(db_dsn, "rects", "budget", epochs=3, time_limit_min=30, **(TINY | {"lr": 1e-30}))
    assert len(r.history) == 3 and r.stopped == "completed"
    assert registry.get(rects, "budget").hyperparameters["patience"] == 0
    # no patience given and no time limit: the annealing schedules run to their end, a
    # constant rate stops after DEFAULT_PATIENCE epochs without a better val mIoU
    r = train(db_dsn, "rects", "cosine", epochs=1, **TINY)
    assert registry.get(rects, "cosine").hyperparameters["patience"] == 0
    r = train(db_dsn, "rects", "budget5", epochs=1, schedule="constant", **TINY)
    assert registry.get(rects, "budget5").hyperparameters["patience"] == 5
    r = train(db_dsn, "rects", "budget1", epochs=1, time_limit_min=30, patience=1, **TINY)
    assert registry.get(rects, "budget1").hyperparameters["patience"] == 1
