"""What happens to a chip between the wire and the batch: augmentation, normalization, dtype.

* **Augmentation**: one of the 8 flips/90° rotations per (seed, epoch, tile_id)
  (:func:`aug_code`, :func:`dihedral`), the same for image, label and validity mask.
* **Normalization**: ``(image - mean) / std`` per band (:func:`normalize`); the mean and std
  come from the dataset's band statistics or the caller (:func:`resolve_normalization`).
* **dtype**: batches keep the chips' own dtype unless a float dtype is asked for
  (:func:`output_dtype`); only float batches are normalized in the stream.

:class:`Transforms` applies all three to one chip as it is written into its batch slot.
Only numpy is imported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pggeolearn import errors

__all__ = [
    "Transforms",
    "aug_code",
    "dihedral",
    "normalize",
    "output_dtype",
    "resolve_normalization",
]


def aug_code(seed: int, epoch: int, tile_id: int) -> int:
    """Which of the 8 flips/rotations tile ``tile_id`` gets in ``epoch`` (0 = unchanged)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(tile_id)]).generate_state(1)[0] % 8)


def dihedral(arr: np.ndarray, code: int) -> np.ndarray:
    """A view of ``arr`` (``(..., H, W)``) rotated by ``90° * (code % 4)`` then, when
    ``code >= 4``, flipped left-right. Non-square arrays only get 180° rotations and flips."""
    rot = code % 4
    if arr.shape[-1] != arr.shape[-2]:
        rot = 2 * (rot % 2)
    out = np.rot90(arr, rot, axes=(-2, -1)) if rot else arr
    return out[..., ::-1] if code >= 4 else out


def normalize(images: np.ndarray, mean: np.ndarray | None, std: np.ndarray | None) -> np.ndarray:
    """``(images - mean) / std`` per band as float32 (``(N, C, H, W)`` or ``(C, H, W)``);
    a plain float32 cast when there is no normalization."""
    out = np.asarray(images, dtype=np.float32)
    if out is images:
        out = out.copy()
    if mean is None:
        return out
    shape = (-1, 1, 1)
    out -= np.asarray(mean, np.float32).reshape(shape)
    out /= np.asarray(std, np.float32).reshape(shape)
    return out


def resolve_normalization(norm: bool | None | tuple[Sequence[float], Sequence[float]],
                          stats: dict | None, bands: int, dataset: str
                          ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(mean, std)`` per band (float32), or ``(None, None)``: what a stream's ``normalize=``
    means for a dataset with band statistics ``stats`` (``{"bands": [{"mean", "std"}, ...]}``).

    ``None``: the statistics when there are some; ``True``: they are required; ``False``: none;
    ``(mean, std)``: those (scalars apply to every band)."""
    if norm is False:
        return None, None
    if norm is None or norm is True:
        band_stats = (stats or {}).get("bands")
        if not band_stats:
            if norm:
                raise errors.ConfigError(
                    f"dataset {dataset} has no band statistics yet (build its chips), "
                    "pass normalize=(mean, std) or normalize=False")
            return None, None
        mean = [b["mean"] for b in band_stats]
        # a constant band (std 0, e.g. an all-zero or alpha band) is only centred
        std = [b["std"] if b.get("std") and math.isfinite(b["std"]) and b["std"] > 0 else 1.0
               for b in band_stats]
    else:
        try:
            mean, std = norm
        except (TypeError, ValueError):
            raise errors.ConfigError("normalize must be True, False, None or (mean, std)") from None
    m = np.broadcast_to(np.asarray(mean, np.float32), (bands,)).copy() if np.ndim(mean) == 0 \
        else np.asarray(mean, np.float32)
    s = np.broadcast_to(np.asarray(std, np.float32), (bands,)).copy() if np.ndim(std) == 0 \
        else np.asarray(std, np.float32)
    if m.shape != (bands,) or s.shape != (bands,):
        raise errors.ConfigError(
            f"normalization needs {bands} means and stds (one per band), got {m.size} and {s.size}")
    if not np.all(s > 0):
        raise errors.ConfigError(f"normalization std must be > 0, got {s.tolist()}")
    return m, s


def output_dtype(dtype: str | np.dtype | None, image_dtype: np.dtype) -> np.dtype:
    """The batches' image dtype: the chips' own (``dtype=None``) or a float type."""
    out = image_dtype if dtype is None else np.dtype(dtype)
    if out.kind != "f" and out != image_dtype:
        raise errors.ConfigError(
            f"dtype must be the chips' own ({image_dtype}) or a float type, not {out}")
    return out


@dataclass(eq=False)
class Transforms:
    """Augmentation (``augment``, seeded by ``seed``), normalization (``mean``/``std``, applied
    when ``out_dtype`` is a float type) and the cast to ``out_dtype``, for one chip at a time."""

    out_dtype: np.dtype
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    augment: bool = False
    seed: int = 0
    normalizes: bool = field(init=False)

    def __post_init__(self) -> None:
        self.out_dtype = np.dtype(self.out_dtype)
        self.normalizes = self.out_dtype.kind == "f" and self.mean is not None

    def orient(self, epoch: int, tile_id: int, image: np.ndarray | None, label: np.ndarray,
               valid: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """Views of ``(image, label, valid)`` with the chip's flip/rotation of ``epoch``."""
        if not self.augment:
            return image, label, valid
        code = aug_code(self.seed, epoch, tile_id)
        return (None if image is None else dihedral(image, code), dihedral(label, code),
                dihedral(valid, code))

    def write(self, out: np.ndarray, image: Any) -> None:
        """``image`` (``(C, H, W)``, the chip's dtype; None: no imagery) into batch slot
        ``out``, cast, with the mean subtracted when normalizing (see :meth:`finish`)."""
        if image is None:
            out[...] = 0 if not self.normalizes else -self.mean.reshape(-1, 1, 1)
        elif self.normalizes:
            # cast and subtract the mean in one pass; the batch is divided by std when full
            np.subtract(image, self.mean.reshape(-1, 1, 1), out=out, casting="unsafe")
        else:
            np.copyto(out, image, casting="unsafe")

    def finish(self, images: np.ndarray) -> None:
        """A full batch's ``(N, C, H, W)`` images: divided by std when normalizing."""
        if self.normalizes:
            images *= (1.0 / self.std).astype(self.out_dtype).reshape(-1, 1, 1)
