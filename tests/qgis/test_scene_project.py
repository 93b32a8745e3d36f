"""End to end on the synthetic scene (osm2pgsql-style tables, column ``way``): dataset, chips,
a prediction (a brightness threshold stands in for a trained model), a review against the OSM
buildings with all three kinds, and the stored project rendered by headless QGIS; that render is
the screenshot of docs/qgis.md (PGGEOLEARN_WRITE_DOCS=1 refreshes it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psycopg
from qgis_helpers import needs_qgis, probe

from pggeolearn import chips, datasets, predict
from pggeolearn.qgis import project as qproject
from pggeolearn.qgis import review
from pggeolearn.qgis.uris import project_uri

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_predict import BrightnessPredictor  # noqa: E402

DOCS = Path(__file__).resolve().parents[2] / "docs"


@needs_qgis
def test_scene_project_review_and_screenshot(scene, scene_dsn, scene_recipe, tmp_path):
    minx, _, _, maxy = scene.bounds
    half = 512 * scene.resolution  # the upper-left quarter: 4 chips
    recipe = datasets.Recipe(**{**scene_recipe.__dict__, "extent": (minx, maxy - half, minx + half, maxy)})
    with psycopg.connect(scene_dsn, autocommit=True) as conn:
        datasets.create(conn, recipe)
        chips.build(conn, "scene", progress=False)
        conn.execute("UPDATE pggeolearn.chips SET split = 'test' WHERE dataset = 'scene'")
    model = BrightnessPredictor(tile_px=256, resolution=scene.resolution, centres=(100.0, 160.0), box=5,
                                names=("background", "building"))
    rep = predict.predict(scene_dsn, model, out="public.pred", dataset="scene", split="test", overlap=16,
                          min_pixels=40, progress=False)
    with psycopg.connect(scene_dsn, autocommit=True) as conn:
        counts = review.review(conn, rep.run_id, "public.planet_osm_polygon").counts
        assert all(counts.get(k, 0) > 0 for k in ("new", "missing", "changed")), counts
        p = qproject.write_project(conn, "scene")
        assert [g for g, _ in p.groups] == ["Review", "Predictions", "Training data", "Imagery"]
        env = {"PGHOST": conn.info.host, "PGPORT": str(conn.info.port), "PGUSER": conn.info.user}
        uri = project_uri(conn, "pggeolearn", "scene")
    out = probe({"project": uri, "factors": [1, 4], "out": str(tmp_path), "project_px": 640}, tmp_path, env=env)
    assert all(lyr["valid"] for lyr in out["layers"])
    names = {lyr["name"] for lyr in out["layers"]}
    assert {"labels: planet_osm_line", "labels: planet_osm_polygon", "imagery: imagery"} <= names
    assert out["project_render"] > 0.9 * 640 * 640  # imagery under everything
    if os.environ.get("PGGEOLEARN_WRITE_DOCS") == "1":  # a small PNG: 128 colours
        from PIL import Image

        shot = Image.open(tmp_path / "project.png").convert("RGB").resize((480, 480), Image.LANCZOS)
        shot.quantize(colors=128).save(DOCS / "qgis-project.png", optimize=True)
