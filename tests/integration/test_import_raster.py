"""import_raster against a real PostGIS: exact pixels, raster2pgsql parity, reprojection."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import psycopg
import pytest
import rasterio
from psycopg import sql
from rasterio.transform import Affine, from_origin
from rasterio.warp import transform as warp_transform

from pggeolearn import errors, wkb
from pggeolearn.importers import import_raster

UTM = 32645  # UTM 45N (Nepal)
Z19 = 2 * np.pi * 6378137 / 2**19 / 512  # Web-Mercator zoom-19 pixel, as in the Banepa mosaic


def write_tif(path: Path, data: np.ndarray, transform: Affine, crs: str | None, nodata=None,
              **extra) -> Path:
    count, height, width = data.shape
    profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=data.dtype,
                   transform=transform, nodata=nodata, **extra)
    if crs is not None:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def source_with_nodata(seed: int = 7) -> np.ndarray:
    """600 x 300, 3 x uint8, nodata 0: one all-nodata tile, one all-nodata band, a hole."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 256, (3, 300, 600), dtype=np.uint8)
    a[:, 0:256, 256:512] = 0  # tile (row 0, col 1): every band NODATA -> skipped
    a[1, 256:300, 0:256] = 0  # tile (row 1, col 0): band 2 NODATA only -> kept
    a[:, 10:20, 10:20] = 0  # a hole inside tile (0, 0)
    return a


@pytest.fixture
def utm_tif(tmp_path) -> tuple[Path, np.ndarray, Affine]:
    data = source_with_nodata()
    transform = from_origin(500000.25, 3000000.75, 0.5, 0.5)
    path = write_tif(tmp_path / "utm.tif", data, transform, f"EPSG:{UTM}", nodata=0)
    return path, data, transform


def tiles(conn: psycopg.Connection, table: str) -> list[wkb.RasterTile]:
    rows = conn.execute(sql.SQL(
        "SELECT ST_AsBinary(rast) FROM {} ORDER BY ST_UpperLeftY(rast) DESC, ST_UpperLeftX(rast)"
    ).format(sql.Identifier(*table.split(".")))).fetchall()
    return [wkb.decode(r[0], copy=True) for r in rows]


def reassemble(ts: list[wkb.RasterTile], transform: Affine, shape: tuple[int, ...], fill=0
               ) -> np.ndarray:
    """Place each tile by its upper-left corner on the source grid."""
    out = np.full(shape, fill, dtype=ts[0].data.dtype)
    for t in ts:
        col, row = ~transform @ t.upper_left
        c, r = round(col), round(row)
        assert abs(col - c) < 1e-6 and abs(row - r) < 1e-6, "tile off the source grid"
        out[:, r:r + t.height, c:c + t.width] = t.data
    return out


def raster_columns(conn: psycopg.Connection, table: str) -> dict:
    cur = conn.execute(
        "SELECT srid, scale_x, scale_y, blocksize_x, blocksize_y, same_alignment, num_bands, "
        "pixel_types, nodata_values FROM raster_columns WHERE r_table_name = %s", [table])
    row = cur.fetchone()
    assert row is not None, f"{table} is not in raster_columns"
    return dict(zip([d.name for d in cur.description], row, strict=True))


