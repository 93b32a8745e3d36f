"""Segmentation metrics, baselines, class weights, LR schedules: pure numpy, no database."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pggeolearn import errors
from pggeolearn.training import metrics as M
from pggeolearn.training.common import map_error, pad_to, parse_device
from pggeolearn.training.loop import EarlyStopping, TrainOptions, class_weights, label_lut, lr_at


def brute_cm(pred, true, k):
    cm = np.zeros((k, k), np.int64)
    for p, t in zip(np.ravel(pred), np.ravel(true), strict=True):
        if 0 <= t < k and 0 <= p < k:
            cm[t, p] += 1
    return cm


def test_confusion_matrix_matches_brute_force():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, (3, 17, 9)).astype(np.uint8)
    true = rng.integers(0, 4, (3, 17, 9)).astype(np.uint8)
    assert np.array_equal(M.confusion_matrix(pred, true, 4), brute_cm(pred, true, 4))
    # ids outside the model's classes are ignored, not wrapped into another class
    true[0, 0, 0], pred[0, 0, 1] = 9, 200
    cm = M.confusion_matrix(pred, true, 4)
    assert cm.sum() == pred.size - 2
    assert np.array_equal(cm, brute_cm(pred, true, 4))
    with pytest.raises(ValueError, match="differ in size"):
        M.confusion_matrix(pred[:1], true, 4)


def test_iou_f1_by_hand():
    # truth: 6 background, 4 class 1; prediction gets 3 of the 4 right and 1 background wrong
    true = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 0])
    cm = M.confusion_matrix(pred, true, 3)
    assert cm.tolist() == [[5, 1, 0], [1, 3, 0], [0, 0, 0]]
    iou = M.iou_per_class(cm)
    assert iou[0] == pytest.approx(5 / 7) and iou[1] == pytest.approx(3 / 5)
    assert math.isnan(iou[2])  # class 2 is in neither: undefined, left out of the mean
    assert M.mean_iou(cm) == pytest.approx((5 / 7 + 3 / 5) / 2)
    f1 = M.f1_per_class(cm)
    assert f1[0] == pytest.approx(10 / 12) and f1[1] == pytest.approx(6 / 8)
    assert M.pixel_accuracy(cm) == pytest.approx(0.8)
    # a class present in the truth but never predicted counts as 0, pulling the mean down
    cm0 = M.confusion_matrix(np.zeros(10, int), true, 2)
    assert M.iou_per_class(cm0)[1] == 0.0
    assert M.mean_iou(cm0) == pytest.approx(0.6 / 2)


def test_perfect_and_empty():
    true = np.array([0, 1, 2, 2])
    s = M.scores(M.confusion_matrix(true, true, 3))
    assert s.miou == 1.0 and s.f1 == [1.0, 1.0, 1.0] and s.accuracy == 1.0
    empty = M.scores(np.zeros((2, 2), np.int64))
    assert math.isnan(empty.miou) and math.isnan(empty.accuracy)
    assert empty.to_json()["miou"] is None  # JSON has no NaN


def test_baselines_equal_when_background_is_the_majority():
    val = [700, 300]  # background is the majority of val and train
    b = M.baselines(val, train_counts=[8000, 2000], num_classes=2)
    bg, maj = b["all background"], b["majority class"]
    assert bg.iou == [0.7, 0.0] and bg.miou == pytest.approx(0.35)
    assert maj.miou == bg.miou and maj.extra["same_as"] == "all background"
    # constant prediction == the confusion matrix of an all-background model
    cm = M.confusion_matrix(np.zeros(1000, int), np.r_[np.zeros(700, int), np.ones(300, int)], 2)
    assert np.array_equal(M.constant_prediction_cm(val, 0, 2), cm)


def test_majority_comes_from_the_train_split():
    b = M.baselines([600, 400], train_counts=[100, 900], num_classes=2)
    maj = b["majority class"]
    assert maj.extra["class"] == 1 and "same_as" not in maj.extra
    assert maj.iou == [0.0, 0.4] and maj.miou == pytest.approx(0.2)
    assert b["all background"].miou == pytest.approx(0.3)


def test_format_table():
    b = M.baselines([700, 300], None, 2)
    text = M.format_table(b, ["background", "road"])
    lines = text.splitlines()
    assert lines[0].split() == ["mIoU", "IoU", "background", "IoU", "road", "F1", "background",
                                "F1", "road", "pixel", "acc"]
    assert lines[1].startswith("all background") and "0.350" in lines[1] and "-" not in lines[1][15:]


def test_class_weights_inverse_frequency_normalized_clipped():
    w = class_weights({"0": 900, "1": 100}, 2)
    assert w[1] / w[0] == pytest.approx(9.0)
    assert float((np.array([0.9, 0.1]) * w).sum()) == pytest.approx(1.0)  # mean pixel weight 1
    w = class_weights({"0": 99990, "1": 10, "2": 0}, 3)  # very rare + absent class
    ratio = w / w[0]
    assert ratio[1] == pytest.approx(10.0)  # clipped, not 9999
    assert ratio[2] == pytest.approx(10.0)  # absent: the clip
    assert class_weights(None, 2) is None and class_weights({"0": 0}, 2) is None
    assert class_weights({"0": 5, "1": 5}, 2).tolist() == [1.0, 1.0]
    # sparse class ids: weights in channel order (ids ascending)
    w = class_weights({"0": 900, "5": 100, "9": 7}, [0, 5])
    assert len(w) == 2 and w[1] / w[0] == pytest.approx(9.0)


def test_label_lut():
    assert label_lut([0, 1, 2]) is None
    lut = label_lut([0, 2, 5])
    assert lut.dtype == np.uint8 and lut[[0, 2, 5]].tolist() == [0, 1, 2]
    assert lut[[1, 3, 255]].tolist() == [0, 0, 0]


def test_lr_schedules():
    assert lr_at("cosine", 1e-3, 0) == pytest.approx(1e-3)
    assert lr_at("cosine", 1e-3, 1) == pytest.approx(1e-5)
    assert lr_at("cosine", 1e-3, 0.5) == pytest.approx((1e-3 + 1e-5) / 2)
    values = [lr_at("cosine", 1e-3, p) for p in np.linspace(0, 1, 11)]
    assert values == sorted(values, reverse=True)
    assert lr_at("cosine", 1e-3, 7) == pytest.approx(1e-5)  # past the end: stays at the floor
    assert [lr_at("step", 1.0, p) for p in (0, 0.59, 0.6, 0.9)] == pytest.approx([1, 1, 0.1, 0.01])
    assert lr_at("constant", 0.1, 0.9) == 0.1


def test_early_stopping():
    stop = EarlyStopping(patience=2)
    seen = [(stop.update(v), stop.should_stop) for v in (0.3, 0.5, 0.5, 0.49, 0.6)]
    assert seen == [(True, False), (True, False), (False, False), (False, True), (True, False)]
    assert stop.best == 0.6 and stop.best_epoch == 5
    never = EarlyStopping(patience=0)
    for _ in range(10):
        never.update(0.1)
    assert not never.should_stop
    nan = EarlyStopping(patience=1)
    assert nan.update(float("nan")) is False and nan.best_epoch is None


def test_devices_and_errors():
    assert parse_device("auto") == ("auto", None)
    assert parse_device("GPU:1,3") == ("gpu", [1, 3])
    assert parse_device("cpu") == ("cpu", None)
    for bad in ("cuda", "gpu:", "cpu:0", "gpu:x"):
        with pytest.raises(errors.ConfigError, match="bad device"):
            parse_device(bad)
    err = map_error(RuntimeError("[12:00:00] src/storage/gpu_device.cc: cudaMalloc retry failed: "
                                 "out of memory"), 64)
    assert isinstance(err, errors.ConfigError) and "--batch-size 64" in str(err)
    assert "\n" not in str(err)
    assert map_error(MemoryError(), 8) is not None
    assert map_error(RuntimeError("shape mismatch"), 8) is None
    assert map_error(errors.ConfigError("out of memory?"), 8) is None  # already ours


def test_options_resolve_against_a_checkpoint():
    o = TrainOptions().resolved()
    assert (o.framework, o.width, o.batch_size, o.lr) == ("mxnet", 16, 8, 1e-3)
    stored = dict(TrainOptions(width=8).resolved().__dict__)
    o = TrainOptions(epochs=30).resolved({k: stored[k] for k in ("width", "lr", "framework")})
    assert o.width == 8 and o.epochs == 30
    with pytest.raises(errors.ConfigError, match="--width 32 differs from the checkpoint's 8"):
        TrainOptions(width=32).resolved({"width": 8})
    with pytest.raises(errors.ConfigError, match="framework"):
        TrainOptions(framework="jax").resolved().validate()
    with pytest.raises(errors.ConfigError, match="epochs"):
        TrainOptions(epochs=0).resolved().validate()


def test_pad_to():
    x = np.arange(2 * 3 * 5 * 6).reshape(2, 3, 5, 6)
    y = pad_to(x, 4)
    assert y.shape == (2, 3, 8, 8) and np.array_equal(y[..., :5, :6], x)
    assert pad_to(x[..., :4, :4], 4) is not None and pad_to(x[..., :4, :4], 4).shape == (2, 3, 4, 4)
    assert pad_to(np.zeros((1, 1, 1, 1)), 8).shape == (1, 1, 8, 8)  # too small to reflect: edge
