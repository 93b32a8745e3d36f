"""PostGIS raster WKB (version 0) codec: bytes <-> numpy, with zero-copy decoding.

Layout (``raster/doc/RFC2-WellKnownBinaryFormat`` in PostGIS; no padding anywhere)::

    header (61 bytes)  uint8 endian (0 XDR/big, 1 NDR/little), uint16 version (0),
                       uint16 nBands, float64 scaleX scaleY ipX ipY skewX skewY,
                       int32 srid, uint16 width height
    per band           uint8 flags (0x80 out-db, 0x40 hasNodata, 0x20 isNodata,
                       low 4 bits pixel type), nodata value (pixel-type sized, always
                       present), width*height pixels row-major (1 byte each for 1BB/2BUI/4BUI)

When every band has the same numpy dtype the bands sit at a fixed stride in the buffer,
so :func:`decode` returns one ``(bands, height, width)`` view over the input bytes
(read-only for ``bytes``) without copying a pixel. Only numpy and the standard library
are imported here so that workers and CLIs can decode without heavy frameworks.
"""

from __future__ import annotations

import math
import operator
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from pggeolearn.errors import RasterFormatError

__all__ = [
    "PIXEL_TYPES",
    "RasterTile",
    "decode",
    "decode_many",
    "encode",
    "from_array",
]

Buffer = bytes | bytearray | memoryview
Nodata = float | int | None
GeoTransform = tuple[float, float, float, float, float, float]

HEADER_SIZE = 61
_HEADER = {0: struct.Struct(">HHddddddiHH"), 1: struct.Struct("<HHddddddiHH")}
_ORDER = {0: ">", 1: "<"}

_FLAG_OFFDB = 0x80
_FLAG_HASNODATA = 0x40
_FLAG_ISNODATA = 0x20  # "every pixel is nodata": a hint only; decode ignores it, encode writes 0
_PIXTYPE_MASK = 0x0F


class PixelType(NamedTuple):
    """One PostGIS pixel type: WKB code, name, numpy dtype and (for integers) value range."""

    code: int
    name: str
    dtype: np.dtype
    lo: float
    hi: float

    @property
    def size(self) -> int:
        return self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype.kind == "f"


def _int_type(code: int, name: str, dtype: str, hi: int | None = None) -> PixelType:
    info = np.iinfo(dtype)
    return PixelType(code, name, np.dtype(dtype), int(info.min), info.max if hi is None else hi)


PIXEL_TYPES: dict[str, PixelType] = {
    pt.name: pt
    for pt in (
        _int_type(0, "1BB", "u1", 1),
        _int_type(1, "2BUI", "u1", 3),
        _int_type(2, "4BUI", "u1", 15),
        _int_type(3, "8BSI", "i1"),
        _int_type(4, "8BUI", "u1"),
        _int_type(5, "16BSI", "i2"),
        _int_type(6, "16BUI", "u2"),
        _int_type(7, "32BSI", "i4"),
        _int_type(8, "32BUI", "u4"),
        PixelType(10, "32BF", np.dtype("f4"), -math.inf, math.inf),
        PixelType(11, "64BF", np.dtype("f8"), -math.inf, math.inf),
    )
}
_BY_CODE: dict[int, PixelType] = {pt.code: pt for pt in PIXEL_TYPES.values()}
_SUB_BYTE = frozenset({"1BB", "2BUI", "4BUI"})
_FROM_DTYPE: dict[str, str] = {
    "u1": "8BUI", "i1": "8BSI", "i2": "16BSI", "u2": "16BUI",
    "i4": "32BSI", "u4": "32BUI", "f4": "32BF", "f8": "64BF",
}  # fmt: skip


class _Wire(NamedTuple):
    """A pixel type as laid out in one byte order."""

    pt: PixelType
    dtype: np.dtype  # with the wire byte order
    nodata: struct.Struct
    sub_byte: bool


# _WIRE[endian byte][pixel type code] (None for codes PostGIS does not define)
_WIRE: dict[int, list[_Wire | None]] = {
    e: [
        None
        if (pt := _BY_CODE.get(code)) is None
        else _Wire(
            pt,
            pt.dtype.newbyteorder(_ORDER[e]),
            struct.Struct(_ORDER[e] + pt.dtype.char),
            pt.name in _SUB_BYTE,
        )
        for code in range(16)
    ]
    for e in (0, 1)
}
_UNKNOWN_CODE_NOTE = {9: " (16BF, added in PostGIS 3.6, is not supported)"}