def test_geotiff_pixels_exact(conn, utm_tif):
    path, data, transform = utm_tif
    report = import_raster(conn, [path], "public.img", progress=False)
    assert (report.tiles, report.skipped, report.srid, report.bands) == (5, 1, UTM, 3)
    assert report.resolution == (0.5, 0.5) and report.aligned and not report.reprojected
    assert "5 tiles" in str(report) and "1 all-nodata" in str(report)

    rc = raster_columns(conn, "img")
    assert (rc["srid"], rc["scale_x"], rc["scale_y"]) == (UTM, 0.5, -0.5)
    assert rc["blocksize_x"] == 256 and rc["blocksize_y"] in (256, 44)  # PostGIS: most common
    assert rc["same_alignment"] and rc["num_bands"] == 3
    assert rc["pixel_types"] == ["8BUI"] * 3 and rc["nodata_values"] == [0.0] * 3

    ts = tiles(conn, "img")
    assert [(t.width, t.height) for t in ts] == [(256, 256), (88, 256), (256, 44), (256, 44),
                                                 (88, 44)]
    assert all(t.srid == UTM and t.nodata == (0, 0, 0) for t in ts)
    np.testing.assert_array_equal(reassemble(ts, transform, data.shape), data)

    meta = conn.execute("SELECT (ST_MetaData(rast)).* FROM img ORDER BY rid").fetchall()
    assert len(meta) == len(ts)
    assert [m[:2] for m in meta] == sorted((m[:2] for m in meta), key=lambda p: (-p[1], p[0]))
    for ulx, uly, _w, _h, sx, sy, kx, ky, srid, nb in meta:  # rid order: row-major
        col, row = ~transform @ (ulx, uly)
        assert (ulx, uly) == transform @ (round(col), round(row))
        assert (sx, sy, kx, ky, srid, nb) == (0.5, -0.5, 0.0, 0.0, UTM, 3)
    filenames = conn.execute("SELECT DISTINCT filename FROM img").fetchall()
    assert filenames == [("utm.tif",)]
    idx = conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'img'").fetchall()
    assert any("gist (st_convexhull(rast))" in d[0] for d in idx)
    storage = conn.execute("SELECT attstorage FROM pg_attribute "
                           "WHERE attrelid = 'img'::regclass AND attname = 'rast'").fetchone()
    assert storage == ("e",)


RASTER2PGSQL = shutil.which("raster2pgsql")


@pytest.mark.skipif(RASTER2PGSQL is None or shutil.which("psql") is None,
                    reason="raster2pgsql/psql not installed (Debian: apt-get install postgis)")
@pytest.mark.parametrize("dtype, bands, nodata", [
    ("uint8", 3, 0), ("int16", 1, -9999), ("float32", 2, None)])
def test_same_as_raster2pgsql(conn, db_dsn, tmp_path, dtype, bands, nodata):
    rng = np.random.default_rng(3)
    if dtype == "uint8":
        data = source_with_nodata()
    else:
        data = (rng.normal(100, 50, (bands, 300, 600))).astype(dtype)
        if nodata is not None:
            data[:, 0:256, 256:512] = nodata
    path = write_tif(tmp_path / f"{dtype}.tif", data, from_origin(500000.25, 3000000.75, 0.5, 0.5),
                     f"EPSG:{UTM}", nodata=nodata, tiled=True, blockxsize=128, blockysize=128)
    import_raster(conn, [path], "ours", progress=False)
    script = subprocess.run([RASTER2PGSQL, "-q", "-I", "-C", "-F", "-t", "256x256", str(path),
                             "public.theirs"], capture_output=True, text=True, check=True).stdout
    subprocess.run(["psql", "-q", "-X", "-v", "ON_ERROR_STOP=1", db_dsn], input=script,
                   text=True, capture_output=True, check=True)

    query = ("SELECT ST_AsBinary(rast), filename, (ST_MetaData(rast)).*, "
             "ARRAY(SELECT ROW((ST_BandMetaData(rast, b)).*)::text "
             "FROM generate_series(1, ST_NumBands(rast)) b) "
             "FROM {} ORDER BY ST_UpperLeftY(rast) DESC, ST_UpperLeftX(rast)")
    ours = conn.execute(sql.SQL(query).format(sql.Identifier("ours"))).fetchall()
    theirs = conn.execute(sql.SQL(query).format(sql.Identifier("theirs"))).fetchall()
    assert len(ours) == len(theirs) == (5 if nodata is not None else 6)
    for a, b in zip(ours, theirs, strict=True):
        assert a[1:] == b[1:]  # filename, ST_MetaData, ST_BandMetaData
        assert a[0] == b[0]  # the raster WKB, byte for byte: values, nodata, flags
    assert raster_columns(conn, "ours") == raster_columns(conn, "theirs")
    cons = "SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'c'"
    assert {r[0] for r in conn.execute(cons, ["ours"])} == \
        {r[0] for r in conn.execute(cons, ["theirs"])}


