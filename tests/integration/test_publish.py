"""What QGIS (and GDAL/OGR) see of the prediction outputs: types, SRIDs, extents, overviews, and
default styles in public.layer_styles found by QGIS's own style queries."""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from test_predict import UL, BrightnessPredictor, extent_of, load_array

from pggeolearn import predict, publish

needs_gdal = pytest.mark.skipif(not shutil.which("gdalinfo") or not shutil.which("ogrinfo"),
                                reason="gdal-bin (gdalinfo, ogrinfo) not installed")

# QgsPostgresRasterProviderMetadata::loadStoredStyle and QgsPostgresProviderMetadata's vector
# equivalent (QGIS 3.34+), with the layer's values bound instead of quoted in.
QGIS_RASTER_STYLE = """SELECT styleName, styleQML FROM layer_styles
 WHERE f_table_catalog=%s AND f_table_schema=%s AND f_table_name=%s AND f_geometry_column IS NULL
 AND (type=%s OR type IS NULL) AND r_raster_column = %s
 ORDER BY CASE WHEN useAsDefault THEN 1 ELSE 2 END, update_time DESC LIMIT 1"""
QGIS_VECTOR_STYLE = """SELECT styleName, styleQML FROM layer_styles
 WHERE f_table_catalog=%s AND f_table_schema=%s AND f_table_name=%s AND f_geometry_column=%s
 AND (type=%s OR type IS NULL)
 ORDER BY CASE WHEN useAsDefault THEN 1 ELSE 2 END, update_time DESC LIMIT 1"""


@pytest.fixture
def outputs(conn, db_dsn):
    data = np.full((3, 160, 200), 30, np.uint8)
    data[:, 20:70, 30:90] = 230
    data[:, 100:140, 120:190] = 230
    load_array(conn, "public.img", data, tile=40)
    rep = predict.predict(db_dsn, BrightnessPredictor(), out="public.pred", imagery="public.img",
                          extent=extent_of(*UL, 200, 160), overlap=8, tile_px=64,
                          probabilities=True, progress=False)
    return conn, rep


def _run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@needs_gdal
def test_gdalinfo_sees_the_class_and_probability_rasters(outputs):
    conn, rep = outputs
    info = _run(["gdalinfo", publish.gdal_connstring(conn, "public.pred", column="rast")])
    assert "Driver: PostGISRaster" in info
    assert "Size is 200, 160" in info
    assert re.search(r"Origin = \(9519900\.0+,3202900\.0+\)", info)
    assert re.search(r"Pixel Size = \(1\.0+,-1\.0+\)", info)
    assert 'ID["EPSG",3857]]' in info.replace("\n", "").replace(" ", "")
    assert "NoData Value=255" in info and "Type=Byte" in info
    assert "Overviews: 100x80, 50x40" in info
    prob = _run(["gdalinfo", publish.gdal_connstring(conn, "public.pred_prob", column="rast")])
    assert "Size is 200, 160" in prob and "Band 2 " in prob and "Band 3 " not in prob


@needs_gdal
def test_ogrinfo_sees_typed_polygons(outputs):
    conn, rep = outputs
    info = _run(["ogrinfo", "-so", publish.gdal_connstring(conn, "public.pred_polygons"),
                 "public.pred_polygons"])
    assert "Geometry: Multi Polygon" in info
    assert "Feature Count: 2" in info
    assert re.search(r"Extent: \(9519930\.0+, 3202760\.0+\) - \(9520090\.0+, 3202880\.0+\)", info)
    assert 'ID["EPSG",3857]]' in info.replace("\n", "").replace(" ", "")
    assert "FID Column = id" in info and "Geometry Column NOT NULL = geom" in info
    for col in ("class_id: Integer(Int16)", "class_name: String", "area_m2: Real", "mean_prob: Real"):
        assert col in info


def test_catalogs_list_the_outputs(outputs):
    conn, _ = outputs
    rc = conn.execute("SELECT r_table_name, srid, scale_x, scale_y, blocksize_x, num_bands, pixel_types,"
                      " nodata_values, same_alignment, spatial_index FROM raster_columns"
                      " WHERE r_table_schema = 'public' AND r_table_name LIKE 'pred%%' ORDER BY 1").fetchall()
    assert rc == [("pred", 3857, 1.0, -1.0, 64, 1, ["8BUI"], [255.0], True, True),
                  ("pred_prob", 3857, 1.0, -1.0, 64, 2, ["8BUI", "8BUI"], [255.0, 255.0], True, True)]
    gc = conn.execute("SELECT type, srid, coord_dimension FROM geometry_columns WHERE f_table_name = "
                      "'pred_polygons'").fetchone()
    assert gc == ("MULTIPOLYGON", 3857, 2)
    ov = conn.execute("SELECT o_table_name, overview_factor FROM raster_overviews WHERE r_table_name = 'pred'"
                      " ORDER BY 2").fetchall()
    assert ov == [("o_2_pred", 2), ("o_4_pred", 4)]
    storage = conn.execute("SELECT attcompression, attstorage FROM pg_attribute WHERE attrelid = "
                           "'public.pred'::regclass AND attname = 'rast'").fetchone()
    assert storage in (("l", "x"), ("", "e"))  # lz4 where the server has it, else EXTERNAL


