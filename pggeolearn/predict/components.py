"""Connected components of a class raster in numpy: 4-connected pixels of one class are one
component. Labelling costs a few vectorized passes over the pixels, whatever the number of
components, so noise can be measured and left out before anything is vectorized. Pure; no
database."""

from __future__ import annotations

import numpy as np

__all__ = ["label_components"]


def _roots(parent: np.ndarray) -> np.ndarray:
    """``parent`` with every entry pointing at its root (pointer jumping)."""
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            return parent
        parent = up


def label_components(cls: np.ndarray, skip: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, classes): ``labels`` (int32, the shape of ``cls``) numbers the 4-connected
    components of equal values 1..n in raster order of their first pixel, 0 where ``cls`` is one
    of ``skip``; ``classes[k - 1]`` is the value of component k.

    Row runs first (each pixel points at its run's first pixel), then union-find over all
    vertical pairs at once: every root is hooked to the smallest root it shares a pair with,
    every pointer jumps to its root, repeated until no pair joins two roots (a few rounds).
    Parents only ever point at smaller indices, so there are no cycles."""
    h, w = cls.shape
    flat = cls.ravel()
    fg = ~np.isin(flat, skip)
    joined_left = np.zeros(h * w, bool)  # pixel x continues the run of pixel x - 1
    joined_left[1:] = fg[:-1] & fg[1:] & (flat[:-1] == flat[1:])
    joined_left[::w] = False  # the first pixel of a row does not continue the row above
    # every pixel of a row run points at the run's first pixel; then only vertical pairs remain
    parent = np.maximum.accumulate(np.where(joined_left, 0, np.arange(h * w, dtype=np.int64)))
    a = np.flatnonzero(fg[:-w] & fg[w:] & (flat[:-w] == flat[w:]))
    b = a + w
    while a.size:
        ra, rb = parent[a], parent[b]
        apart = ra != rb
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        if not a.size:
            break
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        parent = _roots(parent)
    labels = np.zeros(h * w, np.int32)
    roots, inverse = np.unique(parent[fg], return_inverse=True)
    labels[fg] = inverse + 1
    return labels.reshape(h, w), flat[roots]
