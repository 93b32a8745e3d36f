"""Validity, honestly: NODATA pixels are no class, no loss and no score.

A zoo scene (the synthetic scene with a NODATA edge) goes through chips, streaming, a tiny
training and ``evaluate --split val``: batches carry the ``valid`` mask, class counts leave
NODATA out, and training's stored validation numbers equal evaluate's exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from pggeolearn import chips, datasets, wkb
from pggeolearn.evaluate import evaluate
from pggeolearn.importers import import_raster
from pggeolearn.stream import GeoStream
from pggeolearn.synthetic import make_scene, scene_variant
from pggeolearn.training import registry, train

TINY = dict(width=4, depth=1, stem_stride=1, batch_size=4, lr=0.02, progress=False)
EDGE = 20  # NODATA pixels along the left and bottom edges


def test_valid_mask_rule():
    data = np.array([[[0, 0, 5]], [[0, 7, 0]]], np.uint8)  # 2 bands, 1 x 3 pixels
    assert wkb.valid_mask(data, (0, 0)).tolist() == [[False, True, True]]
    assert wkb.valid_mask(data, (0, None)).all()  # a band without NODATA: all valid
    f = np.array([[[np.nan, 1.0]]], np.float32)
    assert wkb.valid_mask(f, (float("nan"),)).tolist() == [[False, True]]


@pytest.fixture(scope="module")
def edge_scene(tmp_path_factory):
    d = tmp_path_factory.mktemp("validity")
    scene = make_scene(d, size_px=256, seed=5)
    return scene, scene_variant(scene, d / "edge.tif", nodata=0, nodata_edge_px=EDGE)


@pytest.fixture
def edge_ds(conn, edge_scene):
    scene, path = edge_scene
    import_raster(conn, [path], "public.img", progress=False)
    import_raster(conn, [scene.image_path], "public.img_full", progress=False)
    datasets.create(conn, datasets.Recipe(
        name="edge", srid=3857, resolution=scene.resolution, extent=scene.bounds, tile_px=64,
        image_sql="SELECT rast FROM public.img WHERE ST_Intersects(rast, tile_geom)",
        label_sql="SELECT ST_Buffer(ST_Centroid(tile_geom), 12) AS geom, 1 AS class_id "
                  "UNION ALL SELECT ST_Buffer(ST_PointN(ST_ExteriorRing(tile_geom), 1), 20), 1",
        classes={1: "blob"}))
    chips.build(conn, "edge", progress=False)
    # splits by hand: validation = the left column (NODATA along its left edge) + one more
    conn.execute("UPDATE pggeolearn.chips SET split = CASE WHEN tile_id % 4 = 0 OR tile_id = 5 "
                 "THEN 'val' ELSE 'train' END WHERE dataset = 'edge'")
    return conn


def test_class_counts_and_batches_leave_nodata_out(edge_ds, db_dsn):
    conn = edge_ds
    rows = conn.execute("SELECT tile_id, ST_AsBinary(image), ST_AsBinary(label), class_counts "
                        "FROM pggeolearn.chips WHERE dataset = 'edge' ORDER BY tile_id").fetchall()
    some_nodata = 0
    for tile_id, image, label, counts in rows:
        img, lab = wkb.decode(bytes(image)), wkb.decode(bytes(label))
        valid = img.valid()
        some_nodata += int((~valid).any())
        assert sum(counts) == valid.sum(), tile_id
        assert counts[1] == int(((lab.data[0] == 1) & valid).sum()), tile_id
    assert some_nodata >= 4  # the left column and the bottom row
    with GeoStream(db_dsn, "edge", split="val", batch_size=8, shuffle=False) as s:
        batch = next(iter(s))
    assert batch["valid"].dtype == bool and batch["valid"].shape == batch["label"].shape
    assert not batch["valid"].all() and batch["valid"].any()
    for i, tid in enumerate(batch["tile_id"][: 8 - batch["pad"]]):
        img = wkb.decode(bytes(next(r[1] for r in rows if r[0] == tid)))
        assert np.array_equal(batch["valid"][i], img.valid())


@pytest.mark.parametrize("framework", ["mxnet", "torch"])
def test_training_val_numbers_equal_evaluate_val(edge_ds, db_dsn, framework):
    pytest.importorskip("pggeolearn.mxnet" if framework == "mxnet" else "torch")
    report = train(db_dsn, "edge", "m", framework=framework, epochs=2, **TINY)
    stored = registry.get(edge_ds, "m").metrics["best"]
    rep = evaluate(db_dsn, "m", dataset="edge", split="val", progress=False, n_worst=0)
    all_px = rep.tiles * 64 * 64
    assert rep.scores.pixels < all_px  # NODATA pixels are not scored
    assert stored["pixels"] == rep.scores.pixels
    assert stored["miou"] == rep.scores.miou
    assert stored["accuracy"] == rep.scores.accuracy
    assert stored["iou"] == [float(v) for v in rep.scores.iou]
    # the baselines are scored on the same pixels
    assert report.baselines["all background"].pixels == rep.scores.pixels


def _tiles(conn, name):
    rows = conn.execute("SELECT tile_id, ST_AsBinary(pggeolearn.image_tile(%s, tile_id)) "
                        "FROM pggeolearn.tile_grid(%s) ORDER BY tile_id", [name, name]).fetchall()
    return {t: wkb.decode(bytes(b)) for t, b in rows}


@pytest.mark.parametrize("crs", [None, 4326])
def test_no_nodata_invented_where_the_source_has_none(conn, edge_scene, tmp_path, crs):
    import rasterio

    scene, _ = edge_scene
    path = tmp_path / "black.tif"
    scene_variant(scene, path, crs=crs)
    with rasterio.open(path, "r+") as f:  # genuinely black pixels in the middle of the scene
        data = f.read()
        data[:, 100:140, 100:140] = 0
        f.write(data)
    import_raster(conn, [path], "public.black", tile_size=100, progress=False)
    minx, miny, maxx, maxy = scene.bounds
    if crs is None:
        res, src_filter = scene.resolution, "ST_Intersects(rast, tile_geom)"
    else:
        res, src_filter = 0.6, "ST_Intersects(rast, ST_Transform(tile_geom, 4326))"
    # the grid reaches beyond the imagery on the east
    extent = (minx, miny, maxx + 64 * res, maxy)
    ds = datasets.create(conn, datasets.Recipe(
        name="black", srid=3857, resolution=res, extent=extent, tile_px=64,
        image_sql=f"SELECT rast FROM public.black WHERE {src_filter}",
        label_sql="SELECT ST_Buffer(ST_Centroid(tile_geom), 2) AS geom, 1 AS class_id",
        classes={1: "x"}))
    tiles = _tiles(conn, "black")
    inside = [t for tid, t in tiles.items()
              if 1 <= tid % ds.ncols <= ds.ncols - 3 and 1 <= tid // ds.ncols <= ds.nrows - 2]
    assert inside and all(t.nodata == (None, None, None) for t in inside)
    assert sum(int((t.data == 0).all(axis=0).sum()) for t in inside) > 1000  # the black square
    assert all(t.valid().all() for t in inside)
    east = tiles[ds.ncols - 1]  # beyond the imagery: NODATA marks what no source covers
    assert east.nodata[0] == 0 and not east.valid().any()


def test_alpha_band_becomes_validity_not_colour(conn, edge_scene, tmp_path):
    import rasterio

    scene, _ = edge_scene
    path = scene_variant(scene, tmp_path / "rgba.tif", alpha=True, nodata_edge_px=EDGE)
    with rasterio.open(path) as f:
        rgb, alpha = f.read()[:3], f.read(4)
    rep = import_raster(conn, [path], "public.rgba", progress=False)
    assert rep.bands == 3  # the alpha band is not a colour band
    rows = conn.execute("SELECT ST_AsBinary(rast) FROM public.rgba ORDER BY rid").fetchall()
    t = wkb.decode(bytes(rows[0][0]))  # the upper-left import tile: its left edge is masked
    nd = t.nodata[0]
    assert t.nodata == (nd,) * 3 and nd is not None
    h, w = t.height, t.width
    assert np.array_equal(t.valid(), alpha[:h, :w] > 0)
    keep = alpha[:h, :w] > 0
    assert np.array_equal(t.data[:, keep], rgb[:, :h, :w][:, keep])  # colours untouched
    # the value chosen is held by no valid pixel in every band
    assert not ((rgb[:, keep] == nd).all(axis=0)).any()
    # asked for: the alpha band is a band like any other
    rep = import_raster(conn, [path], "public.rgba4", progress=False, keep_alpha=True)
    assert rep.bands == 4


def test_gdal_mask_becomes_validity(conn, edge_scene, tmp_path):
    import rasterio

    scene, _ = edge_scene
    path = tmp_path / "masked.tif"
    with rasterio.open(scene.image_path) as src:
        rgb, profile = src.read(), src.profile
    mask = np.full(rgb.shape[1:], 255, np.uint8)
    mask[:, :EDGE] = 0
    rgb[:, 50:60, 50:60] = 0  # black, valid: the NODATA value must be another one
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(rgb)
        dst.write_mask(mask)
    rep = import_raster(conn, [path], "public.masked", progress=False)
    assert rep.bands == 3
    t = wkb.decode(bytes(conn.execute("SELECT ST_AsBinary(rast) FROM public.masked "
                                      "ORDER BY rid LIMIT 1").fetchone()[0]))
    assert t.nodata[0] == 255  # 0 is taken by the black pixels (255: the next candidate)
    assert np.array_equal(t.valid(), mask[:t.height, :t.width] > 0)
