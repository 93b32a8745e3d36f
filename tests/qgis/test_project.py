"""The QGIS project stored in the database: what it holds, the row QGIS reads, and headless QGIS
opening it from PostgreSQL with every layer valid, styled and drawn at 1, 1/4 and 1/16."""

from __future__ import annotations

import io
import json
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import psycopg
import pytest
from qgis_helpers import needs_qgis, probe

from pggeolearn import errors
from pggeolearn.qgis import project as qproject
from pggeolearn.qgis.uris import layer_uri, project_uri

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_evaluate import PX  # noqa: E402
from test_evaluate import scene as scene  # noqa: E402, F401  (the fixture)
from test_predict import BrightnessPredictor  # noqa: E402

from pggeolearn import predict  # noqa: E402
from pggeolearn.evaluate import evaluate  # noqa: E402


@pytest.fixture
def outputs(scene, db_dsn):
    conn = scene[0]
    conn.execute("CREATE SCHEMA results")
    conn.execute("UPDATE pggeolearn.chips SET split = CASE WHEN tile_id % 6 < 2 THEN 'train' ELSE 'test' END"
                 " WHERE dataset = 'scene'")
    model = BrightnessPredictor(tile_px=PX)
    predict.predict(db_dsn, model, out="results.scene_pred", dataset="scene", split="test", overlap=4,
                    tile_px=32, probabilities=True, progress=False)
    evaluate(db_dsn, model, dataset="scene", split="test", out_layer="results.scene_eval", progress=False)
    return conn


def test_project_row_holds_every_layer_grouped(outputs):
    conn = outputs
    p = qproject.write_project(conn, "scene")
    groups = {g: [(lyr.name, lyr.table) for lyr in layers] for g, layers in p.groups}
    assert groups == {
        "Predictions": [("brightness: objects", "results.scene_pred_polygons"),
                        ("brightness: classes", "results.scene_pred"),
                        ("brightness: p(building)", "results.scene_pred_prob")],
        "Evaluation": [("brightness: IoU per tile", "results.scene_eval")],
        "Training data": [("labels: buildings", "public.buildings"), ("chips by split", "pggeolearn.chips_map_scene")],
        "Imagery": [("imagery: img", "public.img")],
    }
    name, meta, content = conn.execute("SELECT name, metadata, content FROM pggeolearn.qgis_projects").fetchone()
    assert name == "scene" and set(meta) == {"last_modified_time", "last_modified_user"}
    with zipfile.ZipFile(io.BytesIO(content)) as z:
        assert z.namelist() == ["scene.qgs"]
        root = ET.fromstring(z.read("scene.qgs").decode().split("\n", 1)[1])
    # the class raster's colours travel inside the project (QGIS < 3.42 ignores raster layer_styles)
    cls = next(m for m in root.iter("maplayer") if m.findtext("layername") == "brightness: classes")
    assert [(e.get("value"), e.get("color")) for e in cls.iter("paletteEntry")] == [("0", "#000000"),
                                                                                  ("1", "#e6194b")]
    assert root.find("projectCrs/spatialrefsys/authid").text == "EPSG:3857"
    ext = root.find("ProjectViewSettings/DefaultViewExtent")
    assert float(ext.get("xmin")) <= p.extent[0] and float(ext.get("xmax")) >= p.extent[2]
    assert "password" not in ET.tostring(root, encoding="unicode")
    # refreshing replaces the one row
    qproject.write_project(conn, "scene")
    assert conn.execute("SELECT count(*) FROM pggeolearn.qgis_projects").fetchone()[0] == 1


def test_refresh_after_predict_and_bad_input(outputs):
    conn = outputs
    # predict and evaluate of the fixture already wrote it
    assert conn.execute("SELECT name FROM pggeolearn.qgis_projects").fetchall() == [("scene",)]
    assert qproject.refresh_after(conn, "not-in-registry", None) == []
    note, = qproject.refresh_after(conn, "brightness", "scene")
    assert "refreshed in pggeolearn.qgis_projects" in note
    note, = qproject.refresh_after(conn, "brightness", "nope")
    assert note.startswith("QGIS project not refreshed:")
    with pytest.raises(errors.ConfigError):
        qproject.write_project(conn, "scene", schema="x" * 70)


