"""``pggeolearn predict`` and ``pggeolearn evaluate``: what a user sees, success and failure.

The model comes in as ``module:attribute`` (:func:`make_model` below), the way a model from
outside the registry is named on the command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pggeolearn import chips, datasets, wkb
from pggeolearn.cli.main import cli

UL = (9519900.0, 3202900.0)
HERE = Path(__file__).resolve().parent


class Brightness:
    """A deterministic per-pixel model: class 1 where the band mean is above 128."""

    name, framework, tile_px, resolution, srid, bands = "brightness", "numpy", 32, 1.0, 3857, 3
    classes = {0: "background", 1: "building"}
    normalization = None

    def predict_proba(self, images_uint8: np.ndarray) -> np.ndarray:
        p1 = 1 / (1 + np.exp(-(images_uint8.astype(np.float32).mean(axis=1) - 128) / 8))
        return np.stack([1 - p1, p1], axis=1).astype(np.float32)


def make_model() -> Brightness:
    return Brightness()


@pytest.fixture
def imagery(conn):
    """public.img: 96 x 64 px at 1 m in 32 px tiles, one bright 20 x 40 m building crossing tiles."""
    data = np.full((3, 64, 96), 30, np.uint8)
    data[:, 20:40, 20:60] = 230
    conn.execute("CREATE TABLE public.img (rid serial PRIMARY KEY, rast raster)")
    for r in (0, 32):
        for c in (0, 32, 64):
            t = wkb.from_array(np.ascontiguousarray(data[:, r:r + 32, c:c + 32]),
                               geotransform=(UL[0] + c, 1, 0, UL[1] - r, 0, -1), srid=3857)
            conn.execute("INSERT INTO public.img (rast) VALUES (ST_RastFromWKB(%b))", [wkb.encode(t)])
    return conn


def extent_args() -> list[str]:
    return ["--extent", str(UL[0]), str(UL[1] - 64), str(UL[0] + 96), str(UL[1])]


def run(*args: str) -> subprocess.CompletedProcess:
    """The CLI exactly as a user runs it (main() prints errors), this folder importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pggeolearn", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_predict_writes_layers_and_says_so(db_dsn, imagery):
    conn = imagery
    result = CliRunner().invoke(cli, ["--dsn", db_dsn, "predict", "test_predict_cli:make_model",
                                      "--imagery", "public.img", *extent_args(), "--out", "public.pred",
                                      "--overlap", "8", "--tile-size", "32", "--probabilities",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "run 1: model test_predict_cli:make_model predicted 96 x 64 px (EPSG:3857" in out
    assert "class raster public.pred: 8BUI, 32 px tiles, NODATA 255 where there was no imagery" in out
    assert "probabilities public.pred_prob" in out and "p = value / 254" in out
    assert "polygons public.pred_polygons: 1 objects" in out
    assert conn.execute("SELECT pixels FROM public.pred_polygons").fetchone()[0] == 800

    result = CliRunner().invoke(cli, ["--dsn", db_dsn, "predict", "test_predict_cli:make_model",
                                      "--imagery", "public.img", *extent_args(), "--out", "public.pred",
                                      "--stitch", "blend", "--overwrite", "--no-polygons", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "blend stitching" in result.output and "polygons" not in result.output.split("QGIS")[0]


def test_predict_errors_are_one_line(db_dsn, imagery):
    r = run("--dsn", db_dsn, "predict", "nope", "--imagery", "public.img", *extent_args(),
            "--out", "public.pred", "--no-progress")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["error: unknown model 'nope' (none trained yet: pggeolearn train)"]

    args = ["--dsn", db_dsn, "predict", "test_predict_cli:make_model", "--imagery", "public.img",
            "--out", "public.pred", "--no-progress"]
    r = run(*args, "--extent", "0", "0", "10", "10")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: no imagery in the extent 0.000 0.000 10.000 10.000 (EPSG:3857)")

    assert run(*args, *extent_args()).returncode == 0
    r = run(*args, *extent_args())
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: table public.pred already exists: pass --overwrite to replace it or --append to add to it"]
    r = run(*args[:-1], "--dataset", "x", *extent_args())
    assert r.returncode == 1 and "exactly one of an extent" in r.stderr
    r = run(*args, *extent_args(), "--overwrite", "--min-pixels", "-1")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: min pixels must be a whole number of pixels >= 0 (0 keeps every object), not -1"]


def test_evaluate_prints_scores_and_writes_the_layer(db_dsn, imagery, tmp_path):
    conn = imagery
    conn.execute("CREATE TABLE public.b (geom geometry(Polygon, 3857))")
    conn.execute("INSERT INTO public.b VALUES (ST_MakeEnvelope(%s, %s, %s, %s, 3857))",
                 [UL[0] + 20, UL[1] - 40, UL[0] + 60, UL[1] - 20])
    datasets.create(conn, datasets.Recipe(
        name="d", srid=3857, resolution=1.0, tile_px=32, extent=(UL[0], UL[1] - 64, UL[0] + 96, UL[1]),
        image_sql="SELECT rast FROM public.img WHERE ST_Intersects(rast, tile_geom)",
        label_sql="SELECT geom, 1 AS class_id FROM public.b WHERE geom && tile_geom", classes={1: "building"}))
    chips.build(conn, "d", progress=False)
    conn.execute("UPDATE pggeolearn.chips SET split = 'test'")
    png = tmp_path / "worst.png"
    result = CliRunner().invoke(cli, ["--dsn", db_dsn, "evaluate", "test_predict_cli:make_model",
                                      "--dataset", "d", "--out-layer", "public.d_eval", "--png", str(png),
                                      "--worst", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "6 tiles, 6144 pixels" in out and "mIoU 1.000" in out
    assert "true \\ predicted" in out and "building" in out
    assert "per-tile layer public.d_eval" in out and f"worst tiles image: {png}" in out
    assert png.exists()
    assert conn.execute("SELECT count(*) FROM public.d_eval").fetchone()[0] == 6
    r = run("--dsn", db_dsn, "evaluate", "test_predict_cli:make_model", "--dataset", "d",
            "--out-layer", "public.d_eval", "--no-progress")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: table public.d_eval already exists: pass --overwrite to replace it"]
