"""Evaluating a model on a dataset split: exact confusion matrix, per-tile layer for QGIS,
worst-tiles PNG, run record, refusals."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image
from test_predict import RES, UL, BrightnessPredictor, extent_of, load_array

from pggeolearn import chips, datasets, errors, publish
from pggeolearn.evaluate import evaluate

PX, NCOLS, NROWS = 32, 6, 4
# (row0, row1, col0, col1) in pixels of the 192 x 128 scene
BUILDINGS = [(4, 20, 4, 28), (40, 60, 40, 80), (70, 120, 150, 180), (100, 110, 10, 60)]
HIDDEN = (36, 56, 100, 120)  # labelled, but dark in the imagery: missed
FALSE_ROOF = (8, 24, 140, 160)  # bright, not labelled: a false positive


@pytest.fixture
def scene(conn):
    data = np.full((3, NROWS * PX, NCOLS * PX), 30, np.uint8)
    truth = np.zeros(data.shape[1:], np.uint8)
    for r0, r1, c0, c1 in BUILDINGS:
        data[:, r0:r1, c0:c1] = 230
        truth[r0:r1, c0:c1] = 1
    r0, r1, c0, c1 = HIDDEN
    truth[r0:r1, c0:c1] = 1
    r0, r1, c0, c1 = FALSE_ROOF
    data[:, r0:r1, c0:c1] = 230
    load_array(conn, "public.img", data, tile=PX)
    conn.execute("CREATE TABLE public.buildings (id serial PRIMARY KEY, geom geometry(Polygon, 3857))")
    for r0, r1, c0, c1 in [*BUILDINGS, HIDDEN]:
        conn.execute("INSERT INTO public.buildings (geom) VALUES (ST_MakeEnvelope(%s, %s, %s, %s, 3857))",
                     [UL[0] + c0 * RES, UL[1] - r1 * RES, UL[0] + c1 * RES, UL[1] - r0 * RES])
    datasets.create(conn, datasets.Recipe(
        name="scene", srid=3857, resolution=RES, tile_px=PX, extent=extent_of(*UL, NCOLS * PX, NROWS * PX),
        image_sql="SELECT rast FROM public.img WHERE ST_Intersects(rast, tile_geom)",
        label_sql="SELECT geom, 1 AS class_id FROM public.buildings WHERE geom && tile_geom",
        classes={1: "building"}))
    chips.build(conn, "scene", progress=False)
    conn.execute("UPDATE pggeolearn.chips SET split = 'test' WHERE dataset = 'scene'")
    return conn, data, truth


def test_scores_layer_png_and_run(scene, db_dsn, tmp_path):
    conn, data, truth = scene
    model = BrightnessPredictor(tile_px=PX)
    png = tmp_path / "worst.png"
    rep = evaluate(db_dsn, model, dataset="scene", split="test", out_layer="public.scene_eval",
                   png=png, n_worst=3, progress=False)
    pred = model.predict_proba(data[None])[0].argmax(0)
    cm = np.bincount(truth.ravel().astype(int) * 2 + pred.ravel(), minlength=4).reshape(2, 2)
    assert np.array_equal(rep.confusion, cm)
    assert rep.tiles == NCOLS * NROWS and rep.scores.pixels == truth.size
    iou_b = cm[1, 1] / (cm[1, 1] + cm[0, 1] + cm[1, 0])
    assert rep.scores.iou[1] == pytest.approx(iou_b)
    assert rep.scores.f1[1] == pytest.approx(2 * cm[1, 1] / (2 * cm[1, 1] + cm[0, 1] + cm[1, 0]))
    text = str(rep)
    assert "confusion matrix" in text and "IoU building" in text and f"{int(cm[1, 0])}" in text

    # the worst tile: the hidden building (tile row 1, col 3) has building IoU 0
    hidden_tile = (HIDDEN[0] // PX) * NCOLS + HIDDEN[2] // PX
    assert rep.worst[0].tile_id == hidden_tile and rep.worst[0].iou[1] == 0
    assert [t.miou for t in rep.worst] == sorted(t.miou for t in rep.worst)
    img = Image.open(png)
    assert img.size == (3 * PX + 4 * 6, 18 + 3 * (PX + 16 + 6) + 6)
    # row 1, right panel: the prediction of the hidden tile has no building colour
    pred_panel = np.asarray(img.convert("RGB"))[18 + 16:18 + 16 + PX, 6 + 2 * (PX + 6):6 + 3 * PX + 2 * 6]
    assert not (pred_panel == (228, 26, 28)).all(axis=-1).any()

    rows = conn.execute("SELECT tile_id, pixels, pixel_accuracy, miou, iou_background, iou_building,"
                        " model, run_id, ST_SRID(geom), ST_Area(geom) FROM public.scene_eval ORDER BY tile_id"
                        ).fetchall()
    assert len(rows) == NCOLS * NROWS
    by_id = {r[0]: r for r in rows}
    assert by_id[hidden_tile][5] == 0 and by_id[hidden_tile][7] == rep.run_id
    assert by_id[0][9] == PX * PX and by_id[0][8] == 3857 and by_id[0][1] == PX * PX
    empty_tile = 1 * NCOLS + 0  # rows 32..63, cols 0..31: nothing there, nothing predicted
    assert by_id[empty_tile][5] is None and by_id[empty_tile][2] == 1.0

    (qml,) = conn.execute("SELECT styleqml::text FROM public.layer_styles WHERE f_table_name = 'scene_eval'"
                          " AND useasdefault").fetchone()
    rend = ET.fromstring(qml.split("\n", 1)[1]).find("renderer-v2")
    assert rend.get("type") == "graduatedSymbol" and rend.get("attr") == "miou"
    status, outputs = conn.execute("SELECT status, outputs FROM pggeolearn.runs WHERE run_id = %s",
                                   [rep.run_id]).fetchone()
    assert status == "done" and outputs["confusion"] == cm.tolist()
    assert outputs["metrics"]["iou"][1] == pytest.approx(iou_b)

    # every chip's scores, for the next training's sampling query (hard examples)
    scores = {r[0]: r[1:] for r in conn.execute(
        "SELECT tile_id, miou, loss, pixels, model, split FROM pggeolearn.chip_scores "
        "WHERE run_id = %s", [rep.run_id])}
    assert set(scores) == set(by_id) and scores[hidden_tile][3:] == ("brightness", "test")
    assert scores[hidden_tile][0] == pytest.approx(by_id[hidden_tile][3])
    assert max(scores, key=lambda t: scores[t][1]) == hidden_tile  # the worst chip costs most
    assert scores[empty_tile][1] == pytest.approx(0.0, abs=1e-3) and scores[0][2] == PX * PX

    if shutil.which("ogrinfo"):
        info = subprocess.run(["ogrinfo", "-so", publish.gdal_connstring(conn, "public.scene_eval"),
                               "public.scene_eval"], capture_output=True, text=True, check=True).stdout
        assert "Geometry: Polygon" in info and f"Feature Count: {NCOLS * NROWS}" in info
        assert "Extent: (9519900.000000, 3202772.000000) - (9520092.000000, 3202900.000000)" in info


def test_tta_averages_over_the_views(scene, db_dsn):
    """Test-time augmentation: a pixel-wise model is unchanged by it (same confusion matrix);
    the run records it and the report says so."""
    conn, data, truth = scene
    model = BrightnessPredictor(tile_px=PX)
    plain = evaluate(db_dsn, model, dataset="scene", split="test", progress=False)
    tta = evaluate(db_dsn, model, dataset="scene", split="test", progress=False, tta=True)
    assert np.array_equal(plain.confusion, tta.confusion) and tta.confusion.sum() == truth.size
    assert "test-time augmentation" in str(tta) and "test-time augmentation" not in str(plain)
    (params,) = conn.execute("SELECT params FROM pggeolearn.runs WHERE run_id = %s", [tta.run_id]).fetchone()
    assert params["tta"] is True


def test_refusals(scene, db_dsn):
    conn, _, _ = scene
    evaluate(db_dsn, BrightnessPredictor(tile_px=PX), dataset="scene", out_layer="public.ev", progress=False)
    with pytest.raises(errors.AlreadyExists, match="public.ev already exists"):
        evaluate(db_dsn, BrightnessPredictor(tile_px=PX), dataset="scene", out_layer="public.ev",
                 progress=False)
    evaluate(db_dsn, BrightnessPredictor(tile_px=PX), dataset="scene", out_layer="public.ev",
             overwrite=True, progress=False)
    with pytest.raises(errors.NotBuilt, match="no chips with imagery in split 'val'"):
        evaluate(db_dsn, BrightnessPredictor(tile_px=PX), dataset="scene", split="val", progress=False)
    with pytest.raises(errors.ConfigError, match="takes 64 px tiles"):
        evaluate(db_dsn, BrightnessPredictor(tile_px=64), dataset="scene", progress=False)
    with pytest.raises(errors.DatasetNotFound):
        evaluate(db_dsn, BrightnessPredictor(tile_px=PX), dataset="nope", progress=False)
    with pytest.raises(RuntimeError):
        evaluate(db_dsn, BrightnessPredictor(tile_px=PX, fail_on_call=2), dataset="scene", batch_size=4,
                 out_layer="public.ev2", progress=False)
    assert conn.execute("SELECT to_regclass('public.ev2')").fetchone()[0] is None
    runs = conn.execute("SELECT kind, status FROM pggeolearn.runs ORDER BY run_id").fetchall()
    assert runs == [("evaluate", "done"), ("evaluate", "done"), ("evaluate", "failed")]


def test_hard_examples_steer_sampling(scene, db_dsn):
    """evaluate's per-chip loss, read back by a sampling query, makes the hard chips frequent."""
    from pggeolearn.stream import GeoStream

    conn, _, _ = scene
    rep = evaluate(db_dsn, BrightnessPredictor(tile_px=PX), dataset="scene", split="test",
                   progress=False)
    hard = {r[0] for r in conn.execute(
        "SELECT tile_id FROM pggeolearn.chip_scores WHERE run_id = %s AND loss > 1", [rep.run_id])}
    assert hard  # the hidden building and the false roof
    query = ("SELECT tile_id, 0.05 + loss AS weight FROM pggeolearn.chip_scores "
             f"WHERE run_id = {rep.run_id}")
    drawn = []
    with GeoStream(db_dsn, "scene", split="test", batch_size=4, sampling=query) as s:
        for epoch in range(5):
            for batch in s.iter_epoch(epoch):
                drawn += batch["tile_id"][: len(batch["tile_id"]) - int(batch["pad"])].tolist()
    share = sum(t in hard for t in drawn) / len(drawn)
    assert share > 3 * len(hard) / (NCOLS * NROWS)  # far above their share of the split
