"""pggeolearn.wkb against a real PostGIS: what PostGIS builds we decode exactly, what we
encode PostGIS loads exactly (both byte orders), and out-db bands are refused cleanly.

The ``raster`` type has no binary output function, so raster WKB is always fetched through
``ST_AsBinary(rast)`` (bytea) and sent back through ``ST_RastFromWKB(%b::bytea)``.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import psycopg
import pytest
import rasterio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from psycopg.rows import dict_row
from rasterio.transform import Affine

from pggeolearn import wkb
from pggeolearn.errors import RasterFormatError

ALL_TYPES = list(wkb.PIXEL_TYPES)
# ST_MakeEmptyRaster(width, height, upperleftx, upperlefty, scalex, scaley, skewx, skewy, srid)
NEG_SCALE_Y = (10.5, 20.25, 0.5, -0.25, 0.0, 0.0, 4326)
POS_SCALE_Y = (-180.0, -90.0, 0.125, 0.5, 0.0, 0.0, 4326)
SKEWED = (500000.0, 3000000.0, 30.0, -30.0, 1.5, -2.25, 32645)
GEOREFS = {"neg_scale_y": NEG_SCALE_Y, "pos_scale_y": POS_SCALE_Y, "skewed": SKEWED}
META_COLS = ("upperleftx", "upperlefty", "width", "height", "scalex", "scaley", "skewx",
             "skewy", "srid", "numbands")  # fmt: skip


# ---------------------------------------------------------------- helpers


def _same_number(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def _query(
    conn: psycopg.Connection, expr: str, params: Sequence[Any], select: str, tail: str = ""
) -> list[dict[str, Any]]:
    """Evaluate ``select`` over the raster ``expr`` (SQL with ``params``) as ``rast``."""
    q = f"WITH src AS (SELECT {expr} AS rast) SELECT {select} FROM src {tail}"
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(q, params, binary=True).fetchall()


class PostgisView:
    """Everything PostGIS reports about one raster."""

    def __init__(self, conn: psycopg.Connection, expr: str, params: Sequence[Any] = ()):
        self.wkb = bytes(_query(conn, expr, params, "ST_AsBinary(rast) AS wkb")[0]["wkb"])
        self.meta = _query(conn, expr, params, "(ST_MetaData(rast)).*")[0]
        self.bands = _query(
            conn, expr, params,
            "b, (ST_BandMetaData(rast, b)).*, ST_BandIsNoData(rast, b) AS isnodata_flag,"
            " ST_DumpValues(rast, b, false) AS vals",
            ", generate_series(1, ST_NumBands(rast)) AS b ORDER BY b",
        )  # fmt: skip


def assert_tile_matches(tile: wkb.RasterTile, pg: PostgisView) -> None:
    """``tile`` has exactly PostGIS's metadata, band metadata and every pixel value."""
    assert tile.metadata() == {k: pg.meta[k] for k in META_COLS}
    assert [b["b"] for b in pg.bands] == list(range(1, tile.bands + 1))
    for i, pgb in enumerate(pg.bands):
        ours = tile.band_metadata(i)
        assert ours["pixeltype"] == pgb["pixeltype"], f"band {i + 1}"
        assert _same_number(ours["nodatavalue"], pgb["nodatavalue"]), (
            f"band {i + 1} nodata {ours['nodatavalue']!r} vs PostGIS {pgb['nodatavalue']!r}"
        )
        assert (ours["isoutdb"], ours["path"]) == (pgb["isoutdb"], pgb["path"]) == (False, None)
        want = tile.band(i).astype(np.float64)
        flat = [v for row in pgb["vals"] for v in row]
        if pgb["isnodata_flag"]:
            # PostGIS's isNodata hint ("every pixel is nodata", which our decoder ignores):
            # ST_DumpValues then reports NULL everywhere, even with exclude_nodata false
            assert all(v is None for v in flat)
            assert all(_same_number(v, ours["nodatavalue"]) for v in want.ravel().tolist())
            continue
        assert None not in flat, f"band {i + 1}: NULL from ST_DumpValues(rast, b, false)"
        got = np.asarray(pgb["vals"], dtype=np.float64)
        assert got.shape == want.shape == (tile.height, tile.width)
        np.testing.assert_array_equal(want, got, err_msg=f"band {i + 1} ({ours['pixeltype']})")
        finite = ~np.isnan(got)
        assert np.array_equal(np.signbit(got[finite]), np.signbit(want[finite])), "signed zero"


def _band_flag_offsets(tile: wkb.RasterTile) -> list[int]:
    pos, out = wkb.HEADER_SIZE, []
    for name in tile.pixel_types:
        size = wkb.PIXEL_TYPES[name].size
        out.append(pos)
        pos += 1 + size + tile.width * tile.height * size
    return out


