"""Unit tests for pggeolearn.wkb (no database)."""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pggeolearn import wkb
from pggeolearn.errors import RasterFormatError

# ST_AsBinary(ST_AddBand(ST_MakeEmptyRaster(2,2,0,0,1,-1,0,0,4326),'8BUI'::text,7,0)),
# built by hand from the RFC (and checked against PostGIS 3.3.2).
KNOWN_8BUI = bytes.fromhex(
    "01"  # NDR
    "0000"  # version 0
    "0100"  # 1 band
    "000000000000F03F"  # scaleX 1
    "000000000000F0BF"  # scaleY -1
    "0000000000000000"  # ipX 0
    "0000000000000000"  # ipY 0
    "0000000000000000"  # skewX 0
    "0000000000000000"  # skewY 0
    "E6100000"  # srid 4326
    "0200"  # width 2
    "0200"  # height 2
    "44"  # hasNodata | 8BUI
    "00"  # nodata 0
    "07070707"  # pixels
)
# Same raster with initial value == nodata: PostGIS sets isNodata (0x20) too.
KNOWN_ALL_NODATA = KNOWN_8BUI[:61] + bytes.fromhex("64" "00" "00000000")  # fmt: skip
# ST_AddBand(ST_AddBand(ST_MakeEmptyRaster(2,1,0,0,1,-1,0,0,0),'16BSI'::text,-5,NULL),
#            '32BF'::text,1.5,-9999), as PostGIS 3.3.2 returned it.
KNOWN_MIXED = bytes.fromhex(
    "01" "0000" "0200"  # NDR, version 0, 2 bands
    "000000000000f03f" "000000000000f0bf"  # scaleX 1, scaleY -1
    "0000000000000000" "0000000000000000" "0000000000000000" "0000000000000000"
    "00000000" "0200" "0100"  # srid 0, 2x1
    "05" "0000" "fbff" "fbff"  # 16BSI, no nodata (value field still written), -5 -5
    "4a" "003c1cc6" "0000c03f" "0000c03f"  # hasNodata|32BF, nodata -9999, 1.5 1.5
)  # fmt: skip
GT = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def _header(nbands: int, width: int, height: int, *, endian: int = 1, version: int = 0) -> bytes:
    o = "<" if endian else ">"
    return bytes((endian,)) + struct.pack(
        o + "HHddddddiHH", version, nbands, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 4326, width, height
    )


def _base_chain(arr: np.ndarray) -> object:
    obj: object = arr
    while isinstance(obj, np.ndarray) and obj.base is not None:
        obj = obj.base
    return obj


def _same(a: float | int | None, b: float | int | None) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b and type(a) is type(b)


# ---------------------------------------------------------------- known bytes


def test_known_postgis_bytes_decode() -> None:
    tile = wkb.decode(KNOWN_8BUI)
    assert tile.geotransform == GT
    assert tile.srid == 4326
    assert tile.nodata == (0,)
    assert tile.pixel_types == ("8BUI",)
    assert tile.data.shape == (1, 2, 2) and tile.data.dtype == np.uint8
    assert (tile.data == 7).all()
    assert (tile.bands, tile.height, tile.width) == (1, 2, 2)
    assert tile.upper_left == (0.0, 0.0) and (tile.scale_x, tile.scale_y) == (1.0, -1.0)
    assert tile.metadata() == {
        "upperleftx": 0.0, "upperlefty": 0.0, "width": 2, "height": 2, "scalex": 1.0,
        "scaley": -1.0, "skewx": 0.0, "skewy": 0.0, "srid": 4326, "numbands": 1,
    }  # fmt: skip
    assert tile.band_metadata(0) == {
        "pixeltype": "8BUI", "nodatavalue": 0, "isoutdb": False, "path": None
    }  # fmt: skip


def test_known_postgis_bytes_encode() -> None:
    tile = wkb.from_array(np.full((2, 2), 7, np.uint8), geotransform=GT, srid=4326, nodata=0)
    assert wkb.encode(tile) == KNOWN_8BUI
    assert wkb.encode(wkb.decode(KNOWN_8BUI)) == KNOWN_8BUI