@dataclass(frozen=True, slots=True, eq=False)
class RasterTile:
    """A decoded in-db raster: pixels as ``(bands, height, width)`` plus georeference.

    ``data`` has the bands' common dtype (wire byte order, e.g. ``>u2`` for XDR input);
    when pixel types differ it is a copy and :meth:`band` still returns each band in its
    own dtype. Band indices are 0-based (PostGIS SQL functions count from 1).
    """

    data: np.ndarray
    geotransform: GeoTransform  # GDAL order: (ipX, scaleX, skewX, ipY, skewY, scaleY)
    srid: int
    nodata: tuple[Nodata, ...]
    pixel_types: tuple[str, ...]
    _bands: tuple[np.ndarray, ...] | None = field(default=None, repr=False)

    @property
    def bands(self) -> int:
        return self.data.shape[0]

    @property
    def height(self) -> int:
        return self.data.shape[1]

    @property
    def width(self) -> int:
        return self.data.shape[2]

    @property
    def scale_x(self) -> float:
        return self.geotransform[1]

    @property
    def scale_y(self) -> float:
        return self.geotransform[5]

    @property
    def skew_x(self) -> float:
        return self.geotransform[2]

    @property
    def skew_y(self) -> float:
        return self.geotransform[4]

    @property
    def upper_left(self) -> tuple[float, float]:
        return self.geotransform[0], self.geotransform[3]

    def band(self, i: int) -> np.ndarray:
        """Band ``i`` (0-based) as ``(height, width)`` in its pixel type's own dtype."""
        return self.data[i] if self._bands is None else self._bands[i]

    def valid(self) -> np.ndarray:
        """``(height, width)`` bool: False where the pixel is NODATA (see :func:`valid_mask`)."""
        return valid_mask(self.data, self.nodata)

    def metadata(self) -> dict[str, Any]:
        """The columns of PostGIS ``ST_MetaData(rast)``."""
        gt = self.geotransform
        return {
            "upperleftx": gt[0], "upperlefty": gt[3], "width": self.width,
            "height": self.height, "scalex": gt[1], "scaley": gt[5], "skewx": gt[2],
            "skewy": gt[4], "srid": self.srid, "numbands": self.bands,
        }  # fmt: skip

    def band_metadata(self, i: int) -> dict[str, Any]:
        """The core columns of ``ST_BandMetaData(rast, i + 1)`` (in-db bands only)."""
        return {
            "pixeltype": self.pixel_types[i],
            "nodatavalue": self.nodata[i],
            "isoutdb": False,
            "path": None,
        }


def valid_mask(data: np.ndarray, nodata: Sequence[Nodata]) -> np.ndarray:
    """``(height, width)`` bool of ``(bands, height, width)`` pixels: a pixel is NODATA (False)
    when every band declares a NODATA value and every band holds it (NaN matches NaN). A band
    without a NODATA value makes every pixel valid. The one rule of the chip statistics
    (``pggeolearn.valid_label``), the streams' ``valid`` masks, training, evaluate and predict."""
    if not len(nodata) or any(nd is None for nd in nodata):
        return np.ones(data.shape[1:], bool)
    invalid = np.ones(data.shape[1:], bool)
    for b, nd in enumerate(nodata):
        invalid &= np.isnan(data[b]) if nd != nd else data[b] == nd
    return ~invalid


def _as_buffer(buf: Any) -> tuple[Buffer, int]:
    if isinstance(buf, bytes | bytearray):
        return buf, len(buf)
    if isinstance(buf, memoryview):
        if buf.ndim != 1 or buf.itemsize != 1:
            try:
                buf = buf.cast("B")
            except TypeError as exc:
                raise RasterFormatError(f"raster WKB memoryview is not contiguous: {exc}") from None
        return buf, buf.nbytes
    raise RasterFormatError(f"raster WKB must be bytes-like, got {type(buf).__name__}")


def _truncated(n: int, need: int, what: str) -> RasterFormatError:
    return RasterFormatError(f"raster WKB truncated: {n} bytes, {what} needs {need}")


