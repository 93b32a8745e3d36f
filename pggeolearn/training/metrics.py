"""Segmentation metrics in numpy: confusion matrix, per-class IoU and F1, mean IoU, and the
trivial baselines a model must beat on the same split.

Conventions: class ids are array indices (0 = background); ``cm[t, p]`` counts pixels of true
class ``t`` predicted as ``p``. A class that appears neither in the truth nor in the prediction
has an undefined IoU/F1 (NaN) and is left out of the means; every other class counts, so a
class the model never predicts pulls the mean down.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "IGNORE", "Scores", "baselines", "confusion_matrix", "constant_prediction_cm", "f1_per_class",
    "format_table", "iou_per_class", "mean_iou", "pixel_accuracy", "scores",
]


#: Truth value of pixels left out of losses and metrics (NODATA, classes the model lacks).
IGNORE = 255


def confusion_matrix(pred: np.ndarray, true: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` int64 counts of (true, predicted) class pairs. Values outside ``0..K-1`` in
    either array are ignored (they cannot be a class of the model)."""
    pred = np.asarray(pred).ravel()
    true = np.asarray(true).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"prediction and truth differ in size: {pred.size} vs {true.size}")
    k = int(num_classes)
    t = true.astype(np.int64)
    p = pred.astype(np.int64)
    ok = (t >= 0) & (t < k) & (p >= 0) & (p < k)
    if not ok.all():
        t, p = t[ok], p[ok]
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """TP / (TP + FP + FN) per class; NaN where the class is in neither truth nor prediction."""
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def f1_per_class(cm: np.ndarray) -> np.ndarray:
    """2 TP / (2 TP + FP + FN) per class (the Dice score); NaN where undefined."""
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    denom = cm.sum(0) + cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / denom, np.nan)


def mean_iou(cm: np.ndarray) -> float:
    """Mean of the defined per-class IoUs (NaN when none is defined)."""
    iou = iou_per_class(cm)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan


def pixel_accuracy(cm: np.ndarray) -> float:
    cm = np.asarray(cm)
    total = cm.sum()
    return float(np.trace(cm) / total) if total else math.nan


@dataclass
class Scores:
    """Metrics of one prediction over one split."""

    miou: float
    iou: list[float]
    f1: list[float]
    accuracy: float
    pixels: int
    loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_f1(self) -> float:
        f = np.asarray(self.f1, np.float64)
        return float(np.nanmean(f)) if np.isfinite(f).any() else math.nan

    def to_json(self) -> dict[str, Any]:
        """JSON-safe (NaN -> None)."""
        def clean(v):
            return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v
        return {"miou": clean(self.miou), "iou": [clean(v) for v in self.iou],
                "f1": [clean(v) for v in self.f1], "accuracy": clean(self.accuracy),
                "pixels": self.pixels, "loss": clean(self.loss), **self.extra}


def scores(cm: np.ndarray, loss: float | None = None) -> Scores:
    """All metrics of a confusion matrix."""
    cm = np.asarray(cm)
    return Scores(miou=mean_iou(cm), iou=[float(v) for v in iou_per_class(cm)],
                  f1=[float(v) for v in f1_per_class(cm)], accuracy=pixel_accuracy(cm),
                  pixels=int(cm.sum()), loss=loss)


def constant_prediction_cm(true_counts: Sequence[int] | np.ndarray, cls: int,
                           num_classes: int) -> np.ndarray:
    """The confusion matrix of predicting class ``cls`` for every pixel, given the number of
    pixels of each true class (no model needed)."""
    counts = np.zeros(num_classes, np.int64)
    tc = np.asarray(true_counts, np.int64)[:num_classes]
    counts[: len(tc)] = tc
    cm = np.zeros((num_classes, num_classes), np.int64)
    cm[:, cls] = counts
    return cm


def baselines(true_counts: Sequence[int] | np.ndarray, train_counts: Sequence[int] | np.ndarray | None,
              num_classes: int) -> dict[str, Scores]:
    """The trivial predictions on a split whose true class pixel counts are ``true_counts``:

    * ``all background``: class 0 everywhere;
    * ``majority class``: everywhere the class with the most pixels in the *train* split
      (``train_counts``; the split's own counts when not given). It equals ``all background``
      whenever background is the majority, which its ``extra["same_as"]`` says.
    """
    out = {"all background": scores(constant_prediction_cm(true_counts, 0, num_classes))}
    ref = np.asarray(train_counts if train_counts is not None else true_counts, np.int64)
    majority = int(np.argmax(ref[:num_classes])) if ref.size else 0
    maj = scores(constant_prediction_cm(true_counts, majority, num_classes))
    maj.extra["class"] = majority
    if majority == 0:
        maj.extra["same_as"] = "all background"
    out["majority class"] = maj
    return out


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}"


def format_table(rows: Mapping[str, Scores], class_names: Sequence[str]) -> str:
    """A text table: one row per named result, columns mIoU, IoU and F1 per class, accuracy."""
    headers = ["", "mIoU"] + [f"IoU {n}" for n in class_names] + [f"F1 {n}" for n in class_names] \
        + ["pixel acc"]
    body = []
    for name, s in rows.items():
        body.append([name, _fmt(s.miou)] + [_fmt(v) for v in s.iou] + [_fmt(v) for v in s.f1]
                    + [_fmt(s.accuracy)])
    return text_table(headers, body)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column, right-aligned others, two spaces between columns."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for r in [headers, *rows]:
        cells = [str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i])
                 for i, c in enumerate(r)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
