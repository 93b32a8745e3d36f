"""The review loop: predicted objects against the map (new / missing / changed), statuses edited
in place, accepted new objects exported as GeoJSON; the layer styled by kind in QGIS and in the
dataset's project; the commands a mapper types."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from qgis_helpers import needs_qgis, probe

from pggeolearn import errors
from pggeolearn.cli.main import cli
from pggeolearn.qgis import project as qproject
from pggeolearn.qgis import review
from pggeolearn.qgis.uris import layer_uri, project_uri

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_evaluate import BUILDINGS, FALSE_ROOF, HIDDEN, PX  # noqa: E402
from test_evaluate import scene as scene  # noqa: E402, F401  (the fixture)
from test_predict import RES, UL, BrightnessPredictor  # noqa: E402

from pggeolearn import predict  # noqa: E402


def box(r0, r1, c0, c1) -> list[float]:
    return [UL[0] + c0 * RES, UL[1] - r1 * RES, UL[0] + c1 * RES, UL[1] - r0 * RES]


@pytest.fixture
def run(scene, db_dsn):
    """A prediction of the scene; the map (public.buildings) has every building and the hidden
    one, and one building mapped as a quarter of its real outline."""
    conn = scene[0]
    rep = predict.predict(db_dsn, BrightnessPredictor(tile_px=PX), out="public.pred", dataset="scene",
                          split="test", overlap=4, tile_px=32, progress=False)
    r0, r1, c0, c1 = BUILDINGS[1]
    conn.execute("UPDATE public.buildings SET geom = ST_MakeEnvelope(%s, %s, %s, %s, 3857) WHERE id = 2",
                 box(r0, (r0 + r1) // 2, c0, (c0 + c1) // 2))
    return conn, rep.run_id


def test_new_missing_changed(run, tmp_path):
    conn, run_id = run
    rep = review.review(conn, run_id, "public.buildings")
    assert rep.table == "public.pred_review" and rep.counts == {"new": 1, "missing": 1, "changed": 1}
    rows = conn.execute("SELECT kind, status, round(iou::numeric, 2), map_ids, ST_AsText(ST_Envelope(geom))"
                        " FROM public.pred_review ORDER BY kind").fetchall()
    env = {k: g for k, *_, g in rows}
    assert [(k, s, i, m) for k, s, i, m, _ in rows] == [
        ("changed", "todo", 0.25, ["2"]), ("missing", "todo", None, ["5"]), ("new", "todo", None, None)]
    for kind, rect in (("new", FALSE_ROOF), ("missing", HIDDEN)):
        x0, y0, x1, y1 = box(*rect)
        ring = [(x0, y0), (x0, y1), (x1, y1), (x1, y0), (x0, y0)]
        assert env[kind] == "POLYGON((" + ",".join(f"{x:.15g} {y:.15g}" for x, y in ring) + "))"
    # a stricter threshold lists nothing more: the other buildings match exactly
    assert review.review(conn, run_id, "public.buildings", out="public.r2", iou=0.99).counts == rep.counts
    # the mapper accepts the new roof; only accepted new objects are exported, in WGS 84
    conn.execute("UPDATE public.pred_review SET status = 'accepted', note = 'checked' WHERE kind = 'new'")
    with pytest.raises(Exception, match="status_check"):
        conn.execute("UPDATE public.pred_review SET status = 'maybe'")
    out = tmp_path / "new.geojson"
    assert review.export(conn, "public.pred_review", out) == 1
    fc = json.loads(out.read_text())
    (f,) = fc["features"]
    assert f["properties"]["kind"] == "new" and f["properties"]["note"] == "checked"
    lon, lat = f["geometry"]["coordinates"][0][0][0]
    assert 85.5 < lon < 85.6 and 27.5 < lat < 27.7
    assert review.export(conn, "public.pred_review", out, kinds=["missing"], statuses=["todo"]) == 1
    # where the model saw no imagery (no class raster tile), a mapped building is not "missing"
    x0, y0, x1, y1 = box(*HIDDEN)
    conn.execute("DELETE FROM public.pred WHERE ST_Intersects(ST_ConvexHull(rast),"
                 " ST_MakeEnvelope(%s, %s, %s, %s, 3857))", [x0, y0, x1, y1])
    assert review.review(conn, run_id, "public.buildings", out="public.r3").counts.get("missing", 0) == 0


def test_refusals(run, tmp_path):
    conn, run_id = run
    review.review(conn, run_id, "public.buildings")
    cases = [
        (lambda: review.review(conn, run_id, "public.buildings"), errors.AlreadyExists, "--overwrite"),
        (lambda: review.review(conn, 999, "public.buildings"), errors.NotFound, "not a prediction"),
        (lambda: review.review(conn, run_id, "public.nope"), errors.NotFound, "no geometry column"),
        (lambda: review.review(conn, run_id, "public.buildings", iou=0), errors.ConfigError, "IoU"),
        (lambda: review.review(conn, run_id, "public.buildings", classes=["road"]), errors.ConfigError,
         "no objects of class road"),
        (lambda: review.export(conn, "public.pred_review", tmp_path / "x.json", kinds=["old"]),
         errors.ConfigError, "unknown kind old"),
        (lambda: review.export(conn, "public.pred_review", tmp_path / "no" / "x.json"), errors.ConfigError,
         "does not exist"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    assert review.review(conn, run_id, "public.buildings", overwrite=True, classes=["building"]).counts["new"] == 1


def test_cli_review_loop_and_project(run, db_dsn, tmp_path):
    conn, run_id = run
    runner = CliRunner()
    env = {"PGGEOLEARN_DSN": db_dsn}
    res = runner.invoke(cli, ["review", str(run_id), "--against", "public.buildings", "--iou", "0.6"], env=env)
    assert res.exit_code == 0, res.output
    assert "1 new, 1 missing, 1 changed" in res.output and "QGIS project 'scene' refreshed" in res.output
    conn.execute("UPDATE public.pred_review SET status = 'accepted' WHERE kind = 'new'")
    out = tmp_path / "new.geojson"
    res = runner.invoke(cli, ["review", "export", "public.pred_review", "--out", str(out)], env=env)
    assert res.exit_code == 0 and "wrote 1 objects" in res.output
    res = runner.invoke(cli, ["qgis", "project", "scene", "--model", "brightness"], env=env)
    assert res.exit_code == 0, res.output
    assert "Review: brightness: review (pred_review) (public.pred_review)" in res.output
    res = runner.invoke(cli, ["review", "999", "--against", "public.buildings"], env=env)
    assert res.exit_code == 1 and isinstance(res.exception, errors.NotFound)


@needs_qgis
def test_qgis_opens_the_review_layer_styled_and_editable(run, tmp_path):
    conn, run_id = run
    review.review(conn, run_id, "public.buildings")
    p = qproject.write_project(conn, "scene")
    assert [g for g, _ in p.groups][0] == "Review"
    # opened as the Browser opens it (type in the URI): the default style comes from layer_styles
    uri = layer_uri(conn, "public.pred_review", srid=3857)
    rep = probe({"layers": [{"name": "review", "provider": "postgres", "uri": uri}], "factors": [1, 4, 16]},
                tmp_path)
    (lyr,) = rep["layers"]
    assert lyr["valid"] and lyr["renderer"] == "categorizedSymbol" and lyr["features"] == 3
    assert lyr["categories"] == ["new", "missing", "changed"]
    assert all(lyr["renders"][k] > 0 for k in ("1", "4", "16"))
    # in the stored project, status is a drop-down of todo / accepted / rejected
    env = {"PGHOST": conn.info.host, "PGPORT": str(conn.info.port), "PGUSER": conn.info.user}
    rep = probe({"project": project_uri(conn, "pggeolearn", "scene"), "factors": [4], "out": str(tmp_path),
                 "project_px": 480}, tmp_path, env=env)
    (lyr,) = [x for x in rep["layers"] if x["name"] == "brightness: review (pred_review)"]
    assert lyr["valid"] and lyr["editable"] and lyr["widgets"] == {"status": "ValueMap"}
    assert lyr["renderer"] == "categorizedSymbol" and lyr["renders"]["4"] > 0
    assert rep["project_render"] > 0