def lonlat_tif(path: Path, left: float, data: np.ndarray) -> Path:
    """EPSG:4326 with non-square pixels (1e-5 deg wide, 0.8e-5 deg tall) near Banepa."""
    return write_tif(path, data, Affine(1e-5, 0, left, 0, -0.8e-5, 27.64), "EPSG:4326")


def test_reprojection_puts_files_on_one_grid(conn, tmp_path):
    rng = np.random.default_rng(11)
    data = rng.integers(0, 256, (2, 2, 150, 170), dtype=np.uint8)
    lonlat_tif(tmp_path / "a.tif", 85.52, data[0])
    lonlat_tif(tmp_path / "b.tif", 85.52 + 170e-5, data[1])  # touches a's east edge
    report = import_raster(conn, [str(tmp_path / "*.tif")], "merc", srid=3857, tile_size=64,
                           progress=False)
    assert report.files == 2 and report.reprojected and report.srid == 3857 and report.aligned
    res = report.resolution[0]
    assert report.resolution == (res, res)
    rc = raster_columns(conn, "merc")
    assert rc["srid"] == 3857 and rc["same_alignment"]
    assert conn.execute("SELECT ST_SameAlignment(rast) FROM merc").fetchone()[0] is True
    for ulx, uly in conn.execute("SELECT ST_UpperLeftX(rast), ST_UpperLeftY(rast) FROM merc"):
        assert abs(ulx / res - round(ulx / res)) < 1e-6  # origin on multiples of the pixel
        assert abs(uly / res - round(uly / res)) < 1e-6
    # adjacent files meet on one grid line: no gap, no overlap
    edges = dict(conn.execute("SELECT filename, max(ST_UpperLeftX(rast) + ST_Width(rast) * %s) "
                              "FROM merc WHERE filename = 'a.tif' GROUP BY 1", [res]).fetchall())
    west_b = conn.execute("SELECT min(ST_UpperLeftX(rast)) FROM merc WHERE filename = 'b.tif'"
                          ).fetchone()[0]
    assert abs(edges["a.tif"] - west_b) < 1e-6 * res

    # nearest-neighbour values: look up every pixel centre in its source file
    total = same = 0
    for buf, filename in conn.execute("SELECT ST_AsBinary(rast), filename FROM merc"):
        t = wkb.decode(buf)
        src = data[0] if filename == "a.tif" else data[1]
        left = 85.52 if filename == "a.tif" else 85.52 + 170e-5
        inv = ~Affine(1e-5, 0, left, 0, -0.8e-5, 27.64)
        rows, cols = np.mgrid[0:t.height, 0:t.width]
        x = t.upper_left[0] + (cols + 0.5) * t.scale_x
        y = t.upper_left[1] + (rows + 0.5) * t.scale_y
        lon, lat = warp_transform("EPSG:3857", "EPSG:4326", x.ravel(), y.ravel())
        c, r = inv @ (np.array(lon), np.array(lat))
        c, r = np.floor(c).astype(int), np.floor(r).astype(int)
        assert c.min() >= 0 and r.min() >= 0 and c.max() < 170 and r.max() < 150
        total += c.size
        looked_up = src[:, r, c].reshape(t.data.shape)
        same += int((t.data == looked_up).all(axis=0).sum())
    assert same / total > 0.99


