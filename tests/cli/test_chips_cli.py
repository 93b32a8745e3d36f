"""``pggeolearn chips build|split|stats|show|map``: what a user sees, success and failure."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pggeolearn import datasets, wkb
from pggeolearn.cli.main import cli

UL = (9519900.0, 3202900.0)
PX, NCOLS, NROWS = 16, 6, 5


@pytest.fixture
def small(conn):
    """A 6 x 5 grid of 16 px tiles (1 m, EPSG:3857), one raster per tile except tile 0."""
    rng = np.random.default_rng(3)
    conn.execute("CREATE TABLE public.img (rid serial PRIMARY KEY, rast raster)")
    for t in range(1, NCOLS * NROWS):
        r, c = divmod(t, NCOLS)
        tile = wkb.from_array(rng.integers(1, 256, (3, PX, PX), dtype=np.uint8),
                              geotransform=(UL[0] + c * PX, 1.0, 0.0, UL[1] - r * PX, 0.0, -1.0),
                              srid=3857, nodata=0)
        conn.execute("INSERT INTO public.img (rast) VALUES (ST_RastFromWKB(%b))", [wkb.encode(tile)])
    conn.execute("CREATE TABLE public.shapes (class_id int, geom geometry(Polygon, 3857))")
    conn.execute("INSERT INTO public.shapes VALUES (1, ST_MakeEnvelope(%s, %s, %s, %s, 3857))",
                 [UL[0], UL[1] - 50, UL[0] + NCOLS * PX, UL[1] - 40])
    extent = (UL[0], UL[1] - NROWS * PX, UL[0] + NCOLS * PX, UL[1])
    datasets.create(conn, datasets.Recipe(
        name="small", srid=3857, resolution=1.0, tile_px=PX, extent=extent,
        image_sql="SELECT rast FROM public.img WHERE ST_Intersects(rast, tile_geom)",
        label_sql="SELECT geom, class_id FROM public.shapes WHERE geom && tile_geom",
        classes={1: "band"}))
    return conn


def run(*args: str) -> subprocess.CompletedProcess:
    """The CLI exactly as a user runs it (main() prints errors, not cli)."""
    return subprocess.run([sys.executable, "-m", "pggeolearn", *args],
                          capture_output=True, text=True, timeout=120)


def test_build_split_stats_show_map(db_dsn, small, tmp_path):
    conn = small
    runner = CliRunner()
    result = runner.invoke(cli, ["--dsn", db_dsn, "chips", "build", "small", "--jobs", "2",
                                 "--where", "tile_id < 12", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "built 12 of 12 selected tiles" in result.output
    assert "1 orphans" in result.output and "leakage check: 0" in result.output

    result = runner.invoke(cli, ["--dsn", db_dsn, "chips", "build", "small", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "built 18 of 30 selected tiles (12 already current" in result.output
    assert conn.execute("SELECT count(*) FROM pggeolearn.chips").fetchone()[0] == 30

    result = runner.invoke(cli, ["--dsn", db_dsn, "chips", "split", "small", "--block-m", "30",
                                 "--ratios", "0.6,0.2,0.2", "--seed", "4", "--guard-m", "5"])
    assert result.exit_code == 0, result.output
    assert "blocks of 30 m" in result.output and "seed 4" in result.output
    assert datasets.get(conn, "small").stats["split_params"]["ratios"] == [0.6, 0.2, 0.2]

    result = runner.invoke(cli, ["--dsn", db_dsn, "chips", "stats", "small"])
    assert result.exit_code == 0, result.output
    assert "leakage 0" in result.output and "band" in result.output

    out = tmp_path / "sheet.png"
    result = runner.invoke(cli, ["--dsn", db_dsn, "chips", "show", "small", "--out", str(out),
                                 "--n", "4", "--split", "train"])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (2 * (PX + 8), 2 * (PX + 8 + 14) + 18)

    result = runner.invoke(cli, ["--dsn", db_dsn, "chips", "map", "small"])
    assert result.exit_code == 0, result.output
    assert 'pggeolearn."chips_map_small"' in result.output and "QGIS" in result.output
    assert conn.execute('SELECT count(*) FROM pggeolearn."chips_map_small"').fetchone()[0] == 30


def test_errors_are_one_line(db_dsn, small):
    result = run("--dsn", db_dsn, "chips", "build", "nope", "--no-progress")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: unknown dataset 'nope' (known: small)"]
    result = run("--dsn", db_dsn, "chips", "build", "small", "--where", "bogus", "--no-progress")
    assert result.returncode == 1 and result.stderr.startswith("error: --where fails:")
    assert len(result.stderr.strip().splitlines()) == 1
    result = run("--dsn", db_dsn, "chips", "show", "small", "--out", "x.png")
    assert result.returncode == 1 and "no chips" in result.stderr
    result = run("--dsn", db_dsn, "chips", "split", "small", "--ratios", "0.7,0.3")
    assert result.returncode == 2 and "three numbers" in result.stderr
