"""The output raster: its grid (pixel size and origin, snapped to cover an extent) and the
values it stores (:data:`NODATA`, :data:`PROB_SCALE`). Pure; no database."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pggeolearn import errors

__all__ = ["NODATA", "PROB_SCALE", "Grid", "snap_grid"]

NODATA = 255  # class raster and probability raster value where there was no imagery
PROB_SCALE = 254  # probability band value = round(p * PROB_SCALE)


@dataclass(frozen=True)
class Grid:
    """The output raster: ``width x height`` pixels of ``res`` from upper-left ``(x0, y0)``."""

    srid: int
    res: float
    x0: float
    y0: float
    width: int
    height: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0 - self.height * self.res, self.x0 + self.width * self.res, self.y0)

    def geotransform(self, row: int, col: int) -> tuple[float, ...]:
        """GDAL geotransform of a raster whose upper-left pixel is (row, col) of this grid."""
        return (self.x0 + col * self.res, self.res, 0.0, self.y0 - row * self.res, 0.0, -self.res)


def snap_grid(extent: Sequence[float], res: float, srid: int,
              anchor: tuple[float, float] = (0.0, 0.0)) -> Grid:
    """The smallest grid of pixel size ``res`` whose pixel edges fall on ``anchor + k * res``
    and which covers ``extent`` (minx, miny, maxx, maxy)."""
    minx, miny, maxx, maxy = (float(v) for v in extent)
    if not (maxx > minx and maxy > miny):
        raise errors.ConfigError(f"empty extent {tuple(extent)}")
    ax, ay = anchor
    eps = 1e-6
    i0 = math.floor((minx - ax) / res + eps)
    i1 = math.ceil((maxx - ax) / res - eps)
    j0 = math.floor((ay - maxy) / res + eps)  # rows counted downwards from the anchor
    j1 = math.ceil((ay - miny) / res - eps)
    width, height = max(1, i1 - i0), max(1, j1 - j0)
    if width * height > 2**40:
        raise errors.ConfigError(f"extent of {width} x {height} pixels is too large")
    return Grid(srid, res, ax + i0 * res, ay - j0 * res, width, height)