def _without_isnodata(buf: bytes, tile: wkb.RasterTile) -> bytes:
    """``buf`` with the isNodata hint (0x20) cleared: PostGIS sets it, our encoder does not."""
    b = bytearray(buf)
    for p in _band_flag_offsets(tile):
        b[p] &= ~0x20 & 0xFF
    return bytes(b)


def _sample_values(name: str, n: int, seed: int) -> list[float]:
    """``n`` values of pixel type ``name`` starting with its extremes (as float8 for SQL)."""
    pt = wkb.PIXEL_TYPES[name]
    rng = np.random.default_rng(seed)
    if pt.is_float:
        fi = np.finfo(pt.dtype)
        fixed = [float(fi.max), float(-fi.max), math.nan, float(fi.tiny), -0.0, 0.1,
                 math.pi, -1.0e-3, float(fi.smallest_subnormal)]  # fmt: skip
        extra = (rng.standard_normal(n) * 1000).tolist()
    else:
        lo, hi = int(pt.lo), int(pt.hi)
        fixed = [lo, hi, (lo + hi) // 2, lo + 1, hi - 1, max(lo, 0)]
        extra = rng.integers(lo, hi, n, endpoint=True).tolist()
    return [float(v) for v in (fixed + extra)[:n]]


def _expected(values: list[float], name: str, h: int, w: int) -> np.ndarray:
    return np.asarray(values, np.float64).astype(wkb.PIXEL_TYPES[name].dtype).reshape(h, w)


class SqlRaster:
    """A raster built by PostGIS in SQL, with the pixel values it must hold."""

    def __init__(self, width: int, height: int, georef: tuple) -> None:
        self.width, self.height = width, height
        self.expr = "ST_MakeEmptyRaster(%s, %s, %s, %s, %s, %s, %s, %s, %s)"
        self.params: list[Any] = [width, height, *georef]
        self.georef = georef
        self.expected: list[np.ndarray] = []
        self.nodata: list[float | None] = []
        self.types: list[str] = []

    def add_band(
        self, name: str, *, init: float, nodata: float | None, values: list[float] | None = None
    ) -> SqlRaster:
        self.expr = f"ST_AddBand({self.expr}, %s::text, %s::float8, %s::float8)"
        self.params += [name, init, nodata]
        h, w = self.height, self.width
        if values is None:
            self.expected.append(_expected([init] * (h * w), name, h, w))
        else:
            band = len(self.types) + 1
            self.expr = f"ST_SetValues({self.expr}, {band}, 1, 1, %s::float8[])"
            self.params.append([values[r * w : (r + 1) * w] for r in range(h)])
            self.expected.append(_expected(values, name, h, w))
        self.types.append(name)
        self.nodata.append(nodata)
        return self


def _typed_bands(name: str, width: int, height: int, georef: tuple, seed: int) -> SqlRaster:
    """Three bands of one type: nodata present in the data, no nodata, all nodata."""
    n = width * height
    vals = _sample_values(name, n, seed)
    nodata = vals[min(n - 1, 7)]  # a value that really occurs, so some pixels are nodata
    if math.isnan(nodata):
        nodata = vals[0]
    hi = wkb.PIXEL_TYPES[name].hi
    all_nd = 1.0 if math.isinf(hi) else float(hi)
    return (
        SqlRaster(width, height, georef)
        .add_band(name, init=0, nodata=nodata, values=vals)
        .add_band(name, init=0, nodata=None, values=_sample_values(name, n, seed + 1)[::-1])
        .add_band(name, init=all_nd, nodata=all_nd)  # PostGIS sets isNodata on this band
    )


def _check_sql_raster(conn: psycopg.Connection, r: SqlRaster) -> tuple[wkb.RasterTile, PostgisView]:
    pg = PostgisView(conn, r.expr, r.params)
    tile = wkb.decode(pg.wkb)
    assert tile.pixel_types == tuple(r.types)
    assert tile.srid == r.georef[6]
    assert tile.geotransform == (r.georef[0], r.georef[2], r.georef[4], r.georef[1],
                                 r.georef[5], r.georef[3])  # fmt: skip
    for i, want in enumerate(r.expected):
        assert tile.band(i).dtype == wkb.PIXEL_TYPES[r.types[i]].dtype
        np.testing.assert_array_equal(tile.band(i), want, err_msg=f"band {i + 1}")
        nd = r.nodata[i]
        assert _same_number(tile.nodata[i], None if nd is None else want.dtype.type(nd).item())
    assert_tile_matches(tile, pg)
    assert_tile_matches(wkb.decode(pg.wkb, copy=True), pg)
    # our encoder writes what ST_AsBinary writes, bar the isNodata hint
    assert wkb.encode(tile) == _without_isnodata(pg.wkb, tile)
    # PostGIS never writes XDR; encode it ourselves and check PostGIS reads it back the same
    xdr = wkb.encode(tile, little_endian=False)
    assert xdr[0] == 0
    loaded = PostgisView(conn, "ST_RastFromWKB(%b::bytea)", [xdr])
    assert_tile_matches(tile, loaded)
    from_xdr = wkb.decode(xdr)
    for i in range(tile.bands):
        assert from_xdr.band(i).dtype.byteorder in "|>"  # a big-endian view, no swapping
        np.testing.assert_array_equal(from_xdr.band(i), tile.band(i))
    assert loaded.wkb == wkb.encode(tile)
    return tile, pg


# ---------------------------------------------------------------- 1. PostGIS-built rasters


@pytest.mark.parametrize("name", ALL_TYPES)
@pytest.mark.parametrize("georef", GEOREFS.values(), ids=GEOREFS.keys())
def test_postgis_built_bands_of_each_type(conn, name, georef):
    r = _typed_bands(name, 5, 3, georef, seed=ALL_TYPES.index(name))
    tile, pg = _check_sql_raster(conn, r)
    assert tile._bands is None  # one dtype: a single strided view over the fetched bytes
    assert np.shares_memory(tile.data, np.frombuffer(pg.wkb, np.uint8))


def test_postgis_built_raster_with_every_type(conn):
    r = SqlRaster(7, 2, SKEWED)
    for k, name in enumerate(ALL_TYPES):
        vals = _sample_values(name, 14, seed=100 + k)
        r.add_band(name, init=0, nodata=vals[3] if k % 2 else None, values=vals)
    tile, _ = _check_sql_raster(conn, r)
    assert tile.bands == len(ALL_TYPES) and tile._bands is not None  # mixed: per-band views


@pytest.mark.parametrize("width,height", [(1, 1), (1, 9), (9, 1), (13, 11)])
def test_postgis_built_odd_shapes(conn, width, height):
    r = SqlRaster(width, height, (0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0))
    n = width * height
    r.add_band("16BSI", init=-1, nodata=-1, values=_sample_values("16BSI", n, 7))
    r.add_band("4BUI", init=0, nodata=None, values=_sample_values("4BUI", n, 8))
    r.add_band("64BF", init=0, nodata=math.nan, values=_sample_values("64BF", n, 9))
    _check_sql_raster(conn, r)


def test_postgis_tiles_decode_many(conn):
    r = _typed_bands("16BUI", 6, 4, NEG_SCALE_Y, seed=3)
    whole, _ = _check_sql_raster(conn, r)
    rows = _query(conn, r.expr, r.params, "ST_AsBinary(ST_Tile(rast, 2, 2)) AS wkb")
    bufs = [bytes(row["wkb"]) for row in rows]
    assert len(bufs) == 6
    stacked = wkb.decode_many(bufs)
    assert stacked.shape == (6, 3, 2, 2) and stacked.dtype == np.dtype("=u2")
    x0, y0 = whole.upper_left
    for k, buf in enumerate(bufs):
        tile = wkb.decode(buf)
        np.testing.assert_array_equal(stacked[k], tile.data)
        col = round((tile.upper_left[0] - x0) / whole.scale_x)
        row = round((tile.upper_left[1] - y0) / whole.scale_y)
        np.testing.assert_array_equal(tile.data, whole.data[:, row : row + 2, col : col + 2])
        assert tile.nodata == whole.nodata


def test_postgis_cannot_write_big_endian(conn):
    """ST_AsBinary has no byte order argument (unlike geometry's); XDR is ours to test."""
    sigs = {
        r[0]
        for r in conn.execute(
            "SELECT oid::regprocedure::text FROM pg_proc WHERE proname = 'st_asbinary'"
        )
    }
    assert "st_asbinary(raster,boolean)" in sigs
    assert not any(
        s.startswith("st_asbinary(raster,") and s != "st_asbinary(raster,boolean)" for s in sigs
    )


# ---------------------------------------------------------------- 2. our WKB into PostGIS


@st.composite
def tiles(draw) -> wkb.RasterTile:
    nb = draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    names = draw(st.lists(st.sampled_from(ALL_TYPES), min_size=nb, max_size=nb))
    arrays, nodata = [], []
    for name in names:
        pt = wkb.PIXEL_TYPES[name]
        if pt.is_float:
            elements = st.floats(width=pt.size * 8)
        else:
            elements = st.integers(int(pt.lo), int(pt.hi))
        arr = draw(hnp.arrays(pt.dtype, (h, w), elements=elements))
        arrays.append(arr)
        nodata.append(draw(st.none() | elements | st.sampled_from(arr.ravel().tolist())))
    finite = st.floats(allow_nan=False, allow_infinity=False)
    gt = tuple(draw(finite) for _ in range(6))
    srid = draw(st.integers(0, 999_999))  # PostGIS clamps SRIDs outside this range
    data = np.stack([a.astype(np.result_type(*arrays)) for a in arrays])
    return wkb.from_array(data, geotransform=gt, srid=srid, nodata=nodata, pixel_types=names)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(tile=tiles())
def test_our_wkb_loads_into_postgis(conn, tile):
    ndr = wkb.encode(tile)
    for little in (True, False):
        buf = wkb.encode(tile, little_endian=little)
        assert buf[0] == int(little)
        pg = PostgisView(conn, "ST_RastFromWKB(%b::bytea)", [buf])
        assert_tile_matches(tile, pg)
        assert pg.wkb == ndr  # PostGIS stores and returns exactly what we wrote
        assert wkb.encode(wkb.decode(pg.wkb)) == ndr


@pytest.mark.parametrize("name", ALL_TYPES)
@pytest.mark.parametrize("little", [True, False], ids=["ndr", "xdr"])
def test_our_wkb_every_type_both_orders(conn, name, little):
    pt = wkb.PIXEL_TYPES[name]
    vals = _sample_values(name, 15, seed=42)
    data = _expected(vals, name, 3, 5)
    tile = wkb.from_array(
        data,
        geotransform=(1.0, 2.0, 0.0, 3.0, 0.0, 4.0),
        srid=3857,
        nodata=vals[1],
        pixel_types=name,
    )  # positive scaleY
    assert tile.band(0).dtype == pt.dtype
    buf = wkb.encode(tile, little_endian=little)
    pg = PostgisView(conn, "ST_RastFromWKB(%b::bytea)", [buf])
    assert_tile_matches(tile, pg)
    assert pg.wkb == wkb.encode(tile)


# ---------------------------------------------------------------- 3. ST_Value


def _st_values(conn, expr: str, params: Sequence[Any], band: int, exclude: bool) -> np.ndarray:
    """``ST_Value(rast, band, x, y, exclude)`` for every pixel, as a (height, width) array."""
    rows = _query(
        conn,
        expr,
        params,
        f"x, y, ST_Width(rast) AS w, ST_Height(rast) AS h, "
        f"ST_Value(rast, {band}, x, y, {'true' if exclude else 'false'}) AS v",
        ", generate_series(1, ST_Width(rast)) AS x, generate_series(1, ST_Height(rast)) AS y",
    )
    out = np.empty((rows[0]["h"], rows[0]["w"]), object)
    assert len(rows) == out.size
    for row in rows:
        out[row["y"] - 1, row["x"] - 1] = row["v"]  # x is the column, y the row, from 1
    return out


@pytest.mark.parametrize("source", ["sql", "ndr", "xdr"])
def test_st_value_spot_checks(conn, source):
    r = (SqlRaster(5, 3, NEG_SCALE_Y)
         .add_band("16BSI", init=0, nodata=-9999,
                   values=[-9999, 1, 2, 3, 4, 5, -9999, 7, 8, 9, 10, 11, 12, 13, -9999])
         .add_band("32BF", init=0, nodata=None, values=_sample_values("32BF", 15, 5))
         .add_band("8BUI", init=255, nodata=255))  # fmt: skip
    tile = wkb.decode(PostgisView(conn, r.expr, r.params).wkb)
    if source == "sql":
        expr, params = r.expr, r.params
    else:
        buf = wkb.encode(tile, little_endian=source == "ndr")
        expr, params = "ST_RastFromWKB(%b::bytea)", [buf]

    b1 = _st_values(conn, expr, params, 1, exclude=True)
    assert b1[0, 0] is None and b1[1, 1] is None and b1[2, 4] is None  # nodata pixels -> NULL
    assert (b1[0, 1], b1[0, 4], b1[1, 0], b1[2, 3]) == (1.0, 4.0, 5.0, 13.0)
    mask = tile.band(0) == tile.nodata[0]
    assert mask.sum() == 3
    np.testing.assert_array_equal(b1[~mask].astype(float), tile.band(0)[~mask])
    b1_all = _st_values(conn, expr, params, 1, exclude=False)
    assert b1_all[0, 0] == -9999.0
    np.testing.assert_array_equal(b1_all.astype(float), tile.band(0))

    b2 = _st_values(conn, expr, params, 2, exclude=True)  # no nodata: never NULL
    np.testing.assert_array_equal(b2.astype(float), tile.band(1).astype(float))

    b3 = _st_values(conn, expr, params, 3, exclude=True)  # every pixel is nodata
    assert all(v is None for v in b3.ravel())
    assert (tile.band(2) == 255).all() and tile.nodata[2] == 255


# ---------------------------------------------------------------- 4. out-db bands


@pytest.fixture
def outdb_conn(conn):
    try:
        conn.execute("SET postgis.enable_outdb_rasters = true")
        conn.execute("SET postgis.gdal_enabled_drivers = 'ENABLE_ALL'")
    except psycopg.Error as exc:
        pytest.skip(f"cannot enable out-db rasters in this session (needs superuser): {exc}")
    return conn


@pytest.fixture
def server_readable_dir():
    """A directory the server (the ``postgres`` OS user when run as root) can read."""
    path = tempfile.mkdtemp(prefix="pgl_outdb_")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_outdb_band_is_refused_unless_expanded(outdb_conn, server_readable_dir):
    conn = outdb_conn
    path = os.path.join(server_readable_dir, "band.tif")
    pixels = np.arange(15, dtype=np.uint16).reshape(3, 5) * 101 + 7
    transform = Affine(0.5, 0.0, 10.0, 0.0, -0.5, 20.0)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=5,
        height=3,
        count=1,
        dtype="uint16",
        crs="EPSG:4326",
        transform=transform,
        nodata=7,
    ) as ds:
        ds.write(pixels, 1)
    os.chmod(path, 0o644)
    try:
        conn.execute("SELECT pg_stat_file(%s)", (path,))
    except psycopg.Error as exc:
        pytest.skip(f"the server cannot see the test's file (remote server?): {exc}")

    # ST_AddBand(rast, index, outdbfile, outdbindex[], nodataval)
    expr = (
        "ST_AddBand(ST_MakeEmptyRaster(5, 3, 10, 20, 0.5, -0.5, 0, 0, 4326), "
        "1, %s::text, ARRAY[1]::int[])"
    )
    outdb_wkb, indb_wkb, isoutdb, band_path = conn.execute(
        f"WITH src AS (SELECT {expr} AS rast) SELECT ST_AsBinary(rast), ST_AsBinary(rast, true),"
        " (ST_BandMetaData(rast, 1)).isoutdb, (ST_BandMetaData(rast, 1)).path FROM src",
        (path,),
        binary=True,
    ).fetchone()
    assert isoutdb is True and band_path == path
    assert outdb_wkb[wkb.HEADER_SIZE] & 0x80  # the out-db flag, then a path instead of pixels
    with pytest.raises(RasterFormatError, match=r"out-db bands are not supported \(band 1\)"):
        wkb.decode(bytes(outdb_wkb))

    tile = wkb.decode(bytes(indb_wkb))
    assert tile.pixel_types == ("16BUI",) and tile.nodata == (7,)
    assert tile.geotransform == (10.0, 0.5, 0.0, 20.0, 0.0, -0.5) and tile.srid == 4326
    np.testing.assert_array_equal(tile.band(0), pixels)
    meta = _query(conn, expr, [path], "(ST_MetaData(rast)).*")[0]
    assert tile.metadata() == {k: meta[k] for k in META_COLS}
    dumped = _query(conn, expr, [path], "ST_DumpValues(rast, 1, false) AS v")[0]["v"]
    np.testing.assert_array_equal(np.asarray(dumped, np.float64), pixels)

    # an in-db band before the out-db one: the error names the out-db band
    mixed = (
        "ST_AddBand(ST_AddBand(ST_MakeEmptyRaster(5, 3, 10, 20, 0.5, -0.5, 0, 0, 4326), "
        "'8BUI'::text, 1, 0), 2, %s::text, ARRAY[1]::int[])"
    )
    (mixed_wkb,) = conn.execute(f"SELECT ST_AsBinary({mixed})", (path,), binary=True).fetchone()
    with pytest.raises(RasterFormatError, match=r"band 2"):
        wkb.decode(bytes(mixed_wkb))
    (mixed_in,) = conn.execute(
        f"SELECT ST_AsBinary({mixed}, true)", (path,), binary=True
    ).fetchone()
    both = wkb.decode(bytes(mixed_in))
    assert both.pixel_types == ("8BUI", "16BUI")
    assert (both.band(0) == 1).all()
    np.testing.assert_array_equal(both.band(1), pixels)