def test_known_mixed_bytes() -> None:
    tile = wkb.decode(KNOWN_MIXED)
    assert tile.pixel_types == ("16BSI", "32BF")
    assert tile.nodata == (None, -9999.0)
    assert tile.srid == 0 and (tile.height, tile.width) == (1, 2)
    assert tile.data.dtype == np.float32
    assert tile.band(0).dtype == np.int16 and tile.band(0).tolist() == [[-5, -5]]
    assert tile.band(1).dtype == np.float32 and tile.band(1).tolist() == [[1.5, 1.5]]
    assert wkb.encode(tile) == KNOWN_MIXED


def test_is_nodata_flag_is_read_and_written_as_zero() -> None:
    tile = wkb.decode(KNOWN_ALL_NODATA)
    assert tile.nodata == (0,) and (tile.data == 0).all()
    assert wkb.encode(tile) == KNOWN_ALL_NODATA[:61] + b"\x44" + KNOWN_ALL_NODATA[62:]


def test_empty_raster_without_bands() -> None:
    buf = _header(0, 3, 2)
    tile = wkb.decode(buf)
    assert tile.data.shape == (0, 2, 3) and tile.nodata == () and tile.pixel_types == ()
    assert wkb.encode(tile) == buf
    assert wkb.decode(_header(0, 0, 0)).data.shape == (0, 0, 0)


# ---------------------------------------------------------------- zero copy


def test_decode_uint8_three_bands_is_zero_copy() -> None:
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, (3, 256, 256), dtype=np.uint8)
    buf = wkb.encode(wkb.from_array(src, geotransform=GT, srid=3857))
    tile = wkb.decode(buf)
    assert tile.data.shape == (3, 256, 256) and tile.data.dtype == np.uint8
    assert np.array_equal(tile.data, src)
    assert np.shares_memory(tile.data, np.frombuffer(buf, np.uint8))
    assert _base_chain(tile.data) is buf
    assert not tile.data.flags.writeable  # a view of immutable bytes

    mutable = bytearray(buf)
    view = wkb.decode(mutable).data
    mutable[61 + 2] = 255 - mutable[61 + 2]  # first pixel of band 1
    assert view[0, 0, 0] == 255 - src[0, 0, 0]

    copied = wkb.decode(buf, copy=True).data
    assert copied.flags.writeable and copied.flags.c_contiguous
    assert not np.shares_memory(copied, np.frombuffer(buf, np.uint8))


def test_decode_memoryview_is_zero_copy() -> None:
    buf = wkb.encode(wkb.from_array(np.arange(12, dtype=np.uint16).reshape(3, 2, 2),
                                    geotransform=GT, srid=1))  # fmt: skip
    tile = wkb.decode(memoryview(buf))
    assert np.shares_memory(tile.data, np.frombuffer(buf, np.uint8))
    assert tile.data.tolist() == np.arange(12).reshape(3, 2, 2).tolist()


def test_big_endian_decodes_to_correct_values_without_copy() -> None:
    src = np.array([[[1, 258], [65535, 4096]]], np.uint16)
    buf = wkb.encode(wkb.from_array(src, geotransform=GT, srid=1, nodata=65535),
                     little_endian=False)  # fmt: skip
    assert buf[0] == 0 and buf[61] == 0x46 and buf[62:64] == b"\xff\xff"
    assert buf[64:66] == b"\x00\x01"  # first pixel, big endian
    tile = wkb.decode(buf)
    assert tile.data.dtype == np.dtype(">u2")
    assert np.array_equal(tile.data, src) and tile.nodata == (65535,)
    assert np.shares_memory(tile.data, np.frombuffer(buf, np.uint8))
    native = wkb.decode(buf, copy=True).data
    assert native.dtype == np.dtype("=u2") and np.array_equal(native, src)


