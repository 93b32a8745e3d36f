"""Overviews of prediction rasters: whole, aligned tiles with the base's SRID that GDAL and QGIS
read (ST_CreateOverview wrote slivers and empty SRID-0 tiles on grids with non-round numbers)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from psycopg import sql
from qgis_helpers import needs_qgis, probe

from pggeolearn import errors, publish, wkb
from pggeolearn.qgis import overviews
from pggeolearn.qgis.uris import layer_uri

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_predict import BrightnessPredictor, extent_of, load_array  # noqa: E402

from pggeolearn import predict  # noqa: E402

UL = (9519900.123456789, 3202900.987654321)  # not round: ST_CreateOverview broke here
RES = 0.5317742
W, H = 300, 260


def scene() -> np.ndarray:
    rng = np.random.default_rng(3)
    data = np.full((3, H, W), 30, np.uint8)
    for _ in range(30):
        r, c = rng.integers(0, H - 20), rng.integers(0, W - 20)
        data[:, r:r + 15, c:c + 15] = 230
    return data


@pytest.fixture
def prediction(conn, db_dsn):
    load_array(conn, "public.img", scene(), ul=UL, res=RES, tile=50)
    predict.predict(db_dsn, BrightnessPredictor(resolution=RES), out="public.pred", imagery="public.img",
                    extent=extent_of(*UL, W, H, RES), overlap=8, tile_px=64, probabilities=True,
                    progress=False)
    return conn


def paste(conn, table: str, ulx: float, uly: float, res: float, w: int, h: int, bands: int = 1) -> np.ndarray:
    """A raster table pasted on the grid (ulx, uly, res, w x h); 255 where no tile."""
    out = np.full((bands, h, w), 255, np.uint8)
    schema, name = table.split(".")
    for (buf,) in conn.execute(sql.SQL("SELECT ST_AsBinary(rast) FROM {}").format(sql.Identifier(schema, name))):
        t = wkb.decode(buf)
        c, r = round((t.upper_left[0] - ulx) / res), round((uly - t.upper_left[1]) / res)
        assert math.isclose(t.upper_left[0], ulx + c * res, abs_tol=1e-6)
        assert math.isclose(t.upper_left[1], uly - r * res, abs_tol=1e-6)
        out[:, r:r + t.height, c:c + t.width] = t.data
    return out


@pytest.mark.parametrize("factor", [2, 4])
def test_overview_tiles_are_whole_aligned_and_exact(prediction, factor):
    conn = prediction
    o = f"o_{factor}_pred"
    tiles = conn.execute(sql.SQL("SELECT ST_Width(rast), ST_Height(rast), ST_SRID(rast), ST_ScaleX(rast),"
                                 " ST_ScaleY(rast), ST_UpperLeftX(rast), ST_UpperLeftY(rast) FROM {}"
                                 ).format(sql.Identifier("public", o))).fetchall()
    assert tiles and all(w > 0 and h > 0 and srid == 3857 for w, h, srid, *_ in tiles)
    assert all(math.isclose(sx, RES * factor) and math.isclose(sy, -RES * factor) for *_, sx, sy, _x, _y in tiles)
    ow, oh = math.ceil(W / factor), math.ceil(H / factor)
    # one tile row and column cover the overview exactly: no slivers, no 65-px tiles
    first_row = [t for t in tiles if math.isclose(t[6], UL[1])]
    first_col = [t for t in tiles if math.isclose(t[5], UL[0])]
    assert sum(t[0] for t in first_row) == ow and sum(t[1] for t in first_col) == oh
    assert max(t[0] for t in tiles) <= 64 and max(t[1] for t in tiles) <= 64
    rc = conn.execute("SELECT srid, scale_x, same_alignment, blocksize_x, blocksize_y, nodata_values, extent"
                      " IS NOT NULL FROM raster_columns WHERE r_table_name = %s", [o]).fetchone()
    assert rc[0] == 3857 and math.isclose(rc[1], RES * factor) and rc[2] is True
    assert rc[3] == 64 and rc[4] == 64 and rc[5] == [255.0] and rc[6] is True
    ov = conn.execute("SELECT r_table_name, overview_factor FROM raster_overviews WHERE o_table_name = %s",
                      [o]).fetchone()
    assert ov == ("pred", factor)
    # nearest: the pixel at the centre of each factor x factor block of the base raster
    base = paste(conn, "public.pred", *UL, RES, ow * factor, oh * factor)
    got = paste(conn, f"public.{o}", *UL, RES * factor, ow, oh)
    k = factor // 2
    assert np.array_equal(got, base[:, k::factor, k::factor])
    assert (got == 1).sum() > 0


def test_probability_overviews_average_valid_pixels(prediction):
    conn = prediction
    base = paste(conn, "public.pred_prob", *UL, RES, 150 * 2, 130 * 2, bands=2).astype(float)
    got = paste(conn, "public.o_2_pred_prob", *UL, RES * 2, 150, 130, bands=2)
    blocks = base.reshape(2, 130, 2, 150, 2)
    valid = blocks != 255
    mean = np.where(valid, blocks, 0).sum(axis=(2, 4)) / np.maximum(valid.sum(axis=(2, 4)), 1)
    expect = np.where(valid.any(axis=(2, 4)), np.rint(mean), 255)
    assert np.array_equal(got, expect.astype(np.uint8))


def test_no_tile_without_a_value_and_errors(conn):
    """All-NODATA blocks give no overview tile; skewed or mixed grids are refused in one line."""
    data = np.full((1, 128, 128), 255, np.uint8)
    data[0, :10, :10] = 1
    load_array(conn, "public.c", data, tile=32, nodata=255)
    publish.publish_raster(conn, "public.c", overviews=())
    name, n = overviews.build_overview(conn, "public.c", 2)
    assert name == "public.o_2_c" and n == 1
    assert overviews.build_overview(conn, "public.c", 4)[1] == 1
    conn.execute("SELECT DropRasterConstraints('public'::name, 'c'::name, 'rast'::name)")
    conn.execute("INSERT INTO public.c (rast) SELECT ST_SetScale(rast, 2) FROM public.c LIMIT 1")
    with pytest.raises(errors.ConfigError, match="one grid"):
        overviews.build_overview(conn, "public.c", 2)
    with pytest.raises(errors.ConfigError, match="factor"):
        overviews.build_overview(conn, "public.c", 1)
    with pytest.raises(errors.ConfigError, match="63 bytes"):
        overviews.overview_name("x" * 62, 2)


@pytest.mark.skipif(not shutil.which("gdalinfo"), reason="gdal-bin not installed")
def test_gdal_opens_the_table_and_its_overviews(prediction, tmp_path):
    conn = prediction
    cs = publish.gdal_connstring(conn, "public.pred", column="rast")
    info = subprocess.run(["gdalinfo", cs], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0 and "ERROR" not in info.stderr, info.stderr
    assert f"Size is {W}, {H}" in info.stdout
    assert "Overviews: 150x130, 75x65" in info.stdout
    for i, size in enumerate(("150, 130", "75, 65")):
        tif = tmp_path / f"ov{i}.tif"
        out = subprocess.run(["gdal_translate", "-q", "-ovr", str(i), cs, str(tif)], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0 and "ERROR" not in out.stderr, out.stderr
        stats = subprocess.run(["gdalinfo", "-stats", str(tif)], capture_output=True, text=True).stdout
        assert f"Size is {size}" in stats and re.search(r"STATISTICS_MAXIMUM=1\b", stats)
    for o in ("o_2_pred", "o_4_pred"):
        out = subprocess.run(["gdalinfo", publish.gdal_connstring(conn, f"public.{o}", column="rast")],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "different srid" not in out.stderr, out.stderr


@needs_qgis
def test_qgis_draws_the_class_raster_zoomed_out(prediction, tmp_path):
    conn = prediction
    qml = publish.class_raster_qml({0: "background", 1: "building"})
    layers = [{"name": n, "provider": "postgresraster", "uri": layer_uri(conn, f"public.{n}", raster=True),
               "qml": qml.split("\n", 1)[1]} for n in ("pred", "pred_prob")]
    layers[1].pop("qml")
    rep = probe({"layers": layers, "factors": [1, 4, 16], "out": str(tmp_path)}, tmp_path)
    cls, prob = rep["layers"]
    assert cls["valid"] and cls["renderer"] == "paletted" and cls["width"] == W
    assert all(cls["renders"][k] > 0 for k in ("1", "4", "16")), cls["renders"]
    assert prob["valid"] and all(prob["renders"][k] > 0 for k in ("1", "4", "16"))
