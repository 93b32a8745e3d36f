"""Seamless image tiles: a chip is a warp of the WHOLE source onto the tile's grid.

Each case imports a variant of a synthetic scene (lon/lat, UTM, a grid shifted by a fraction
of a pixel; import tiles of 256 and 100 px) and builds a dataset on a grid that is aligned
with none of them. Every image tile must equal ``rasterio.warp.reproject`` of the whole
source file onto that tile (nearest) on >= 99.9 % of its pixels, and have no NODATA pixel
inside the source's footprint: warping each source tile apart leaves seams where they meet.
"""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import Resampling, reproject, transform_bounds

from pggeolearn import datasets, errors, wkb
from pggeolearn.importers import import_raster
from pggeolearn.synthetic import make_scene, scene_variant, utm_epsg

UTM = utm_epsg(85.52, 27.63)
LABEL_SQL = "SELECT ST_Buffer(ST_Centroid(tile_geom), 2) AS geom, 1 AS class_id"


@pytest.fixture(scope="module")
def small_scene(tmp_path_factory):
    return make_scene(tmp_path_factory.mktemp("warp"), size_px=384, seed=11)


def _dataset(conn, path, *, import_px: int, grid_srid: int, res: float, tile_px: int = 128,
             resampling: str = "nearest") -> datasets.Dataset:
    import_raster(conn, [path], "public.src", tile_size=import_px, progress=False)
    with rasterio.open(path) as s:
        minx, miny, maxx, maxy = transform_bounds(s.crs, CRS.from_epsg(grid_srid), *s.bounds)
    # a grid origin a third of a pixel off anything the source is aligned with
    extent = (minx + res / 3, miny + res / 3, maxx, maxy)
    src_srid = int(CRS.from_user_input(rasterio.open(path).crs).to_epsg())
    where = ("ST_Intersects(rast, tile_geom)" if src_srid == grid_srid
             else f"ST_Intersects(rast, ST_Transform(tile_geom, {src_srid}))")
    return datasets.create(conn, datasets.Recipe(
        name="warp", srid=grid_srid, resolution=res, extent=extent, tile_px=tile_px,
        image_sql=f"SELECT rast FROM public.src WHERE {where}", label_sql=LABEL_SQL,
        classes={1: "thing"}, resampling=resampling))