def test_resolution_sets_a_square_grid(conn, utm_tif):
    path, _, _ = utm_tif
    report = import_raster(conn, [path], "coarse", resolution=2.0, progress=False)
    assert report.reprojected and report.resolution == (2.0, 2.0) and report.srid == UTM
    rows = conn.execute("SELECT ST_UpperLeftX(rast), ST_UpperLeftY(rast), ST_ScaleX(rast), "
                        "ST_ScaleY(rast), ST_Width(rast), ST_Height(rast) FROM coarse").fetchall()
    assert sum(r[4] * r[5] for r in rows) == 150 * 75 and len(rows) == 1
    assert all(r[0] % 2 == 0 and r[1] % 2 == 0 and r[2:4] == (2.0, -2.0) for r in rows)


def test_overwrite_append_and_existing(conn, utm_tif, tmp_path):
    path, data, transform = utm_tif
    import_raster(conn, [path], "img", progress=False)
    before = conn.execute("SELECT count(*), sum(ST_Width(rast)) FROM img").fetchone()
    with pytest.raises(errors.AlreadyExists, match="--overwrite"):
        import_raster(conn, [path], "img", progress=False)
    assert conn.execute("SELECT count(*), sum(ST_Width(rast)) FROM img").fetchone() == before

    east = write_tif(tmp_path / "east.tif", data, transform @ Affine.translation(600, 0),
                     f"EPSG:{UTM}", nodata=0)
    report = import_raster(conn, [east], "img", append=True, progress=False)
    assert report.appended and report.tiles == 5 and report.aligned
    assert conn.execute("SELECT count(*) FROM img").fetchone()[0] == 10
    assert raster_columns(conn, "img")["same_alignment"]

    report = import_raster(conn, [path], "img", overwrite=True, tile_size=128, progress=False)
    assert conn.execute("SELECT count(*), max(ST_Width(rast)) FROM img").fetchone() == \
        (report.tiles, 128)


def test_append_reprojects_onto_the_tables_grid(conn, tmp_path):
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, (2, 1, 60, 80), dtype=np.uint8)
    a = lonlat_tif(tmp_path / "a.tif", 85.52, data[0])
    b = lonlat_tif(tmp_path / "b.tif", 85.52 + 80e-5 + 3.3e-6, data[1])  # off-grid shift
    first = import_raster(conn, [a], "m", srid=3857, progress=False)
    second = import_raster(conn, [b], "m", append=True, progress=False)  # SRID of the table
    assert second.srid == 3857 and second.reprojected
    assert second.resolution == first.resolution
    assert conn.execute("SELECT ST_SameAlignment(rast) FROM m").fetchone()[0] is True
    with pytest.raises(errors.SridMismatch, match="3857"):
        import_raster(conn, [b], "m", append=True, srid=4326, progress=False)


def test_errors_are_one_line(conn, tmp_path, utm_tif):
    path, data, transform = utm_tif
    with pytest.raises(errors.NotFound, match="no files match"):
        import_raster(conn, [str(tmp_path / "nothing*.tif")], "t", progress=False)
    with pytest.raises(errors.NotFound, match="no such file"):
        import_raster(conn, [tmp_path / "missing.tif"], "t", progress=False)
    junk = tmp_path / "junk.tif"
    junk.write_text("not a raster")
    with pytest.raises(errors.ConfigError, match="junk.tif: rasterio cannot open it"):
        import_raster(conn, [path, junk], "t", progress=False)
    nocrs = write_tif(tmp_path / "nocrs.tif", data, transform, None)
    with pytest.raises(errors.ConfigError, match="nocrs.tif: has no CRS; pass --srid"):
        import_raster(conn, [nocrs], "t", progress=False)
    one_band = write_tif(tmp_path / "one.tif", data[:1], transform, f"EPSG:{UTM}")
    with pytest.raises(errors.ConfigError, match="1 bands"):
        import_raster(conn, [path, one_band], "t", progress=False)
    i16 = write_tif(tmp_path / "i16.tif", data.astype("int16"), transform, f"EPSG:{UTM}")
    with pytest.raises(errors.ConfigError, match="pixel types int16"):
        import_raster(conn, [path, i16], "t", progress=False)
    wgs = write_tif(tmp_path / "wgs.tif", data, Affine(1e-5, 0, 85.5, 0, -1e-5, 27.6),
                    "EPSG:4326")
    with pytest.raises(errors.SridMismatch, match="EPSG:4326, EPSG:32645"):
        import_raster(conn, [path, wgs], "t", progress=False)
    for bad in (8, 5000):
        with pytest.raises(errors.ConfigError, match="tile size"):
            import_raster(conn, [path], "t", tile_size=bad, progress=False)
    with pytest.raises(errors.ConfigError, match="exclude each other"):
        import_raster(conn, [path], "t", overwrite=True, append=True, progress=False)
    with pytest.raises(errors.ConfigError, match="SRID 999999"):
        import_raster(conn, [path], "t", srid=999999, progress=False)
    assert conn.execute("SELECT to_regclass('public.t')").fetchone()[0] is None

    # a declared SRID makes a CRS-less file loadable as is
    report = import_raster(conn, [nocrs], "t", srid=UTM, progress=False)
    assert report.srid == UTM and not report.reprojected


