"""GDAL interop: ST_AsGDALRaster works on the embedded cluster (GTiff, PNG, JPEG enabled), and
GDAL's PostGIS Raster driver reads a prediction table's values (not all NODATA)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from test_predict import UL, BrightnessPredictor, extent_of, load_array

from pggeolearn.predict import predict


def test_st_asgdalraster_gtiff_png_jpeg(conn):
    rast = ("ST_AddBand(ST_MakeEmptyRaster(8, 8, 0, 8, 1, -1, 0, 0, 3857), '8BUI'::text, "
            "7::float8, NULL::float8)")
    for fmt, magic in (("GTiff", b"II*\x00"), ("PNG", b"\x89PNG"), ("JPEG", b"\xff\xd8")):
        blob = conn.execute(f"SELECT ST_AsGDALRaster({rast}, %s)", [fmt]).fetchone()[0]
        assert bytes(blob).startswith(magic), fmt
    # out-db rasters stay off
    assert conn.execute("SHOW postgis.enable_outdb_rasters").fetchone()[0] in ("off", "false")


@pytest.mark.skipif(shutil.which("gdalinfo") is None, reason="gdalinfo not installed")
def test_gdalinfo_reads_prediction_values(conn, db_dsn):
    """GDAL 3.6's PostGIS Raster driver (mode=2, the whole table as one raster) reads a table
    just written by predict as all NODATA; the same rows rewritten by VACUUM FULL (or CLUSTER,
    or copied with CREATE TABLE AS) read right. Neither the primary key, the GiST index, the
    overviews nor ANALYZE is the cause (each tried). The documented invocation: VACUUM FULL
    the output, then gdalinfo / gdal_translate with mode=2."""
    data = np.full((3, 128, 128), 30, np.uint8)
    data[:, 20:80, 30:90] = 230
    load_array(conn, "public.img", data)
    predict(db_dsn, BrightnessPredictor(), out="public.pred", imagery="public.img",
            extent=extent_of(*UL, 128, 128), vectorize=False, progress=False)
    conn.execute("VACUUM FULL public.pred")
    info = conn.info
    pg = (f"PG:host={info.host} port={info.port} dbname={info.dbname} user={info.user} "
          "schema=public table=pred column=rast mode=2")
    out = subprocess.run(["gdalinfo", "-stats", pg], capture_output=True, text=True, timeout=120)
    assert "STATISTICS_MAXIMUM=1" in out.stdout and "STATISTICS_MINIMUM=0" in out.stdout, out.stderr
    mean = conn.execute("SELECT (ST_SummaryStats(rast)).mean FROM public.pred").fetchone()[0]
    assert float(out.stdout.split("STATISTICS_MEAN=")[1].split()[0]) == pytest.approx(mean, abs=1e-6)
