"""``pggeolearn import raster|vector``: what a user sees, success and failure."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from rasterio.transform import from_origin

from pggeolearn import errors
from pggeolearn.cli.main import cli


@pytest.fixture
def tif(tmp_path):
    data = np.random.default_rng(2).integers(0, 256, (3, 300, 600), dtype=np.uint8)
    path = tmp_path / "scene.tif"
    with rasterio.open(path, "w", driver="GTiff", width=600, height=300, count=3, dtype="uint8",
                       crs="EPSG:32645", transform=from_origin(500000, 3000000, 0.5, 0.5)) as d:
        d.write(data)
    return path


@pytest.fixture
def geojson(tmp_path):
    path = tmp_path / "b.geojson"
    sq = [[[85.52, 27.63], [85.521, 27.63], [85.521, 27.631], [85.52, 27.631], [85.52, 27.63]]]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": sq},
         "properties": {"building": "yes"}}]}))
    return path


def run(*args: str) -> subprocess.CompletedProcess:
    """The CLI exactly as a user runs it (main() prints errors, not cli)."""
    return subprocess.run([sys.executable, "-m", "pggeolearn", *args],
                          capture_output=True, text=True, timeout=120)


def test_import_raster_and_vector(db_dsn, conn, tif, geojson, tmp_path):
    runner = CliRunner()
    glob_arg = str(tmp_path / "*.tif")  # a quoted glob: pggeolearn expands it
    result = runner.invoke(cli, ["--dsn", db_dsn, "import", "raster", glob_arg,
                                 "--table", "public.scene", "--tile-size", "128", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "imported 1 file into public.scene: 15 tiles" in result.output
    assert conn.execute("SELECT count(*) FROM scene").fetchone()[0] == 15

    result = runner.invoke(cli, ["--dsn", db_dsn, "import", "raster", str(tif), "--table",
                                 "scene", "--srid", "3857", "--overwrite", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "SRID 3857 (reprojected)" in result.output

    result = runner.invoke(cli, ["--dsn", db_dsn, "import", "vector", str(geojson),
                                 "--table", "bld", "--srid", "3857", "--geom-column", "shape",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "imported 1 features from b.geojson into public.bld" in result.output
    assert "geometry(Polygon, 3857)" in result.output
    assert conn.execute("SELECT ST_SRID(shape), building FROM bld").fetchone() == (3857, "yes")


def test_errors_print_one_line(db_dsn, conn, tif, geojson, tmp_path):
    proc = run("--dsn", db_dsn, "import", "raster", str(tmp_path / "nothing*.tif"),
               "--table", "x")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"error: no files match '{tmp_path / 'nothing*.tif'}'"]

    proc = run("--dsn", db_dsn, "import", "vector", str(geojson), "--table", "bld",
               "--no-progress")
    assert proc.returncode == 0, proc.stderr
    proc = run("--dsn", db_dsn, "import", "vector", str(geojson), "--table", "bld")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "error: table public.bld already exists: pass --overwrite to replace it or --append "
        "to add to it"]
    assert conn.execute("SELECT count(*) FROM bld").fetchone()[0] == 1

    proc = run("--dsn", db_dsn, "import", "raster", str(tif), "--table", "x",
               "--tile-size", "3")
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("error: tile size must be")

    # the library raises the PggeolearnError that main() turns into that line
    result = CliRunner().invoke(cli, ["--dsn", db_dsn, "import", "vector",
                                      str(tmp_path / "missing.geojson"), "--table", "y"])
    assert isinstance(result.exception, errors.NotFound)


def test_vector_formats_layers_and_srid_errors(db_dsn, conn, tmp_path):
    """A two-layer GeoPackage and a Shapefile through the CLI; every failure is one line."""
    import pyogrio.raw
    import shapely

    gpkg = tmp_path / "osm.gpkg"
    for name, geom in (("buildings", shapely.box(85.52, 27.63, 85.521, 27.631)),
                       ("wells", shapely.Point(85.52, 27.63))):
        pyogrio.raw.write(gpkg, np.array([shapely.to_wkb(geom)], dtype=object),
                          [np.array(["x"], dtype=object)], ["name"], layer=name, crs="EPSG:4326",
                          geometry_type=geom.geom_type, append=gpkg.exists())
    proc = run("--dsn", db_dsn, "import", "vector", str(gpkg), "--table", "b")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: {gpkg} has 2 layers (buildings, wells): choose one with --layer"]
    proc = run("--dsn", db_dsn, "import", "vector", str(gpkg), "--layer", "wells", "--table", "w",
               "--srid", "123456", "--no-progress")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["error: SRID 123456 is not in spatial_ref_sys of this database"]

    result = CliRunner().invoke(cli, ["--dsn", db_dsn, "import", "vector", str(gpkg), "--layer",
                                      "buildings", "--table", "b", "--srid", "3857",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "imported 1 features from osm.gpkg (layer buildings) into public.b" in result.output
    assert "geometry(Polygon, 3857) (transformed from SRID 4326)" in result.output

    shp = tmp_path / "wells.shp"
    with pytest.warns(UserWarning, match="'crs' was not provided"):  # no .prj, on purpose
        pyogrio.raw.write(shp, np.array([shapely.to_wkb(shapely.Point(350000, 3057000))],
                                        dtype=object),
                          [np.array([3], dtype=np.int32)], ["depth"], geometry_type="Point")
    proc = run("--dsn", db_dsn, "import", "vector", str(shp), "--table", "w")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: {shp}: the layer has no CRS; pass --srid N to declare the EPSG code of its "
        "coordinates"]
    proc = run("--dsn", db_dsn, "import", "vector", str(shp), "--table", "w", "--srid", "32645",
               "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert conn.execute("SELECT depth, ST_SRID(geom) FROM w").fetchone() == (3, 32645)
