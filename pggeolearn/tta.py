"""Test-time augmentation: a model's probabilities averaged over flipped and rotated copies.

:class:`TTA` wraps any predictor (an object with ``predict_proba(images (N, C, H, W)) ->
(N, K, H, W)``, such as a registry model) and is one itself: each batch is predicted as the 8
symmetries of the square (flips and 90° rotations, the same group ``--augment`` trains with; the
4 flips when tiles are not square), each result is turned back, and the probabilities are
averaged. 8x the compute for smoother, usually better maps (see the README's model table).
Pure numpy: it works for MXNet, PyTorch and models from outside the registry alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Transform = tuple[int, bool]  # (quarter turns, flip left-right first)


def transforms(square: bool) -> list[Transform]:
    """The symmetries used: all 8 of the square, or the 4 flips (2 turns = both flips)."""
    if square:
        return [(k, f) for f in (False, True) for k in range(4)]
    return [(0, False), (0, True), (2, False), (2, True)]


def forward(x: np.ndarray, t: Transform) -> np.ndarray:
    k, flip = t
    if flip:
        x = x[..., ::-1]
    return np.rot90(x, k, axes=(-2, -1))


def backward(y: np.ndarray, t: Transform) -> np.ndarray:
    k, flip = t
    y = np.rot90(y, -k, axes=(-2, -1))
    return y[..., ::-1] if flip else y


def average(predict_proba: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    """Mean of ``predict_proba`` over the symmetries of ``images`` ``(N, C, H, W)``."""
    images = np.asarray(images)
    total: np.ndarray | None = None
    ts = transforms(images.shape[-1] == images.shape[-2])
    for t in ts:
        y = backward(np.asarray(predict_proba(np.ascontiguousarray(forward(images, t)))), t)
        total = y.astype(np.float32, copy=True) if total is None else total + y
    return total / len(ts)


class TTA:
    """A predictor that averages ``inner``'s probabilities over flips and rotations; every
    other attribute (name, classes, tile size, ...) is the inner model's."""

    def __init__(self, inner: Any):
        self.inner = inner

    def predict_proba(self, images: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        return average(lambda x: self.inner.predict_proba(x, *args, **kwargs), images)

    def predict(self, images: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        ids = np.asarray(getattr(self.inner, "class_ids", np.arange(256, dtype=np.uint8)))
        return ids[self.predict_proba(images, *args, **kwargs).argmax(axis=1)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"TTA({self.inner!r})"
