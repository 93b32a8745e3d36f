"""Sliding windows and stitching: where each window of the model's ``tile_px`` reads and
writes, and the accumulator that turns window probabilities into finished output rows.

Windows advance by ``stride = tile_px - overlap``; window ``(r, c)`` starts at pixel
``(r * stride - overlap // 2, c * stride - overlap // 2)``, so it reads real imagery beyond the
extent's edges as context. ``centre``: each window contributes only its central
``stride x stride`` block, so every pixel comes from exactly one window and a
translation-equivariant model whose receptive field is at most ``overlap // 2`` pixels gives
exactly the result of predicting the whole area at once (no seam). ``blend``: every window
contributes all its pixels, weighted by ``sin^2`` (never 0) and averaged; seams fade out.
Pure numpy; no database.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from pggeolearn import errors

__all__ = ["STITCH_MODES", "Stitcher", "needed_windows", "window_weights"]

STITCH_MODES = ("centre", "blend")


def window_weights(window: int) -> np.ndarray:
    """The blend weight of a window: ``sin^2`` (a Hann window) per axis, > 0 everywhere."""
    w = np.sin(np.pi * (np.arange(window) + 0.5) / window) ** 2
    return np.outer(w, w).astype(np.float32)


class Stitcher:
    """Accumulates window probabilities into output rows and hands out finished row blocks.

    ``add(r, c, probs, valid)`` for every window of window-row ``r``, then ``finish_row(r)``
    yields ``(row0, probs (K, n, width) float32, valid (n, width) bool)`` for each block of
    ``tile_px`` output rows (the last one shorter) whose pixels no later window touches.
    ``valid`` is False where no window saw imagery. Memory: ``(K + 1) x (tile_px + window + 1)
    x width`` float32.
    """

    def __init__(self, width: int, height: int, *, window: int, overlap: int, mode: str,
                 n_classes: int, tile_px: int):
        if mode not in STITCH_MODES:
            raise errors.ConfigError(f"stitch must be one of {', '.join(STITCH_MODES)}, not {mode!r}")
        if not 0 <= overlap < window:
            raise errors.ConfigError(f"overlap must be 0..{window - 1} pixels (window {window}), not {overlap}")
        self.width, self.height, self.window, self.overlap = width, height, window, overlap
        self.mode, self.tile_px, self.n_classes = mode, tile_px, n_classes
        self.stride = window - overlap
        self.half = overlap // 2
        self.ncols = max(1, math.ceil(width / self.stride))
        self.nrows = max(1, math.ceil(height / self.stride))
        self.cap = tile_px + window + 1
        self.acc = np.zeros((n_classes, self.cap, width), np.float32)
        self.wsum = np.zeros((self.cap, width), np.float32)
        self.base = 0  # output row of acc[:, 0]
        self.weights = window_weights(window) if mode == "blend" else None

    @property
    def band_width(self) -> int:
        """Columns of imagery one row band needs: from ``-half`` to the last window's right."""
        return (self.ncols - 1) * self.stride + self.window

    def origin(self, r: int, c: int) -> tuple[int, int]:
        """Output pixel (row, col) of window (r, c)'s upper-left corner (may be negative)."""
        return r * self.stride - self.half, c * self.stride - self.half

    def contribution(self, r: int, c: int) -> tuple[int, int, int, int]:
        """Output rows [r0, r1) and columns [c0, c1) window (r, c) writes to."""
        s = self.stride
        if self.mode == "centre":
            return r * s, min((r + 1) * s, self.height), c * s, min((c + 1) * s, self.width)
        top, left = self.origin(r, c)
        return (max(top, 0), min(top + self.window, self.height),
                max(left, 0), min(left + self.window, self.width))

    def add(self, r: int, c: int, probs: np.ndarray, valid: np.ndarray) -> None:
        top, left = self.origin(r, c)
        r0, r1, c0, c1 = self.contribution(r, c)
        if r1 <= r0 or c1 <= c0:
            return
        wr, wc = slice(r0 - top, r1 - top), slice(c0 - left, c1 - left)
        ar = slice(r0 - self.base, r1 - self.base)
        if ar.start < 0 or ar.stop > self.cap:
            raise RuntimeError(f"window ({r}, {c}) outside the stitcher's buffer")
        v = valid[wr, wc].astype(np.float32)
        if self.mode == "centre":
            self.acc[:, ar, c0:c1] = probs[:, wr, wc] * v
            self.wsum[ar, c0:c1] = v
        else:
            w = self.weights[wr, wc] * v
            self.acc[:, ar, c0:c1] += probs[:, wr, wc] * w
            self.wsum[ar, c0:c1] += w

    def final_rows(self, r: int) -> int:
        """Output rows [0, n) that no window after window-row ``r`` changes."""
        if r >= self.nrows - 1:
            return self.height
        nxt = (r + 1) * self.stride
        return min(self.height, nxt if self.mode == "centre" else nxt - self.half)

    def finish_row(self, r: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        final = self.final_rows(r)
        while self.base < self.height and (final - self.base >= self.tile_px or final == self.height):
            n = min(self.tile_px, self.height - self.base)
            w = self.wsum[:n]
            valid = w > 0
            probs = np.divide(self.acc[:, :n], w, out=np.zeros((self.n_classes, n, self.width),
                                                                np.float32), where=valid)
            row0 = self.base
            self.acc[:, : self.cap - n] = self.acc[:, n:]
            self.acc[:, self.cap - n:] = 0
            self.wsum[: self.cap - n] = self.wsum[n:]
            self.wsum[self.cap - n:] = 0
            self.base += n
            yield row0, probs, valid


def needed_windows(st: Stitcher, needed_tiles: np.ndarray, tile_px: int) -> np.ndarray:
    """(window rows, window cols) bool: the windows that write into a needed output tile."""
    out = np.zeros((st.nrows, st.ncols), bool)
    for r in range(st.nrows):
        for c in range(st.ncols):
            r0, r1, c0, c1 = st.contribution(r, c)
            if r1 <= r0 or c1 <= c0:
                continue
            out[r, c] = needed_tiles[r0 // tile_px:(r1 - 1) // tile_px + 1,
                                     c0 // tile_px:(c1 - 1) // tile_px + 1].any()
    return out