def test_mixed_types_keep_per_band_views() -> None:
    tile = wkb.from_array(
        np.array([[[1, 2]], [[3, 4]]], np.float64),
        geotransform=GT, srid=1, pixel_types=["8BUI", "32BF"],
    )  # fmt: skip
    buf = wkb.encode(tile)
    out = wkb.decode(buf)
    assert out.data.dtype == np.float32 and out.data.tolist() == [[[1, 2]], [[3, 4]]]
    assert out.band(0).dtype == np.uint8 and out.band(1).dtype == np.float32
    assert np.shares_memory(out.band(0), np.frombuffer(buf, np.uint8))
    assert not np.shares_memory(out.data, np.frombuffer(buf, np.uint8))


# ---------------------------------------------------------------- round trips


def _value_strategy(pt: wkb.PixelType) -> st.SearchStrategy:
    if pt.name == "32BF":
        return st.floats(width=32)
    if pt.name == "64BF":
        return st.floats()
    return st.integers(int(pt.lo), int(pt.hi))


@st.composite
def tiles(draw: st.DrawFn) -> wkb.RasterTile:
    nbands = draw(st.integers(1, 4))
    height, width = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    names = st.sampled_from(sorted(wkb.PIXEL_TYPES))
    if draw(st.booleans()):
        pixel_types = [draw(names)] * nbands
    else:
        pixel_types = [draw(names) for _ in range(nbands)]
    bands, nodata = [], []
    for name in pixel_types:
        pt = wkb.PIXEL_TYPES[name]
        bands.append(draw(hnp.arrays(pt.dtype, (height, width), elements=_value_strategy(pt))))
        nodata.append(draw(st.none() | _value_strategy(pt)))
    finite = st.floats(allow_nan=False, allow_infinity=False)
    gt = tuple(draw(finite) for _ in range(6))
    srid = draw(st.integers(-(2**31), 2**31 - 1))
    # float64 holds every value of every pixel type exactly, so mixed bands can share it
    data = np.stack(bands if len(set(pixel_types)) == 1 else [b.astype("f8") for b in bands])
    return wkb.from_array(data, geotransform=gt, srid=srid, nodata=nodata, pixel_types=pixel_types)


def _assert_same_tile(a: wkb.RasterTile, b: wkb.RasterTile) -> None:
    assert a.pixel_types == b.pixel_types
    assert a.geotransform == b.geotransform and a.srid == b.srid
    assert len(a.nodata) == len(b.nodata)
    assert all(_same(x, y) for x, y in zip(a.nodata, b.nodata, strict=True)), (a.nodata, b.nodata)
    assert a.data.shape == b.data.shape
    for i in range(a.bands):
        x, y = a.band(i), b.band(i)
        assert x.dtype.newbyteorder("=") == y.dtype.newbyteorder("=")
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f")


@settings(max_examples=300, deadline=None)
@given(tile=tiles(), little=st.booleans())
def test_round_trip(tile: wkb.RasterTile, little: bool) -> None:
    buf = wkb.encode(tile, little_endian=little)
    expected = 61 + sum(
        1 + wkb.PIXEL_TYPES[p].size * (1 + tile.height * tile.width) for p in tile.pixel_types
    )
    assert len(buf) == expected and buf[0] == int(little)
    pos = 61
    for name, nd in zip(tile.pixel_types, tile.nodata, strict=True):  # flags as PostGIS writes
        pt = wkb.PIXEL_TYPES[name]
        assert buf[pos] == pt.code | (0x40 if nd is not None else 0)
        if nd is None:
            assert buf[pos + 1 : pos + 1 + pt.size] == bytes(pt.size)
        pos += 1 + pt.size * (1 + tile.height * tile.width)
    out = wkb.decode(buf)
    _assert_same_tile(tile, out)
    assert wkb.encode(out, little_endian=little) == buf  # byte-identical re-encode
    other = wkb.encode(out, little_endian=not little)
    _assert_same_tile(tile, wkb.decode(other))
    _assert_same_tile(tile, wkb.decode(bytearray(buf), copy=True))