def test_qgis_finds_the_default_styles(outputs):
    conn, _ = outputs
    db = conn.info.dbname
    name, qml = conn.execute(QGIS_RASTER_STYLE, [db, "public", "pred", "raster", "rast"]).fetchone()
    assert name == "pred classes"
    root = ET.fromstring(qml.split("\n", 1)[1])  # after the DOCTYPE line
    rr = root.find("pipe/rasterrenderer")
    assert rr.get("type") == "paletted" and rr.get("band") == "1"
    entries = [(e.get("value"), e.get("label"), e.get("alpha")) for e in rr.iter("paletteEntry")]
    assert entries == [("0", "background", "0"), ("1", "building", "255")]

    name, qml = conn.execute(QGIS_VECTOR_STYLE, [db, "public", "pred_polygons", "geom", "Polygon"]).fetchone()
    root = ET.fromstring(qml.split("\n", 1)[1])
    rend = root.find("renderer-v2")
    assert rend.get("type") == "categorizedSymbol" and rend.get("attr") == "class_id"
    assert [(c.get("value"), c.get("label")) for c in rend.iter("category")] == [("1", "building")]
    fill = {o.get("name"): o.get("value") for o in rend.iter("Option") if o.get("name")}
    assert fill["color"].startswith("230,25,75,") and fill["outline_color"] == "230,25,75,255"

    name, qml = conn.execute(QGIS_RASTER_STYLE, [db, "public", "pred_prob", "raster", "rast"]).fetchone()
    assert ET.fromstring(qml.split("\n", 1)[1]).find("pipe/rasterrenderer").get("grayBand") == "2"
    cols = [r[0] for r in conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' AND "
        "table_name = 'layer_styles' ORDER BY ordinal_position")]
    assert cols == ["id", "f_table_catalog", "f_table_schema", "f_table_name", "f_geometry_column",
                    "stylename", "styleqml", "stylesld", "useasdefault", "description", "owner", "ui",
                    "update_time", "type", "r_raster_column"]


def test_styles_replace_and_upgrade_an_older_qgis_table(conn):
    """A layer_styles made by an older QGIS (no type / r_raster_column) gets the columns QGIS
    itself would add; saving a style twice keeps one row; a new default unsets the old one."""
    conn.execute("CREATE TABLE public.layer_styles (id serial PRIMARY KEY, f_table_catalog varchar,"
                 " f_table_schema varchar, f_table_name varchar, f_geometry_column varchar,"
                 " stylename varchar(30), styleqml xml, stylesld xml, useasdefault boolean,"
                 " description text, owner varchar(30), ui xml,"
                 " update_time timestamp DEFAULT now())")
    conn.execute("CREATE TABLE public.t (id int PRIMARY KEY, geom geometry(Polygon, 3857))")
    qml = publish.categorized_qml("k", [(1, "a & <b>", (1, 2, 3))])
    for _ in range(2):
        publish.save_style(conn, "public.t", qml, geometry_column="geom", geometry_type="Polygon", name="s1")
    publish.save_style(conn, "public.t", qml, geometry_column="geom", geometry_type="Polygon", name="s2")
    rows = conn.execute("SELECT stylename, useasdefault, type, r_raster_column FROM public.layer_styles "
                        "ORDER BY id").fetchall()
    assert rows == [("s1", False, "Polygon", None), ("s2", True, "Polygon", None)]
    label = ET.fromstring(conn.execute("SELECT styleqml::text FROM public.layer_styles LIMIT 1"
                                       ).fetchone()[0].split("\n", 1)[1]).find(".//category").get("label")
    assert label == "a & <b>"


def test_graduated_and_palette():
    root = ET.fromstring(publish.graduated_qml("miou", [(0, 0.5, "low", (255, 0, 0)),
                                                        (0.5, 1, "high", (0, 255, 0))]).split("\n", 1)[1])
    ranges = [(r.get("lower"), r.get("upper"), r.get("label")) for r in root.iter("range")]
    assert ranges == [("0.000000", "0.500000", "low"), ("0.500000", "1.000000", "high")]
    assert publish.palette({0: "bg", 1: "a", 2: "b"}) == {0: (0, 0, 0), 1: (230, 25, 75), 2: (0, 130, 200)}
