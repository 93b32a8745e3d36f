"""Batches: the arrays a stream yields, filled chip by chip from raster WKB.

A batch is a dict with the fixed keys :data:`BATCH_KEYS`: ``image`` ``(N, C, H, W)``,
``label`` ``(N, H, W)`` uint8, ``valid`` ``(N, H, W)`` bool, ``tile_id`` ``(N,)``,
``transform`` ``(N, 6)``, ``srid`` ``(N,)`` and ``pad``. :class:`BatchAssembler` decodes each
row's WKB with :mod:`pggeolearn.wkb` (zero-copy views), checks it against the chips' format
(:class:`ChipFormat`), applies the :class:`~pggeolearn.stream.transforms.Transforms` and writes
it straight into a batch allocated once per batch; full batches go to ``emit``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pggeolearn import errors, wkb
from pggeolearn.stream.transforms import Transforms

__all__ = ["BATCH_KEYS", "Batch", "BatchAssembler", "ChipFormat", "new_batch"]

BATCH_KEYS = ("image", "label", "valid", "tile_id", "transform", "srid", "pad")

Batch = dict[str, Any]


@dataclass(frozen=True)
class ChipFormat:
    """What every chip of a dataset looks like on the wire: ``image_shape`` ``(C, H, W)`` and
    the pixel ``dtype`` of its image; labels are one uint8 band of ``(H, W)``."""

    image_shape: tuple[int, int, int]
    dtype: np.dtype

    @property
    def label_shape(self) -> tuple[int, int]:
        return self.image_shape[1:]

    @property
    def row_bytes(self) -> int:
        """About how many bytes one chip row takes on the wire."""
        return math.prod(self.image_shape) * self.dtype.itemsize + math.prod(self.label_shape) + 200


def new_batch(batch_size: int, image_shape: tuple[int, int, int], image_dtype: np.dtype) -> Batch:
    """An empty (uninitialized) batch."""
    b = batch_size
    c, h, w = image_shape
    return {
        "image": np.empty((b, c, h, w), image_dtype),
        "label": np.empty((b, h, w), np.uint8),
        "valid": np.empty((b, h, w), bool),
        "tile_id": np.empty(b, np.int64),
        "transform": np.empty((b, 6), np.float64),
        "srid": np.empty(b, np.int32),
        "pad": 0,
    }


class BatchAssembler:
    """Chips at positions 0, 1, 2, ... of an epoch's delivery order into batches of
    ``batch_size``; batch ``k`` gets ``pads[k]`` and is handed to ``emit`` when full.

    ``live``: a chip without imagery (a computed tile where there is none) is all zeros
    (counted in ``stats["empty_tiles"]``) instead of a ChipError."""

    def __init__(self, *, batch_size: int, pads: np.ndarray, chip: ChipFormat, transforms: Transforms,
                 epoch: int, dataset: str, live: bool, stats: dict[str, Any],
                 emit: Callable[[Batch], None]):
        self.batch_size, self.pads, self.chip = batch_size, pads, chip
        self.transforms, self.epoch, self.dataset, self.live = transforms, epoch, dataset, live
        self.stats, self.emit = stats, emit
        self._batch: Batch | None = None

    def place(self, pos: int, tile_id: int, image: Any, label: Any) -> None:
        """The chip at position ``pos`` (its image and label WKB, or None)."""
        k, slot = divmod(pos, self.batch_size)
        if slot == 0:
            self._batch = new_batch(self.batch_size, self.chip.image_shape, self.transforms.out_dtype)
        batch = self._batch
        img_view, lab_view, gt, srid, valid = self._decode(tile_id, image, label)
        img_view, lab_view, valid = self.transforms.orient(self.epoch, tile_id, img_view, lab_view, valid)
        self.transforms.write(batch["image"][slot], img_view)
        np.copyto(batch["label"][slot], lab_view)
        batch["valid"][slot] = valid
        batch["tile_id"][slot] = tile_id
        batch["transform"][slot] = gt
        batch["srid"][slot] = srid
        if slot == self.batch_size - 1:
            batch["pad"] = int(self.pads[k])
            self.transforms.finish(batch["image"])
            self._batch = None
            self.emit(batch)

    def _decode(self, tile_id: int, image: Any, label: Any):
        name = f"chip {tile_id} of dataset {self.dataset}"
        if label is None:
            raise errors.ChipError(f"{name} has no label (NULL or missing chip)")
        try:
            lab = wkb.decode(label)
        except errors.RasterFormatError as exc:
            raise errors.ChipError(f"{name}: label: {exc}") from None
        shape, dtype = self.chip.image_shape, self.chip.dtype
        h, w = shape[1:]
        if lab.data.shape != (1, h, w) or lab.data.dtype != np.uint8:
            raise errors.ChipError(f"{name}: label is {lab.data.shape[0]} band(s) of "
                                   f"{'/'.join(lab.pixel_types)} {lab.width}x{lab.height}, "
                                   f"expected one 8BUI band of {w}x{h}")
        if image is None:
            if self.live:
                self.stats["empty_tiles"] += 1
                return None, lab.data[0], lab.geotransform, lab.srid, np.zeros((h, w), bool)
            raise errors.ChipError(f"{name} has no image (NULL or missing chip)")
        try:
            img = wkb.decode(image)
        except errors.RasterFormatError as exc:
            raise errors.ChipError(f"{name}: image: {exc}") from None
        if img.data.shape != shape or img.data.dtype.newbyteorder("=") != dtype:
            raise errors.ChipError(
                f"{name}: image is {img.bands} band(s) of {'/'.join(img.pixel_types) or '-'} "
                f"{img.width}x{img.height}, expected {shape[0]} band(s) of {dtype} {w}x{h}")
        return img.data, lab.data[0], img.geotransform, img.srid, img.valid()