@settings(max_examples=50, deadline=None)
@given(tile=tiles(), n=st.integers(1, 5), little=st.booleans())
def test_decode_many_matches_decode(tile: wkb.RasterTile, n: int, little: bool) -> None:
    bufs = []
    for k in range(n):  # same layout, different georeference per tile
        moved = wkb.RasterTile(tile.data, (float(k), *tile.geotransform[1:]), tile.srid,
                               tile.nodata, tile.pixel_types, tile._bands)  # fmt: skip
        bufs.append(wkb.encode(moved, little_endian=little))
    batch = wkb.decode_many(bufs)
    assert batch.shape == (n, *tile.data.shape) and batch.flags.c_contiguous
    assert batch.dtype.isnative
    expected = np.stack([wkb.decode(b).data for b in bufs])
    assert np.array_equal(batch, expected, equal_nan=batch.dtype.kind == "f")


# ---------------------------------------------------------------- decode_many


def test_decode_many_uint8_batch() -> None:
    rng = np.random.default_rng(2)
    srcs = rng.integers(0, 256, (5, 3, 8, 9), dtype=np.uint8)
    bufs = [wkb.encode(wkb.from_array(s, geotransform=GT, srid=1)) for s in srcs]
    bufs[2] = memoryview(bufs[2])
    bufs[3] = bytearray(bufs[3])
    out = wkb.decode_many(iter(bufs))
    assert np.array_equal(out, srcs) and out.flags.writeable


def test_decode_many_rejects_mismatched_tiles() -> None:
    a = wkb.encode(wkb.from_array(np.zeros((3, 4, 4), np.uint8), geotransform=GT, srid=1))
    b = wkb.encode(wkb.from_array(np.zeros((3, 4, 5), np.uint8), geotransform=GT, srid=1))
    c = wkb.encode(wkb.from_array(np.zeros((3, 4, 4), np.int8), geotransform=GT, srid=1))
    for bad in (b, c):
        with pytest.raises(RasterFormatError, match="decode_many: tile 1"):
            wkb.decode_many([a, bad])
    with pytest.raises(RasterFormatError, match="truncated"):
        wkb.decode_many([a, a[:-1]])
    with pytest.raises(RasterFormatError, match="at least one"):
        wkb.decode_many([])


# ---------------------------------------------------------------- bad input


def _small_raster() -> bytes:
    src = np.array([[[1, 2], [3, 4]], [[5, 6], [7, 8]]], np.uint16)
    return wkb.encode(wkb.from_array(src, geotransform=GT, srid=4326, nodata=[0, None]))


@pytest.mark.parametrize("little", [True, False])
def test_every_truncation_is_rejected(little: bool) -> None:
    buf = wkb.encode(wkb.decode(_small_raster()), little_endian=little)
    for k in range(len(buf)):
        with pytest.raises(RasterFormatError, match="truncated"):
            wkb.decode(buf[:k])
    wkb.decode(buf)


def test_trailing_byte_is_rejected() -> None:
    with pytest.raises(RasterFormatError, match="1 trailing byte"):
        wkb.decode(_small_raster() + b"\x00")
    with pytest.raises(RasterFormatError, match="trailing"):
        wkb.decode(_header(0, 2, 2) + b"\x00")


def test_version_1_is_rejected() -> None:
    buf = _small_raster()
    with pytest.raises(RasterFormatError, match="version 1"):
        wkb.decode(buf[:1] + b"\x01\x00" + buf[3:])


def test_unknown_endianness_is_rejected() -> None:
    buf = _small_raster()
    with pytest.raises(RasterFormatError, match="endianness byte is 2"):
        wkb.decode(b"\x02" + buf[1:])


@pytest.mark.parametrize("endian", [0, 1])
def test_out_db_band_is_rejected(endian: int) -> None:
    # 8BUI out-db band: flags, nodata, band number, NUL-terminated path (RFC2)
    band = bytes((0x80 | 0x40 | 4, 0, 1)) + b"/data/tile.tif\x00"
    with pytest.raises(RasterFormatError, match="out-db bands are not supported"):
        wkb.decode(_header(1, 2, 2, endian=endian) + band)