def _erode(mask: np.ndarray, px: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(px):
        out[1:] &= out[:-1].copy()
        out[:-1] &= out[1:].copy()
        out[:, 1:] &= out[:, :-1].copy()
        out[:, :-1] &= out[:, 1:].copy()
    return out


def _compare(conn, ds, path, method=Resampling.nearest, edge_px=0):
    """(share of identical pixels, NODATA pixels inside the footprint (less ``edge_px`` along
    its edges, where an interpolating kernel reaches outside the source), share of the pixels
    inside it within 1 of the whole-source warp)."""
    rows = conn.execute("SELECT tile_id, ST_AsBinary(pggeolearn.image_tile(%s, tile_id)) "
                        "FROM pggeolearn.tile_grid(%s) ORDER BY tile_id", [ds.name, ds.name])
    same = total = holes = close = n_inside = 0
    with rasterio.open(path) as src:
        # the footprint: pixels of the source holding imagery (the lon/lat file's corners
        # outside the scene are 0)
        ones = np.any(src.read() != (src.nodata or 0), axis=0).astype(np.uint8)
        for _, blob in rows:
            t = wkb.decode(bytes(blob))
            ulx, sx, _, uly, _, sy = t.geotransform
            dst = {"dst_transform": Affine(sx, 0, ulx, 0, sy, uly), "dst_crs": CRS.from_epsg(ds.recipe.srid)}
            truth = np.zeros(t.data.shape, t.data.dtype)
            for b in range(t.bands):
                reproject(rasterio.band(src, b + 1), truth[b], resampling=method, **dst)
            inside = np.zeros(t.data.shape[1:], np.uint8)
            reproject(ones, inside, src_transform=src.transform, src_crs=src.crs,
                      resampling=Resampling.nearest, dst_nodata=0, **dst)
            same += int((t.data == truth).sum())
            total += t.data.size
            nodata = t.nodata[0] if t.nodata[0] is not None else 0
            inside = _erode(inside == 1, edge_px)
            holes += int((np.all(t.data == nodata, axis=0) & inside
                          & np.any(truth != nodata, axis=0)).sum())
            near = np.all(np.abs(t.data.astype(float) - truth) <= 1, axis=0)
            close += int((near & inside).sum())
            n_inside += int(inside.sum())
    return same / total, holes, close / n_inside


CASES = {  # name: (variant of the scene, import tile px, grid SRID, grid resolution)
    "lonlat-import256-utm": ({"crs": 4326}, 256, UTM, 0.5),
    "lonlat-import100-utm": ({"crs": 4326}, 100, UTM, 0.5),
    "utm-misaligned-import100-utm": ({"crs": UTM, "resolution": 0.6, "shift_px": (0.37, 0.61)},
                                     100, UTM, 0.5),
    "utm-import256-3857": ({"crs": UTM, "resolution": 0.5}, 256, 3857, 0.55),
    "3857-shifted-import100-3857": ({"crs": 3857, "resolution": 0.564, "shift_px": (0.4, 0.3)},
                                    100, 3857, 0.564),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tiles_equal_a_warp_of_the_whole_source(conn, small_scene, tmp_path, case):
    variant, import_px, srid, res = CASES[case]
    path = scene_variant(small_scene, tmp_path / "src.tif", **variant)
    ds = _dataset(conn, path, import_px=import_px, grid_srid=srid, res=res)
    assert ds.n_tiles >= 9
    same, holes, _ = _compare(conn, ds, path)
    assert same >= 0.999, f"{case}: only {same:.4%} of pixels equal the whole-source warp"
    assert holes == 0, f"{case}: {holes} NODATA pixels inside the source footprint"


def test_bilinear_is_a_recipe_option(conn, small_scene, tmp_path):
    path = scene_variant(small_scene, tmp_path / "src.tif", crs=4326)
    ds = _dataset(conn, path, import_px=100, grid_srid=UTM, res=0.5, resampling="bilinear")
    assert ds.recipe.resampling == "bilinear"
    _, holes, close = _compare(conn, ds, path, Resampling.bilinear, edge_px=2)
    assert holes == 0
    assert close >= 0.99, close  # rounding: two GDAL builds (PostGIS's, rasterio's) may differ by 1
    same_nearest, _, _ = _compare(conn, ds, path, Resampling.nearest)
    assert same_nearest < 0.9  # it really interpolates


def test_unknown_resampling_is_refused(small_scene):
    with pytest.raises(errors.ConfigError, match="unknown resampling 'lanczos'"):
        datasets.Recipe(name="x", srid=3857, resolution=1, image_sql="", label_sql="",
                        classes={1: "a"}, extent=(0, 0, 1, 1), resampling="lanczos").validate()



def test_cross_crs_recipe_error_lists_srids_and_the_fix(conn, small_scene, tmp_path):
    path = scene_variant(small_scene, tmp_path / "ll.tif", crs=4326)
    import_raster(conn, [path], "public.ll", progress=False)
    with rasterio.open(path) as s:
        minx, miny, maxx, maxy = transform_bounds(s.crs, CRS.from_epsg(UTM), *s.bounds)
    recipe = dict(name="x", srid=UTM, resolution=0.5, extent=(minx, miny, maxx, maxy), tile_px=128,
                  label_sql=LABEL_SQL, classes={1: "thing"})
    with pytest.raises(errors.RecipeError) as exc:  # the README's filter, on a lon/lat table
        datasets.create(conn, datasets.Recipe(
            image_sql="SELECT rast FROM public.ll WHERE ST_Intersects(rast, tile_geom)", **recipe))
    msg = str(exc.value)
    assert "public.ll.rast (EPSG:4326)" in msg and f"the grid is EPSG:{UTM}" in msg
    assert "ST_Transform(tile_geom, 4326)" in msg and "\n" not in msg
    # the fix it shows works, and so does the helper naming the table
    for where in ("ST_Intersects(rast, pggeolearn.tile_geom_in(tile_geom, 4326))",
                  "ST_Intersects(rast, pggeolearn.tile_geom_in(tile_geom, 'public.ll'))"):
        ds = datasets.create(conn, datasets.Recipe(
            image_sql=f"SELECT rast FROM public.ll WHERE {where}", **recipe), overwrite=True)
        t = wkb.decode(bytes(conn.execute("SELECT ST_AsBinary(pggeolearn.image_tile('x', %s))",
                                          [ds.n_tiles // 2]).fetchone()[0]))
        assert t.valid().mean() > 0.9
