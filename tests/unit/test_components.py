"""Connected components of a class raster (``pggeolearn.predict.components``) against GDAL's
polygonizer (``rasterio.features.shapes``, 4-connectivity): the same objects, pixel for pixel."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from rasterio import features
from rasterio.transform import Affine

from pggeolearn.predict.components import label_components


def gdal_components(cls: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(class, pixel mask) of every 4-connected component GDAL polygonizes (0 and 255 skipped)."""
    mask = (cls != 0) & (cls != 255)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # identity transform
        shapes = features.shapes(cls, mask=mask, connectivity=4, transform=Affine.identity())
        return [(int(v), features.rasterize([g], out_shape=cls.shape, transform=Affine.identity()) > 0)
                for g, v in shapes]


def spiral(n: int) -> np.ndarray:
    """One 1 px wide path winding inwards: a single component with a very long chain."""
    out = np.zeros((n, n), np.uint8)
    r, c, dr, dc = 0, 0, 0, 1
    for length in range(n - 1, 0, -2):
        for _ in range(2):
            for _ in range(length):
                out[r, c] = 1
                r, c = r + dr, c + dc
            dr, dc = dc, -dr
    return out


RNG = np.random.default_rng(0)
CASES = {
    "speckle": (RNG.random((64, 80)) < 0.4).astype(np.uint8),
    "three classes": RNG.integers(0, 3, (48, 48)).astype(np.uint8),
    "nodata and classes": np.where(RNG.random((40, 40)) < 0.2, 255, RNG.integers(0, 3, (40, 40))).astype(np.uint8),
    "spiral": spiral(61),
    "one row": (RNG.random((1, 50)) < 0.5).astype(np.uint8),
    "one column": (RNG.random((50, 1)) < 0.5).astype(np.uint8),
    "empty": np.zeros((16, 16), np.uint8),
}


@pytest.mark.parametrize("name", CASES)
def test_components_are_gdals(name):
    cls = CASES[name]
    labels, classes = label_components(cls, (0, 255))
    want = gdal_components(cls)
    assert labels.max() == len(classes) == len(want)
    got = {(int(classes[k - 1]), (labels == k).tobytes()) for k in range(1, len(classes) + 1)}
    assert got == {(c, m.tobytes()) for c, m in want}
    assert np.array_equal(labels == 0, (cls == 0) | (cls == 255))


def test_spiral_is_one_component_and_rows_do_not_wrap():
    labels, classes = label_components(spiral(61), (0,))
    assert len(classes) == 1
    wrap = np.zeros((3, 4), np.uint8)
    wrap[0, 3] = wrap[1, 0] = 1  # consecutive in memory, not neighbours
    labels, classes = label_components(wrap, (0,))
    assert len(classes) == 2 and labels[0, 3] != labels[1, 0]