@needs_qgis
def test_qgis_opens_the_stored_project(outputs, tmp_path):
    conn = outputs
    qproject.write_project(conn, "scene")
    info = conn.info
    env = {"PGHOST": info.host, "PGPORT": str(info.port), "PGUSER": info.user}
    rep = probe({"project": project_uri(conn, "pggeolearn", "scene"), "factors": [1, 4, 16],
                 "out": str(tmp_path), "project_px": 480}, tmp_path, env=env)
    assert rep["project_read"] is True
    assert [g["group"] for g in rep["tree"]] == ["Predictions", "Evaluation", "Training data", "Imagery"]
    assert rep["project_crs"] == "EPSG:3857"
    layers = {lyr["name"]: lyr for lyr in rep["layers"]}
    assert all(lyr["valid"] for lyr in layers.values()), [n for n, lyr in layers.items() if not lyr["valid"]]
    renderers = {n: lyr["renderer"] for n, lyr in layers.items()}
    assert renderers == {"brightness: objects": "categorizedSymbol", "brightness: classes": "paletted",
                         "brightness: p(building)": "singlebandgray",
                         "brightness: IoU per tile": "graduatedSymbol", "labels: buildings": "singleSymbol",
                         "chips by split": "categorizedSymbol", "imagery: img": "multibandcolor"}
    assert layers["brightness: classes"]["classes"] == [[0, "#000000", 0], [1, "#e6194b", 255]]
    assert layers["chips by split"]["features"] == 24
    for name, lyr in layers.items():
        assert all(lyr["renders"][k] > 0 for k in ("1", "4", "16")), (name, lyr["renders"])
    assert rep["project_render"] > 0


@needs_qgis
def test_qgis_opens_every_output_with_its_default_style(outputs, tmp_path):
    """Each output added by hand, as the Browser adds it (geometry type in the URI): valid,
    default style from public.layer_styles, drawn at 1, 1/4 and 1/16."""
    conn = outputs
    vectors = {"results.scene_pred_polygons": ("MultiPolygon", "categorizedSymbol"),
               "results.scene_eval": ("Polygon", "graduatedSymbol")}
    layers = [{"name": t, "provider": "postgres", "uri": layer_uri(conn, t, geometry_type=g, srid=3857,
                                                                   key="tile_id" if "eval" in t else "id")}
              for t, (g, _) in vectors.items()]
    layers += [{"name": t, "provider": "postgresraster", "uri": layer_uri(conn, t, raster=True)}
               for t in ("results.scene_pred", "results.scene_pred_prob")]
    rep = probe({"layers": layers, "factors": [1, 4, 16]}, tmp_path)
    got = {lyr["name"]: lyr for lyr in rep["layers"]}
    assert all(lyr["valid"] for lyr in got.values())
    for t, (_, renderer) in vectors.items():
        assert got[t]["renderer"] == renderer
    # QGIS < 3.42 ignores raster styles in layer_styles (the project carries them instead)
    major, minor = (int(v) for v in rep["qgis"].split(".")[:2])
    assert got["results.scene_pred"]["renderer"] == ("paletted" if (major, minor) >= (3, 42) else "singlebandgray")
    for name, lyr in got.items():
        assert all(lyr["renders"][k] > 0 for k in ("1", "4", "16")), (name, lyr["renders"])


def test_project_uri_and_metadata_as_qgis_writes_them(outputs):
    conn = outputs
    qproject.write_project(conn, "scene")
    uri = project_uri(conn, "pggeolearn", "scene")
    assert uri.startswith("postgresql:") and "schema=pggeolearn" in uri and "project=scene" in uri
    meta = conn.execute("SELECT metadata->>'last_modified_time' FROM pggeolearn.qgis_projects").fetchone()[0]
    assert len(meta) >= 19 and meta[10] == "T"
    with psycopg.connect(conn.info.dsn) as c2:  # other sessions see it (committed)
        assert c2.execute("SELECT count(*) FROM pggeolearn.qgis_projects").fetchone()[0] == 1
    assert json.loads(json.dumps(meta))
