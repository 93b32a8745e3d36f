"""What :func:`pggeolearn.predict.predict` is asked to do: :class:`PredictOptions`, its
keyword arguments as one checked value."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pggeolearn import errors
from pggeolearn.predict.stitch import STITCH_MODES

__all__ = ["DEFAULT_OVERLAP", "DEFAULT_TIMEOUT_S", "PredictOptions"]

DEFAULT_TIMEOUT_S = 60.0  # per row band of imagery
DEFAULT_OVERLAP = 32


@dataclass(frozen=True)
class PredictOptions:
    """The keyword arguments of :func:`~pggeolearn.predict.predict` (documented there).

    The area: ``extent`` (in ``extent_srid``) or ``dataset`` and ``split``; ``imagery``;
    ``grid_origin``. The outputs: ``out``, ``polygons``, ``probabilities``, ``vectorize``,
    ``min_pixels``, ``tile_px``, ``overviews``, ``overwrite``, ``append``, ``force``. The run:
    ``overlap`` (None: from the model's window), ``stitch``, ``batch_size``, ``device``,
    ``timeout_s``, ``progress``, ``tta`` (test-time augmentation: :mod:`pggeolearn.tta`).
    """

    out: str
    imagery: str | None = None
    extent: Sequence[float] | None = None
    extent_srid: int | None = None
    dataset: str | None = None
    split: str = "test"
    overlap: int | None = None
    stitch: str = "centre"
    probabilities: bool = False
    vectorize: bool = True
    polygons: str | None = None
    min_pixels: int = 4
    overwrite: bool = False
    append: bool = False
    force: bool = False
    batch_size: int = 8
    tile_px: int = 256
    overviews: Sequence[int] = (2, 4)
    device: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    progress: bool = True
    grid_origin: Sequence[float] | None = None
    tta: bool = False

    def check(self) -> None:
        """A one-line ConfigError for values that cannot work, before anything is read."""
        if self.stitch not in STITCH_MODES:
            raise errors.ConfigError(f"stitch must be one of {', '.join(STITCH_MODES)}, not {self.stitch!r}")
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= 4096:
            raise errors.ConfigError(f"batch size must be 1..4096, not {self.batch_size!r}")
        if not isinstance(self.min_pixels, int) or isinstance(self.min_pixels, bool) or self.min_pixels < 0:
            raise errors.ConfigError(f"min pixels must be a whole number of pixels >= 0 (0 keeps every object), "
                                     f"not {self.min_pixels!r}")
        if not isinstance(self.tile_px, int) or not 16 <= self.tile_px <= 4096:
            raise errors.ConfigError(f"output tile size must be 16..4096 pixels, not {self.tile_px!r}")
        if (self.extent is None) == (self.dataset is None):
            raise errors.ConfigError("give exactly one of an extent (MINX MINY MAXX MAXY) or a dataset")
        if self.extent is not None and len(self.extent) != 4:
            raise errors.ConfigError(f"extent needs 4 numbers (MINX MINY MAXX MAXY), got {len(self.extent)}")