def decode(buf: Buffer, *, copy: bool = False) -> RasterTile:
    """Parse one raster WKB (``ST_AsBinary(rast)``, or ``rast::bytea``).

    Without ``copy`` the pixels are views into ``buf`` (keep it alive and unmodified):
    read-only for ``bytes`` and, for 16/32/64-bit types, unaligned with a band stride that
    is not a multiple of the item size (``torch.from_numpy`` refuses those). ``copy=True``
    returns a writable, C-contiguous, native-byte-order array instead.
    """
    buf, n = _as_buffer(buf)
    if n < HEADER_SIZE:
        raise _truncated(n, HEADER_SIZE, "the header")
    endian = buf[0]
    hdr = _HEADER.get(endian)
    if hdr is None:
        raise RasterFormatError(f"raster WKB endianness byte is {endian}, expected 0 or 1")
    version, nbands, sx, sy, ipx, ipy, kx, ky, srid, width, height = hdr.unpack_from(buf, 1)
    if version != 0:
        raise RasterFormatError(f"raster WKB version {version} is not supported (only 0)")
    npix = width * height
    if nbands and not npix:
        raise RasterFormatError(f"raster WKB has {nbands} band(s) but is {width}x{height} pixels")

    pos = HEADER_SIZE
    table = _WIRE[endian]
    wires: list[_Wire] = []
    starts: list[int] = []
    nodata: list[Nodata] = []
    sub_byte: list[int] = []
    for i in range(nbands):
        if pos >= n:
            raise _truncated(n, pos + 1, f"band {i + 1} of {nbands}")
        flags = buf[pos]
        if flags & _FLAG_OFFDB:
            raise RasterFormatError(
                f"out-db bands are not supported (band {i + 1}); "
                "select ST_AsBinary(rast, true) or load the raster in-db"
            )
        w = table[flags & _PIXTYPE_MASK]
        if w is None:
            code = flags & _PIXTYPE_MASK
            raise RasterFormatError(
                f"raster WKB band {i + 1} has unknown pixel type {code}"
                + _UNKNOWN_CODE_NOTE.get(code, "")
            )
        size = w.dtype.itemsize
        start = pos + 1 + size
        pos = start + npix * size
        if pos > n:
            raise _truncated(n, pos, f"band {i + 1} of {nbands}")
        if flags & _FLAG_HASNODATA:
            value = w.nodata.unpack_from(buf, start - size)[0]
            nodata.append(value & w.pt.hi if w.sub_byte else value)  # masked, as PostGIS does
        else:
            nodata.append(None)
        if w.sub_byte:
            sub_byte.append(i)
        wires.append(w)
        starts.append(start)
    if pos != n:
        raise RasterFormatError(f"raster WKB has {n - pos} trailing byte(s) after the last band")

    geotransform = (ipx, sx, kx, ipy, ky, sy)
    pixel_types = tuple(w.pt.name for w in wires)
    if not wires:
        empty = np.empty((0, height, width), np.uint8)
        return RasterTile(empty, geotransform, srid, (), ())

    dt0 = wires[0].dtype
    bands: tuple[np.ndarray, ...] | None = None
    if all(w.dtype is dt0 or w.dtype == dt0 for w in wires):
        # bands of one dtype sit at a fixed stride: one strided view, zero copies
        size = dt0.itemsize
        band_stride = starts[1] - starts[0] if nbands > 1 else npix * size
        data = np.ndarray(
            (nbands, height, width), dt0, buf, starts[0], (band_stride, width * size, size)
        )
        views: Sequence[np.ndarray] = data
    else:
        views = [np.ndarray((height, width), w.dtype, buf, starts[i]) for i, w in enumerate(wires)]
        data = np.empty((nbands, height, width), np.result_type(*(w.pt.dtype for w in wires)))
        for i, v in enumerate(views):
            data[i] = v
        bands = tuple(views)
    for i in sub_byte:  # PostGIS refuses such WKB too; never hand out impossible values
        if views[i].max() > wires[i].pt.hi:
            raise RasterFormatError(
                f"raster WKB band {i + 1} has {wires[i].pt.name} values above {wires[i].pt.hi}"
            )
    if copy:
        data = np.ascontiguousarray(data, data.dtype.newbyteorder("="))
        if bands is not None:
            bands = tuple(np.ascontiguousarray(b, b.dtype.newbyteorder("=")) for b in bands)
    return RasterTile(data, geotransform, srid, tuple(nodata), pixel_types, bands)


