"""Test-time augmentation: every symmetry is undone exactly, and the average is taken over them."""

from __future__ import annotations

import numpy as np
import pytest

from pggeolearn import tta


def softmax_of_pixels(images: np.ndarray) -> np.ndarray:
    """A per-pixel model (commutes with every flip and rotation): 2 classes from band sums."""
    s = images.astype(np.float32).sum(axis=1, keepdims=True)
    z = np.concatenate([s, -s], axis=1) / 100.0
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("square", [True, False])
def test_every_transform_is_undone(square):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (2, 3, 8, 8 if square else 6)).astype(np.uint8)
    ts = tta.transforms(square)
    assert len(ts) == (8 if square else 4)
    assert len(set(ts)) == len(ts)
    outs = set()
    for t in ts:
        y = tta.forward(x, t)
        assert y.shape[-2:] == x.shape[-2:] or (y.shape[-2:] == x.shape[-2:][::-1])
        assert np.array_equal(tta.backward(y, t), x)
        outs.add(y.tobytes())
    assert len(outs) == len(ts)  # all different views of a random image


def test_a_pixelwise_model_is_unchanged():
    x = np.random.default_rng(1).integers(0, 255, (3, 3, 16, 16)).astype(np.uint8)
    np.testing.assert_allclose(tta.average(softmax_of_pixels, x), softmax_of_pixels(x), rtol=1e-6)


def test_a_position_dependent_model_is_averaged_over_the_views():
    """A 'model' that predicts class 0 on the left half only: averaged over the 8 symmetries,
    every corner quadrant has been 'left' in exactly half of the views."""

    def left_half(images):
        n, _, h, w = images.shape
        p = np.zeros((n, 2, h, w), np.float32)
        p[:, 0, :, : w // 2] = 1
        p[:, 1, :, w // 2:] = 1
        return p

    x = np.zeros((1, 3, 8, 8), np.uint8)
    avg = tta.average(left_half, x)
    np.testing.assert_allclose(avg.sum(axis=1), 1.0)
    np.testing.assert_allclose(avg[0, 0, 0, 0], 0.5)
    np.testing.assert_allclose(avg[0, 0, 7, 7], 0.5)


def test_the_wrapper_keeps_the_models_attributes():
    class Model:
        name = "m"
        class_ids = np.array([0, 5], np.uint8)

        def predict_proba(self, images):
            return softmax_of_pixels(images)

    wrapped = tta.TTA(Model())
    assert wrapped.name == "m"
    x = np.full((1, 3, 4, 4), 200, np.uint8)
    assert set(np.unique(wrapped.predict(x))) == {0}
    assert wrapped.predict_proba(x).shape == (1, 2, 4, 4)