@pytest.mark.parametrize("code", [9, 12, 13, 14, 15])
def test_unknown_pixel_type_is_rejected(code: int) -> None:
    buf = bytearray(KNOWN_8BUI)
    buf[61] = 0x40 | code
    with pytest.raises(RasterFormatError, match=f"unknown pixel type {code}"):
        wkb.decode(bytes(buf))


def test_zero_size_with_bands_is_rejected() -> None:
    for w, h in ((0, 2), (2, 0), (0, 0)):
        with pytest.raises(RasterFormatError, match="band"):
            wkb.decode(_header(1, w, h) + b"\x04\x00")


@pytest.mark.parametrize(("code", "bad"), [(0, 2), (1, 4), (2, 16)])
def test_sub_byte_pixel_out_of_range_is_rejected(code: int, bad: int) -> None:
    buf = _header(1, 2, 1) + bytes((code, 0, 0, bad))
    with pytest.raises(RasterFormatError, match="above"):
        wkb.decode(buf)


def test_sub_byte_nodata_is_masked_like_postgis() -> None:
    assert wkb.decode(_header(1, 1, 1) + bytes((0x42, 0xFF, 3))).nodata == (15,)


@pytest.mark.parametrize("bad", [None, "0100", 42, memoryview(b"ab" * 40)[::2]])
def test_non_bytes_input_is_rejected(bad: object) -> None:
    with pytest.raises(RasterFormatError):
        wkb.decode(bad)  # type: ignore[arg-type]


def test_errors_are_one_line() -> None:
    for buf in (b"", b"\x05" * 61, _small_raster()[:70], _small_raster() + b"xx"):
        with pytest.raises(RasterFormatError) as info:
            wkb.decode(buf)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------- encode / from_array


@pytest.mark.parametrize(("name", "bad"), [("1BB", 2), ("2BUI", 4), ("4BUI", 16)])
def test_encode_checks_sub_byte_values(name: str, bad: int) -> None:
    ok = wkb.from_array(np.array([[0, 1]], np.uint8), geotransform=GT, srid=0, pixel_types=name)
    assert wkb.decode(wkb.encode(ok)).pixel_types == (name,)
    with pytest.raises(RasterFormatError, match=name):
        wkb.from_array(np.array([[0, bad]], np.uint8), geotransform=GT, srid=0, pixel_types=name)
    raw = wkb.RasterTile(np.array([[[0, bad]]], np.uint8), GT, 0, (None,), (name,))
    with pytest.raises(RasterFormatError, match=name):
        wkb.encode(raw)
    with pytest.raises(RasterFormatError, match="nodata"):
        wkb.from_array(np.zeros((1, 1), np.uint8), geotransform=GT, srid=0, nodata=bad,
                       pixel_types=name)  # fmt: skip


def test_from_array_infers_pixel_types() -> None:
    expected = {
        np.uint8: "8BUI", np.int8: "8BSI", np.int16: "16BSI", np.uint16: "16BUI",
        np.int32: "32BSI", np.uint32: "32BUI", np.float32: "32BF", np.float64: "64BF",
    }  # fmt: skip
    for dtype, name in expected.items():
        arr = np.zeros((2, 3), dtype)
        tile = wkb.from_array(arr, geotransform=GT, srid=0)
        assert tile.pixel_types == (name,) and tile.data.shape == (1, 2, 3)
        assert np.shares_memory(tile.data, arr)  # no copy when the dtype already fits
    for dtype in (np.bool_, np.int64, np.uint64, np.float16, np.complex64):
        with pytest.raises(RasterFormatError, match="pixel_types"):
            wkb.from_array(np.zeros((2, 2), dtype), geotransform=GT, srid=0)