def decode_many(buffers: Iterable[Buffer]) -> np.ndarray:
    """Decode tiles of one shape and pixel type(s) into a new ``(N, bands, h, w)`` array.

    The result is C-contiguous, writable and native byte order (mixed pixel types use the
    common dtype). Georeference and nodata may differ between tiles; they are ignored.
    """
    bufs = list(buffers)
    if not bufs:
        raise RasterFormatError("decode_many needs at least one raster WKB")
    first = decode(bufs[0])
    out = np.empty((len(bufs), *first.data.shape), first.data.dtype.newbyteorder("="))
    out[0] = first.data
    ref, n0 = _as_buffer(bufs[0])
    fast = first._bands is None and first.bands > 0 and _SUB_BYTE.isdisjoint(first.pixel_types)
    if fast:
        # Same endian/version/nBands/width/height, length and band type bytes => same layout,
        # and the per-tile checks decode() makes are all implied by these.
        head, dims, data0 = bytes(ref[0:5]), bytes(ref[57:61]), first.data
        band_bytes = n0 - HEADER_SIZE
        step = band_bytes // first.bands
        flag_at = [(HEADER_SIZE + i * step, ref[HEADER_SIZE + i * step] & 0x8F)
                   for i in range(first.bands)]  # fmt: skip
        offset = HEADER_SIZE + 1 + data0.itemsize
        shape, dtype, strides = data0.shape, data0.dtype, data0.strides
    for k in range(1, len(bufs)):
        b, n = _as_buffer(bufs[k])
        if (
            fast
            and n == n0
            and b[0:5] == head
            and b[57:61] == dims
            and all(b[p] & 0x8F == f for p, f in flag_at)
        ):
            out[k] = np.ndarray(shape, dtype, b, offset, strides)
            continue
        tile = decode(b)
        if tile.data.shape != first.data.shape or tile.pixel_types != first.pixel_types:
            raise RasterFormatError(
                f"decode_many: tile {k} is {tile.pixel_types} {tile.data.shape[1:]}, "
                f"tile 0 is {first.pixel_types} {first.data.shape[1:]}"
            )
        out[k] = tile.data
    return out


def _check_value(value: Any, pt: PixelType, what: str) -> int | float:
    """``value`` as the Python number PostGIS would store for pixel type ``pt``."""
    if isinstance(value, str | bytes):
        raise RasterFormatError(f"{what} must be a number, got {value!r}")
    if pt.is_float:
        try:
            packed = struct.pack("<" + pt.dtype.char, float(value))  # "<" checks overflow
        except (TypeError, ValueError, OverflowError):
            raise RasterFormatError(f"{what} {value!r} does not fit {pt.name}") from None
        return struct.unpack("<" + pt.dtype.char, packed)[0]
    try:
        ivalue = operator.index(value)
    except TypeError:
        try:
            fvalue = float(value)
        except (TypeError, ValueError):
            fvalue = math.nan
        if not fvalue.is_integer():
            raise RasterFormatError(f"{what} {value!r} is not an integer ({pt.name})") from None
        ivalue = int(fvalue)
    if not pt.lo <= ivalue <= pt.hi:
        raise RasterFormatError(
            f"{what} {value!r} is out of range for {pt.name} ({int(pt.lo)}..{int(pt.hi)})"
        )
    return ivalue


def _to_pixel_type(arr: np.ndarray, pt: PixelType, what: str) -> np.ndarray:
    """``arr`` in ``pt``'s dtype (any byte order), checking integer values fit exactly."""
    kind = arr.dtype.kind
    if kind == pt.dtype.kind and arr.dtype.itemsize == pt.size:
        if pt.name in _SUB_BYTE and arr.size and arr.max() > pt.hi:
            raise RasterFormatError(f"{what} has values above {int(pt.hi)}, too big for {pt.name}")
        return arr
    if kind not in "biuf":
        raise RasterFormatError(f"{what} has dtype {arr.dtype}, which no pixel type holds")
    if pt.is_float:
        return arr.astype(pt.dtype)
    if arr.size:
        if kind == "f" and not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
            raise RasterFormatError(f"{what} has non-integer values, cannot store as {pt.name}")
        lo, hi = arr.min(), arr.max()
        if lo < pt.lo or hi > pt.hi:
            raise RasterFormatError(
                f"{what} has values in {lo}..{hi}, outside {pt.name} ({int(pt.lo)}..{int(pt.hi)})"
            )
    return arr.astype(pt.dtype)


def _pixel_type(name: Any) -> PixelType:
    pt = PIXEL_TYPES.get(name) if isinstance(name, str) else None
    if pt is None:
        raise RasterFormatError(f"unknown pixel type {name!r}; use one of {', '.join(PIXEL_TYPES)}")
    return pt


def _per_band(value: Any, bands: int, what: str) -> tuple[Any, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence | np.ndarray) or not np.ndim(value):
        return (value,) * bands
    if len(value) != bands:
        raise RasterFormatError(f"{len(value)} {what} given for {bands} band(s)")
    return tuple(value)


def _check_shape(shape: tuple[int, ...]) -> None:
    if len(shape) != 3:
        raise RasterFormatError(f"raster data must be (bands, height, width), got shape {shape}")
    bands, height, width = shape
    if max(shape) > 0xFFFF:
        raise RasterFormatError(f"raster shape {shape} exceeds PostGIS's 65535 limit")
    if bands and not height * width:
        raise RasterFormatError(f"raster has {bands} band(s) but is {width}x{height} pixels")


