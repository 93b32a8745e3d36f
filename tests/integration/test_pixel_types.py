"""Every pixel type end to end: the scene zoo through chips, streaming, a tiny training,
evaluate and predict. The model records its input (pixel types, bands, normalization), and a
mismatch names both sides before any work starts."""

from __future__ import annotations

import numpy as np
import pytest
from rasterio.warp import transform_bounds

from pggeolearn import chips, datasets, errors, wkb
from pggeolearn.evaluate import evaluate
from pggeolearn.importers import import_raster
from pggeolearn.predict import predict
from pggeolearn.stream import GeoStream
from pggeolearn.synthetic import make_scene, scene_variant, utm_epsg
from pggeolearn.training import registry, train

TINY = dict(width=4, depth=1, stem_stride=1, batch_size=4, lr=0.02, progress=False, epochs=1)
UTM = utm_epsg(85.52, 27.63)
ZOO = {  # name: (scene_variant arguments, table pixel types, import tile px, grid SRID)
    "16BUI-1band-nodata-edges": (dict(dtype="uint16", bands=1, nodata=0, nodata_edge_px=20),
                                 ("16BUI",), 256, 3857),
    "16BSI-3band": (dict(dtype="int16"), ("16BSI",) * 3, 256, 3857),
    "32BF-4band": (dict(dtype="float32", bands=4), ("32BF",) * 4, 256, 3857),
    "8BUI-rgba": (dict(alpha=True, nodata_edge_px=20), ("8BUI",) * 3, 256, 3857),
    "lonlat-import256-utm-grid": (dict(crs=4326), ("8BUI",) * 3, 256, UTM),
    "lonlat-import100-utm-grid": (dict(crs=4326), ("8BUI",) * 3, 100, UTM),
    "misaligned-source-grid": (dict(crs=3857, resolution=0.6, shift_px=(0.4, 0.3)),
                               ("8BUI",) * 3, 100, 3857),
}


@pytest.fixture(scope="module")
def zoo_scene(tmp_path_factory):
    return make_scene(tmp_path_factory.mktemp("zoo"), size_px=256, seed=9)


def _load(conn, scene, path, name: str, import_px: int = 256, srid: int = 3857) -> datasets.Dataset:
    import_raster(conn, [path], f"public.{name}", tile_size=import_px, progress=False)
    extent, res = scene.bounds, scene.resolution
    if srid != 3857:
        extent, res = transform_bounds("EPSG:3857", f"EPSG:{srid}", *scene.bounds), 0.5
    datasets.create(conn, datasets.Recipe(
        name=name, srid=srid, resolution=res, extent=extent, tile_px=64,
        image_sql=f"SELECT rast FROM public.{name} "
                  f"WHERE ST_Intersects(rast, pggeolearn.tile_geom_in(tile_geom, 'public.{name}'))",
        label_sql="SELECT ST_Buffer(ST_Centroid(tile_geom), 10) AS geom, 1 AS class_id",
        classes={1: "blob"}))
    chips.build(conn, name, progress=False)
    conn.execute("UPDATE pggeolearn.chips SET split = CASE WHEN tile_id IN (5, 10) THEN 'val' "
                 "ELSE 'train' END WHERE dataset = %s AND image IS NOT NULL AND nodata_frac <= 0.5", [name])
    return datasets.get(conn, name)


@pytest.mark.parametrize("case", list(ZOO))
def test_pixel_type_end_to_end(conn, db_dsn, zoo_scene, tmp_path, case):
    variant, types, import_px, srid = ZOO[case]
    path = scene_variant(zoo_scene, tmp_path / "zoo.tif", **variant)
    ds = _load(conn, zoo_scene, path, "zoo", import_px, srid)
    with GeoStream(db_dsn, "zoo", split="train", batch_size=4) as s:
        batch = next(iter(s))
    assert batch["image"].dtype == wkb.PIXEL_TYPES[types[0]].dtype
    assert batch["image"].shape[1] == len(types)
    train(db_dsn, "zoo", "zm", **TINY)
    rec = registry.get(conn, "zm")
    assert rec.bands == len(types) and rec.normalization["pixel_types"] == list(types)
    assert len(rec.normalization["mean"]) == len(types)
    rep = evaluate(db_dsn, "zm", dataset="zoo", split="val", progress=False, n_worst=2,
                   png=tmp_path / "worst.png")
    assert rep.tiles == 2 and rep.scores.pixels > 0 and rep.png.exists()
    # predict over one val chip's extent, on the dataset's grid (the chip's own pixels)
    r, c = divmod(5, ds.ncols)
    minx, _, _, maxy = ds.recipe.extent
    size = 64 * ds.recipe.resolution
    ext = (minx + c * size, maxy - (r + 1) * size, minx + (c + 1) * size, maxy - r * size)
    out = predict(db_dsn, "zm", out="public.zoo_pred", extent=ext, dataset=None,
                  imagery="public.zoo", vectorize=False, overviews=(), progress=False)
    assert out.tiles >= 1
    chip = wkb.decode(bytes(conn.execute(
        "SELECT ST_AsBinary(image) FROM pggeolearn.chips WHERE dataset = 'zoo' AND tile_id = 5"
    ).fetchone()[0]))
    pred = wkb.decode(bytes(conn.execute("SELECT ST_AsBinary(rast) FROM public.zoo_pred").fetchone()[0]))
    assert pred.upper_left == pytest.approx(chip.upper_left, abs=1e-6 * size)  # one grid


def test_pixel_type_mismatch_names_both_sides(conn, db_dsn, zoo_scene, tmp_path):
    path16 = scene_variant(zoo_scene, tmp_path / "u16.tif", dtype="uint16", bands=3)
    _load(conn, zoo_scene, path16, "u16")
    train(db_dsn, "u16", "m16", **TINY)
    _load(conn, zoo_scene, zoo_scene.image_path, "u8")
    with pytest.raises(errors.ConfigError, match=r"8BUI,8BUI,8BUI bands; model m16 was trained "
                                                 r"on 16BUI,16BUI,16BUI imagery"):
        evaluate(db_dsn, "m16", dataset="u8", split="val", progress=False, n_worst=0)
    with pytest.raises(errors.ConfigError, match="model m16 was trained on 16BUI"):
        predict(db_dsn, "m16", out="public.p8", imagery="public.u8", extent=zoo_scene.bounds,
                vectorize=False, overviews=(), progress=False)
    assert np.isfinite(registry.get(conn, "m16").normalization["mean"]).all()
