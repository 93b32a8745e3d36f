"""One grid: a model trained on a dataset predicts on that dataset's grid (origin and exact
resolution) unless told otherwise, so a prediction over a val chip's extent is pixel-aligned
with the chip and equals what evaluate predicts for it."""

from __future__ import annotations

import numpy as np
import pytest

from pggeolearn import chips, datasets, wkb
from pggeolearn.importers import import_raster
from pggeolearn.predict import predict
from pggeolearn.synthetic import make_scene
from pggeolearn.training import registry, train

TINY = dict(width=4, depth=1, stem_stride=1, batch_size=4, lr=0.02, progress=False, epochs=1)
PX = 64


@pytest.fixture(scope="module")
def grid_scene(tmp_path_factory):
    return make_scene(tmp_path_factory.mktemp("onegrid"), size_px=256, seed=13)


def test_prediction_on_a_val_chip_is_that_chip(conn, db_dsn, grid_scene):
    scene = grid_scene
    import_raster(conn, [scene.image_path], "public.img", progress=False)
    res = scene.resolution
    minx, miny, maxx, maxy = scene.bounds
    shift = 0.37 * res  # the dataset grid is NOT the imagery's grid (nor on multiples of res)
    datasets.create(conn, datasets.Recipe(
        name="g", srid=3857, resolution=res, extent=(minx + shift, miny, maxx, maxy - shift),
        tile_px=PX, image_sql="SELECT rast FROM public.img WHERE ST_Intersects(rast, tile_geom)",
        label_sql="SELECT ST_Buffer(ST_Centroid(tile_geom), 10) AS geom, 1 AS class_id",
        classes={1: "blob"}))
    chips.build(conn, "g", progress=False)
    conn.execute("UPDATE pggeolearn.chips SET split = CASE WHEN tile_id = 5 THEN 'val' "
                 "ELSE 'train' END WHERE dataset = 'g' AND image IS NOT NULL AND nodata_frac <= 0.5")
    train(db_dsn, "g", "gm", **TINY)
    chip = wkb.decode(bytes(conn.execute(
        "SELECT ST_AsBinary(image) FROM pggeolearn.chips WHERE dataset = 'g' AND tile_id = 5"
    ).fetchone()[0]))
    ulx, uly = chip.upper_left
    ext = (ulx, uly - PX * res, ulx + PX * res, uly)
    # shrunk by a fifth of a pixel: the grid, not the extent, decides where pixels fall
    inner = (ext[0] + 0.2 * res, ext[1] + 0.2 * res, ext[2] - 0.2 * res, ext[3] - 0.2 * res)
    rep = predict(db_dsn, "gm", out="public.pred", imagery="public.img", extent=inner, overlap=0,
                  vectorize=False, overviews=(), progress=False)
    assert any("dataset g's grid" in n for n in rep.notes)
    out = wkb.decode(bytes(conn.execute("SELECT ST_AsBinary(rast) FROM public.pred").fetchone()[0]))
    assert out.upper_left == pytest.approx((ulx, uly), abs=res * 1e-6)
    assert out.scale_x == pytest.approx(res, rel=1e-12)
    assert (out.height, out.width) == (PX, PX)
    # evaluate's prediction of the chip: the model on the chip's pixels
    expect = registry.load(conn, "gm").predict(chip.data[None])[0]
    assert np.array_equal(out.data[0], expect)
    # told otherwise: a grid origin given is used
    predict(db_dsn, "gm", out="public.pred0", imagery="public.img", extent=inner, overlap=0,
            vectorize=False, overviews=(), progress=False, grid_origin=(0.0, 0.0))
    ul0 = conn.execute("SELECT ST_UpperLeftX(rast) FROM public.pred0 LIMIT 1").fetchone()[0]
    assert abs(ul0 / res - round(ul0 / res)) < 1e-6 and abs(ul0 - ulx) > 0.1 * res