def test_failure_midway_leaves_no_table(conn, tmp_path, utm_tif):
    path, data, transform = utm_tif
    broken = write_tif(tmp_path / "broken.tif", data, transform @ Affine.translation(600, 0),
                       f"EPSG:{UTM}", nodata=0, tiled=True, blockxsize=64, blockysize=64,
                       compress="deflate")
    raw = broken.read_bytes()
    broken.write_bytes(raw[: len(raw) // 2])  # header intact, tiles missing
    with pytest.raises(errors.PggeolearnError, match="broken.tif"):
        import_raster(conn, [path, broken], "half", progress=False)
    assert conn.execute("SELECT to_regclass('public.half')").fetchone()[0] is None


@pytest.mark.banepa
def test_banepa_mosaic_and_source_tiles(conn, banepa):
    mosaic = banepa / "imagery" / "banepa_train_mosaic_epsg3857.tif"
    report = import_raster(conn, [mosaic], "mosaic", progress=False)
    assert (report.tiles, report.skipped, report.srid) == (192, 0, 3857)
    rc = raster_columns(conn, "mosaic")
    assert rc["srid"] == 3857 and rc["scale_x"] == pytest.approx(0.14929, abs=1e-5)
    assert (rc["blocksize_x"], rc["blocksize_y"]) == (256, 256) and rc["same_alignment"]

    sources = str(banepa / "source_tiles" / "train" / "*.tif")  # JPEG + .aux.xml, EPSG:4326
    report = import_raster(conn, [sources], "src", srid=3857, progress=False)
    assert report.files == 48 and report.reprojected and report.aligned
    assert report.tiles == 192  # every 512 px z19 tile lands as exactly 2 x 2 tiles of 256
    rc = raster_columns(conn, "src")
    assert rc["srid"] == 3857 and rc["same_alignment"]
    extent = "SELECT ST_XMin(e), ST_YMin(e), ST_XMax(e), ST_YMax(e) " \
             "FROM (SELECT ST_Extent(ST_Envelope(rast)) AS e FROM {}) s"
    m = conn.execute(extent.format("mosaic")).fetchone()
    s = conn.execute(extent.format("src")).fetchone()
    assert np.allclose(m, s, atol=2 * 0.1493)

    # on the exact zoom-19 pixel the source tiles share the mosaic's grid
    import_raster(conn, [sources], "src_z19", srid=3857, resolution=Z19, progress=False)
    aligned = conn.execute("SELECT bool_and(ST_SameAlignment(a.rast, b.rast)) FROM "
                           "(SELECT rast FROM mosaic LIMIT 1) a, src_z19 b").fetchone()[0]
    assert aligned is True