def test_from_array_casts_and_checks() -> None:
    tile = wkb.from_array(np.array([[True, False]]), geotransform=GT, srid=0, pixel_types="1BB")
    assert tile.data.dtype == np.uint8 and tile.data.tolist() == [[[1, 0]]]
    with pytest.raises(RasterFormatError, match="outside 8BUI"):
        wkb.from_array(np.array([[256]]), geotransform=GT, srid=0, pixel_types="8BUI")
    with pytest.raises(RasterFormatError, match="non-integer"):
        wkb.from_array(np.array([[1.5]]), geotransform=GT, srid=0, pixel_types="16BSI")
    with pytest.raises(RasterFormatError, match="non-integer"):
        wkb.from_array(np.array([[np.nan]]), geotransform=GT, srid=0, pixel_types="16BSI")
    with pytest.raises(RasterFormatError, match="unknown pixel type"):
        wkb.from_array(np.zeros((1, 1)), geotransform=GT, srid=0, pixel_types="8BIT")
    with pytest.raises(RasterFormatError, match="2 pixel types given for 3"):
        wkb.from_array(np.zeros((3, 1, 1)), geotransform=GT, srid=0, pixel_types=["8BUI"] * 2)
    with pytest.raises(RasterFormatError, match="nodata values given"):
        wkb.from_array(np.zeros((3, 1, 1)), geotransform=GT, srid=0, nodata=[0, 0])
    with pytest.raises(RasterFormatError, match="out of range for 8BSI"):
        wkb.from_array(np.zeros((1, 1), np.int8), geotransform=GT, srid=0, nodata=-129)
    with pytest.raises(RasterFormatError, match="not an integer"):
        wkb.from_array(np.zeros((1, 1), np.int8), geotransform=GT, srid=0, nodata=0.5)
    with pytest.raises(RasterFormatError, match="does not fit 32BF"):
        wkb.from_array(np.zeros((1, 1), np.float32), geotransform=GT, srid=0, nodata=1e300)
    with pytest.raises(RasterFormatError, match="must be a number"):
        wkb.from_array(np.zeros((1, 1), np.float32), geotransform=GT, srid=0, nodata="0")
    nd = wkb.from_array(np.zeros((1, 1), np.float32), geotransform=GT, srid=0, nodata=0.1)
    assert nd.nodata == (float(np.float32(0.1)),)  # what ST_BandNoDataValue reports
    assert wkb.from_array(np.zeros((1, 1), np.int16), geotransform=GT, srid=0,
                          nodata=-1.0).nodata == (-1,)  # fmt: skip


def test_from_array_checks_shape_and_georef() -> None:
    with pytest.raises(RasterFormatError, match="65535"):
        wkb.from_array(np.zeros((1, 65536), np.uint8), geotransform=GT, srid=0)
    with pytest.raises(RasterFormatError, match=r"\(bands, height, width\)"):
        wkb.from_array(np.zeros(4, np.uint8), geotransform=GT, srid=0)
    with pytest.raises(RasterFormatError, match="0x2 pixels"):
        wkb.from_array(np.zeros((1, 2, 0), np.uint8), geotransform=GT, srid=0)
    with pytest.raises(RasterFormatError, match="6 numbers"):
        wkb.from_array(np.zeros((1, 1), np.uint8), geotransform=GT[:5], srid=0)
    with pytest.raises(RasterFormatError, match="int32"):
        wkb.from_array(np.zeros((1, 1), np.uint8), geotransform=GT, srid=2**31)
    with pytest.raises(RasterFormatError, match="srid"):
        wkb.from_array(np.zeros((1, 1), np.uint8), geotransform=GT, srid=4326.5)  # type: ignore[arg-type]


def test_encode_accepts_non_contiguous_and_foreign_order_arrays() -> None:
    src = np.arange(24, dtype=">i2").reshape(2, 3, 4)
    tile = wkb.from_array(src.transpose(0, 2, 1), geotransform=GT, srid=0)
    out = wkb.decode(wkb.encode(tile))
    assert out.data.dtype == np.dtype("<i2")
    assert np.array_equal(out.data, src.transpose(0, 2, 1))


def test_import_is_light() -> None:
    code = (
        "import sys, pggeolearn.wkb; "
        "bad = {'mxnet', 'torch', 'rasterio'} & set(sys.modules); "
        "assert not bad, bad"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(wkb.__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
