"""Pictures of training data: ``show-batch`` draws one batch of a stream as a PNG.

Each chip (augmented as the training loop sees it, when asked) with its label drawn over it in
translucent class colours (:mod:`pggeolearn.palette`, the colours of the QGIS styles), in a
grid. Pillow and the stream are imported when a picture is drawn, not with this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pggeolearn import errors
from pggeolearn.palette import class_colour

__all__ = ["GAP_PX", "MIN_CELL_PX", "ShowBatchResult", "class_colour", "show_batch", "to_rgb"]

MIN_CELL_PX = 128
GAP_PX = 4


def to_rgb(image: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` -> ``(H, W, 3)`` uint8: the first three bands (or grey), stretched to
    2-98 % when the pixels are not uint8."""
    bands = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    if bands.dtype != np.uint8:
        out = np.empty(bands.shape, np.uint8)
        for i, b in enumerate(bands.astype(np.float64)):
            lo, hi = np.percentile(b, (2, 98))
            out[i] = np.clip((b - lo) / max(hi - lo, 1e-12) * 255, 0, 255)
        bands = out
    return np.ascontiguousarray(np.moveaxis(bands, 0, -1))


@dataclass
class ShowBatchResult:
    path: Path
    size: tuple[int, int]
    tiles: list[int]
    classes: dict[int, str]

    def __str__(self) -> str:
        legend = ", ".join(f"{k}={v} rgb{class_colour(k)}" for k, v in self.classes.items())
        return (f"wrote {self.path} ({self.size[0]}x{self.size[1]} px, tiles "
                f"{', '.join(map(str, self.tiles))}); overlay colours: {legend}")


def show_batch(dsn: str | None, dataset: str, *, out: str | Path, split: str = "train", n: int = 8,
               augment: bool = False, seed: int = 0, epoch: int = 0, alpha: float = 0.45,
               columns: int = 4) -> ShowBatchResult:
    """Write one batch of ``dataset``/``split`` as a PNG: each chip (augmented if asked) with
    its label drawn over it in translucent class colours, in a grid of ``columns``."""
    from PIL import Image

    from pggeolearn.stream import GeoStream

    if n < 1:
        raise errors.ConfigError("n must be >= 1")
    with GeoStream(dsn, dataset, split=split, batch_size=n, seed=seed, epoch=epoch,
                   augment=augment, normalize=False, prefetch=1, max_batches=1) as stream:
        batch = next(iter(stream), None)
        classes = stream.classes
    if batch is None:
        raise errors.NotBuilt(f"dataset {dataset} has no chips in split {split}")
    shown = n - batch["pad"]
    _, h, w = batch["image"].shape[1:]
    scale = max(1, math.ceil(MIN_CELL_PX / max(h, w)))
    cols = min(columns, shown)
    rows = math.ceil(shown / cols)
    size = (cols * w * scale + (cols + 1) * GAP_PX, rows * h * scale + (rows + 1) * GAP_PX)
    canvas = np.full((size[1], size[0], 3), 32, np.uint8)
    lut = np.zeros((256, 3), np.float32)
    for k in range(1, 256):
        lut[k] = class_colour(k)
    for i in range(shown):
        rgb = to_rgb(batch["image"][i]).astype(np.float32)
        lab = batch["label"][i]
        mask = (lab > 0)[..., None]
        cell = np.where(mask, (1 - alpha) * rgb + alpha * lut[lab], rgb).astype(np.uint8)
        cell = cell.repeat(scale, axis=0).repeat(scale, axis=1)
        r, c = divmod(i, cols)
        y0 = GAP_PX + r * (h * scale + GAP_PX)
        x0 = GAP_PX + c * (w * scale + GAP_PX)
        canvas[y0:y0 + h * scale, x0:x0 + w * scale] = cell
    path = Path(out)
    if path.parent and not path.parent.exists():
        raise errors.ConfigError(f"folder {path.parent} does not exist")
    Image.fromarray(canvas, "RGB").save(path, format="PNG")
    return ShowBatchResult(path, size, [int(t) for t in batch["tile_id"][:shown]], classes)
