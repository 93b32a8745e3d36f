"""What the training modules share: the architecture a model is, device strings, out-of-memory
errors, padding to the network's stride, JSON-safe numbers. Pure (numpy only), so the framework
modules, the loop and the registry all import it and none of them imports another."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pggeolearn import errors

BLOCKS = ("plain", "residual")
HEADS = ("refine", "bilinear")
LOSSES = ("ce", "ce+dice")
# data parallel (train --nproc): called by train_step with this rank's loss weight sum before
# the forward pass; returns what every rank agreed on: (the global batch's weight sum, the lr)
StepSync = Callable[[float], tuple[float, float]]
DEVICE_RE = re.compile(r"^(auto|cpu|gpu)(?::(\d+(?:,\d+)*))?$")


@dataclass(frozen=True)
class Architecture:
    """What the U-Net is: ``depth`` poolings, ``width`` channels at the first level (doubling
    at each level), an optional stride-2 stem (the encoder at half resolution)."""

    in_channels: int
    num_classes: int
    width: int = 16
    depth: int = 3
    stem_stride: int = 2
    name: str = "unet"
    block: str = "plain"  # "residual": each level's two convolutions get a shortcut
    head: str = "refine"  # after a stem: "refine" (a full-resolution conv with the input) or "bilinear"

    @property
    def channels(self) -> list[int]:
        """Channels of each encoder level (``depth + 1`` levels)."""
        return [self.width * 2 ** i for i in range(self.depth + 1)]

    @property
    def multiple(self) -> int:
        """Image height and width must be multiples of this (other sizes are padded)."""
        return 2 ** self.depth * self.stem_stride

    def validate(self) -> None:
        if self.name != "unet":
            raise errors.ConfigError(f"unknown architecture {self.name!r} (known: unet)")
        if not 1 <= self.depth <= 6:
            raise errors.ConfigError(f"depth must be 1..6, not {self.depth}")
        if not 2 <= self.width <= 512:
            raise errors.ConfigError(f"width must be 2..512, not {self.width}")
        if self.block not in BLOCKS:
            raise errors.ConfigError(f"block must be one of {', '.join(BLOCKS)}, not {self.block!r}")
        if self.head not in HEADS:
            raise errors.ConfigError(f"head must be one of {', '.join(HEADS)}, not {self.head!r}")
        if self.stem_stride not in (1, 2, 4):
            raise errors.ConfigError(f"stem stride must be 1, 2 or 4, not {self.stem_stride}")
        if self.in_channels < 1 or self.num_classes < 2:
            raise errors.ConfigError("a model needs at least 1 input band and 2 classes")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Architecture:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def parse_device(device: str | None) -> tuple[str, list[int] | None]:
    """``auto``, ``cpu``, ``gpu`` (all GPUs) or ``gpu:N[,M...]`` -> ``(kind, ids)``."""
    m = DEVICE_RE.match((device or "auto").strip().lower())
    if not m or (m.group(1) != "gpu" and m.group(2)):
        raise errors.ConfigError(f"bad device {device!r}: use auto, cpu, gpu or gpu:N[,M...]")
    ids = [int(i) for i in m.group(2).split(",")] if m.group(2) else None
    return m.group(1), ids


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error of either framework (matched on its message)."""
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


def oom_error(batch_size: int) -> errors.ConfigError:
    return errors.ConfigError(
        f"out of memory with --batch-size {batch_size}: try a smaller --batch-size "
        "(or a smaller --width/--depth)")


def map_error(exc: BaseException, batch_size: int) -> errors.PggeolearnError | None:
    """The one-line error for a framework failure we can explain (out of memory), else None."""
    if isinstance(exc, errors.PggeolearnError):
        return None
    return oom_error(batch_size) if is_oom(exc) else None


def jitter_params(seed: int, epoch: int, step: int, n: int, c: int,
                  strength: float) -> tuple[np.ndarray, np.ndarray]:
    """Colour jitter for a batch of ``n`` normalized images of ``c`` bands: a per-image,
    per-band gain in ``1 ± strength`` and a per-image brightness shift in ``± strength``
    standard deviations, as ``(gain (n, c, 1, 1), shift (n, 1, 1, 1))`` float32. Seeded by
    ``(seed, epoch, step)``: the same numbers in both frameworks and on every run."""
    rng = np.random.default_rng([seed, epoch, step, 0x6A17])
    gain = rng.uniform(1 - strength, 1 + strength, (n, c, 1, 1)).astype(np.float32)
    shift = rng.uniform(-strength, strength, (n, 1, 1, 1)).astype(np.float32)
    return gain, shift


def pad_to(images: np.ndarray, multiple: int) -> np.ndarray:
    """Pad ``(N, C, H, W)`` at the bottom/right (reflect) to multiples of ``multiple``."""
    h, w = images.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not ph and not pw:
        return images
    mode = "reflect" if ph < h and pw < w else "edge"
    return np.pad(images, ((0, 0), (0, 0), (0, ph), (0, pw)), mode=mode)


def json_safe(v: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, recursively (jsonb has no NaN)."""
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [json_safe(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