def _check_georef(geotransform: Any, srid: Any) -> tuple[GeoTransform, int]:
    try:
        gt = tuple(float(v) for v in geotransform)
        isrid = operator.index(srid)
    except TypeError as exc:
        raise RasterFormatError(f"bad geotransform or srid: {exc}") from None
    if len(gt) != 6:
        raise RasterFormatError(f"geotransform needs 6 numbers (GDAL order), got {len(gt)}")
    if not -(2**31) <= isrid < 2**31:
        raise RasterFormatError(f"srid {isrid} does not fit int32")
    return gt, isrid  # type: ignore[return-value]


def from_array(
    data: Any,
    *,
    geotransform: Sequence[float],
    srid: int,
    nodata: Nodata | Sequence[Nodata] = None,
    pixel_types: str | Sequence[str] | None = None,
) -> RasterTile:
    """Build a tile from a ``(bands, h, w)`` (or ``(h, w)``) array, checking it encodes.

    Pixel types default to the dtype's (uint8 -> 8BUI, int8 -> 8BSI, ... float64 -> 64BF);
    ``nodata`` and ``pixel_types`` take one value for all bands or one per band. Values are
    cast to the pixel types (integers must fit exactly); nodata is rounded the way PostGIS
    stores it, so ``decode(encode(t))`` reproduces ``t``.
    """
    arr = np.asarray(data)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    _check_shape(arr.shape)
    nb = arr.shape[0]
    if pixel_types is None:
        name = _FROM_DTYPE.get(f"{arr.dtype.kind}{arr.dtype.itemsize}")
        if name is None:
            raise RasterFormatError(
                f"no PostGIS pixel type for dtype {arr.dtype}; pass pixel_types= (e.g. '1BB')"
            )
        pixel_types = name
    pts = [_pixel_type(p) for p in _per_band(pixel_types, nb, "pixel types")]
    nd_values = _per_band(nodata, nb, "nodata values")
    nds = tuple(
        None if v is None else _check_value(v, pt, f"band {i + 1} nodata")
        for i, (pt, v) in enumerate(zip(pts, nd_values, strict=True))
    )
    gt, isrid = _check_georef(geotransform, srid)
    views = list(arr)
    band_arrays = [
        _to_pixel_type(v, pt, f"band {i + 1}")
        for i, (v, pt) in enumerate(zip(views, pts, strict=True))
    ]
    dtypes = {pt.dtype for pt in pts}
    bands: tuple[np.ndarray, ...] | None = None
    if len(dtypes) > 1:
        bands = tuple(band_arrays)
        out = np.stack(band_arrays).astype(np.result_type(*dtypes), copy=False)
    elif any(b is not v for b, v in zip(band_arrays, views, strict=True)):  # some band was cast
        out = np.stack(band_arrays)
    else:
        out = arr if nb else arr.astype(np.uint8)
    return RasterTile(out, gt, isrid, nds, tuple(pt.name for pt in pts), bands)


def encode(tile: RasterTile, *, little_endian: bool = True) -> bytes:
    """Serialise ``tile`` as PostGIS raster WKB (NDR by default, XDR on request).

    Writes what ``ST_AsBinary`` writes: hasNodata set when a nodata value is given (the
    value field is 0 otherwise), isNodata always 0, pixels row-major without padding.
    """
    data = np.asarray(tile.data)
    _check_shape(data.shape)
    nb, height, width = data.shape
    gt, srid = _check_georef(tile.geotransform, tile.srid)
    pixel_types = _per_band(tile.pixel_types, nb, "pixel types")
    nodata = _per_band(tile.nodata, nb, "nodata values")
    e = 1 if little_endian else 0
    parts = [
        bytes((e,)),
        _HEADER[e].pack(0, nb, gt[1], gt[5], gt[0], gt[3], gt[2], gt[4], srid, width, height),
    ]
    for i in range(nb):
        pt, dt, nd_struct, _ = _WIRE[e][_pixel_type(pixel_types[i]).code]  # type: ignore[misc]
        nd = nodata[i]
        flags = pt.code
        if nd is not None:
            flags |= _FLAG_HASNODATA
            nd = _check_value(nd, pt, f"band {i + 1} nodata")
        parts.append(bytes((flags,)))
        parts.append(nd_struct.pack(0 if nd is None else nd))
        band = _to_pixel_type(np.asarray(tile.band(i)), pt, f"band {i + 1}")
        if band.shape != (height, width):
            raise RasterFormatError(f"band {i + 1} is {band.shape}, expected {(height, width)}")
        parts.append(band.astype(dt, copy=False).tobytes())
    return b"".join(parts)
