"""image_tile / label_tile / burn: exact grids, agreement with an independent rasterizer, traps.

The reference is pggeolearn.synthetic.scene_label_reference: shapely buffers in the local UTM
zone + rasterio.features.rasterize with the same all-touched rule.
"""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from conftest import IMAGE_SQL, ROAD_BUFFER_SQL

from pggeolearn import datasets, errors, wkb
from pggeolearn.synthetic import scene_label_reference


def fetch_tiles(conn, name: str, fn: str) -> dict[int, wkb.RasterTile]:
    rows = conn.execute(
        f"SELECT tile_id, ST_AsBinary(pggeolearn.{fn}(%s, tile_id)) "
        "FROM pggeolearn.tile_grid(%s) ORDER BY tile_id", [name, name]).fetchall()
    return {tid: wkb.decode(bytes(b)) for tid, b in rows}


def stitch(tiles: dict[int, wkb.RasterTile], ds: datasets.Dataset) -> np.ndarray:
    px = ds.recipe.tile_px
    first = next(iter(tiles.values()))
    out = np.zeros((first.bands, ds.nrows * px, ds.ncols * px), first.data.dtype)
    for tid, t in tiles.items():
        r, c = divmod(tid, ds.ncols)
        out[:, r * px:(r + 1) * px, c * px:(c + 1) * px] = t.data
    return out


@pytest.fixture
def scene_ds(scene_conn, scene_recipe):
    return datasets.create(scene_conn, scene_recipe)


def test_every_tile_is_exactly_on_the_grid(scene_conn, scene_ds, scene):
    res = scene.resolution
    minx, miny, maxx, maxy = scene.bounds
    for fn in ("image_tile", "label_tile"):
        tiles = fetch_tiles(scene_conn, "scene", fn)
        assert len(tiles) == scene_ds.n_tiles == 16
        for tid, t in tiles.items():
            r, c = divmod(tid, scene_ds.ncols)
            assert (t.height, t.width) == (256, 256), fn
            assert t.srid == 3857
            ulx, sx, kx, uly, ky, sy = t.geotransform
            assert (kx, ky) == (0, 0)
            assert sx == pytest.approx(res, rel=1e-12) and sy == pytest.approx(-res, rel=1e-12)
            assert ulx == pytest.approx(minx + c * 256 * res, abs=res * 1e-6)
            assert uly == pytest.approx(maxy - r * 256 * res, abs=res * 1e-6)


def test_label_tile_is_8bui_without_nodata(scene_conn, scene_ds):
    t = fetch_tiles(scene_conn, "scene", "label_tile")[5]
    assert t.pixel_types == ("8BUI",) and t.nodata == (None,)
    assert set(np.unique(t.data)) <= {0, 1, 2}


@pytest.mark.parametrize("all_touched", [False, True])
def test_labels_agree_with_independent_rasterizer(scene_conn, scene_recipe, scene, all_touched):
    scene_recipe.all_touched = all_touched
    ds = datasets.create(scene_conn, scene_recipe)
    ours = stitch(fetch_tiles(scene_conn, "scene", "label_tile"), ds)[0]
    ref = scene_label_reference(scene, width=ours.shape[1], height=ours.shape[0],
                                transform=scene.transform, all_touched=all_touched)
    agreement = (ours == ref).mean()
    assert agreement >= 0.999, agreement
    assert {0, 1, 2} <= set(np.unique(ours))  # roads and buildings both burned


def test_all_touched_widens_thin_shapes(scene_conn, scene_recipe):
    counts = {}
    for touched in (False, True):
        scene_recipe.all_touched = touched
        datasets.create(scene_conn, scene_recipe, overwrite=True)
        counts[touched] = sum((t.data > 0).sum() for t in
                              fetch_tiles(scene_conn, "scene", "label_tile").values())
    assert counts[True] > counts[False] * 1.02


def test_image_tiles_reproduce_source_pixels(scene_conn, scene_ds, scene):
    ours = stitch(fetch_tiles(scene_conn, "scene", "image_tile"), scene_ds)
    with rasterio.open(scene.image_path) as src:
        truth = src.read()
    assert ours.shape == truth.shape
    assert np.array_equal(ours, truth)


def test_sources_larger_than_tiles_are_cut_exactly(scene_conn, scene_recipe, scene):
    from pggeolearn.importers import import_raster

    import_raster(scene_conn, [scene.image_path], "public.imagery512", tile_size=512, progress=False)
    scene_recipe.image_sql = "SELECT rast FROM public.imagery512 WHERE ST_Intersects(rast, tile_geom)"
    ds = datasets.create(scene_conn, scene_recipe)
    ours = stitch(fetch_tiles(scene_conn, "scene", "image_tile"), ds)
    with rasterio.open(scene.image_path) as src:
        assert np.array_equal(ours, src.read())


def test_misaligned_grid_is_resampled_onto_the_exact_tile(scene_conn, scene_recipe, scene):
    # shift the grid by 40 % of a pixel: every tile mosaics 4 resampled pieces
    minx, miny, maxx, maxy = scene.bounds
    shift = 0.4 * scene.resolution
    scene_recipe.extent = (minx + shift, miny, maxx, maxy - shift)
    ds = datasets.create(scene_conn, scene_recipe)
    tiles = fetch_tiles(scene_conn, "scene", "image_tile")
    with rasterio.open(scene.image_path) as src:
        truth = src.read()
    t = tiles[ds.ncols + 1]  # an interior tile, fully covered
    assert (t.height, t.width) == (256, 256)
    assert t.geotransform[0] == pytest.approx(minx + shift + 256 * scene.resolution)
    # nearest neighbour with a sub-pixel shift: the same pixels as the source, offset by <= 1 px
    r0, c0 = 256, 256
    expected = truth[:, r0:r0 + 256, c0:c0 + 256]
    assert (t.data == expected).mean() > 0.95 or (
        t.data[:, :-1, :-1] == truth[:, r0 + 1:r0 + 256, c0:c0 + 255]).mean() > 0.95


def test_tile_outside_imagery_is_all_nodata(scene_conn, scene_recipe, scene):
    minx, miny, maxx, maxy = scene.bounds
    width = maxx - minx
    scene_recipe.extent = (minx, miny, maxx + width, maxy)  # east half has no imagery
    ds = datasets.create(scene_conn, scene_recipe)
    tiles = fetch_tiles(scene_conn, "scene", "image_tile")
    outside = tiles[ds.ncols - 1]  # top-right tile: beyond the imagery
    assert (outside.height, outside.width, outside.bands) == (256, 256, 3)
    nodata = outside.nodata[0] if outside.nodata[0] is not None else 0
    assert np.all(outside.data == nodata)
    label = fetch_tiles(scene_conn, "scene", "label_tile")[ds.ncols - 1]
    assert label.data.shape == (1, 256, 256)  # a label tile still exists (all zeros or roads)


def test_tile_without_labels_is_all_zero_not_null(scene_conn, scene_recipe, scene):
    minx, miny, maxx, maxy = scene.bounds
    size = 256 * scene.resolution
    scene_recipe.label_sql = (  # only the buildings inside tile 0
        "SELECT way AS geom, 2 AS class_id FROM public.planet_osm_polygon WHERE way && tile_geom "
        f"AND ST_Within(way, ST_MakeEnvelope({minx}, {maxy - size}, {minx + size}, {maxy}, 3857))")
    datasets.create(scene_conn, scene_recipe, sample_tile=0)
    tiles = fetch_tiles(scene_conn, "scene", "label_tile")
    assert len(tiles) == 16
    assert all(np.all(t.data == 0) for tid, t in tiles.items() if tid != 0)
    assert all(t.data.shape == (1, 256, 256) for t in tiles.values())


@pytest.fixture
def line_conn(scene_conn):
    scene_conn.execute("CREATE TABLE public.cases (name text, geom geometry(LineString, 3857))")
    return scene_conn


def _burn_case(conn, recipe, scene, name: str, wkt_fn, buffer_m: float = 3.0):
    minx, miny, maxx, maxy = scene.bounds
    res = scene.resolution
    tile = (minx, maxy - 256 * res, minx + 256 * res, maxy)  # tile 0
    conn.execute("DELETE FROM public.cases")
    conn.execute("INSERT INTO public.cases VALUES (%s, ST_GeomFromText(%s, 3857))",
                 [name, wkt_fn(*tile, res)])
    recipe.label_sql = f"SELECT geom, 1 AS class_id, {float(buffer_m)}::float8 AS buffer_m FROM public.cases"
    datasets.create(conn, recipe, overwrite=True, sample_tile=0)
    t = fetch_tiles(conn, "scene", "label_tile")[0]
    return t


@pytest.mark.parametrize("case,wkt_fn,expect", [
    ("crossing", lambda x0, y0, x1, y1, r: f"LINESTRING({x0 - 50} {(y0 + y1) / 2}, {x1 + 50} {(y0 + y1) / 2})", "some"),
    # outside the tile, its 3 m buffer (3 / cos(27.63 deg) = 3.387 units) reaches ~1.2 px in
    ("touching", lambda x0, y0, x1, y1, r:
        f"LINESTRING({x1 + 3.387 - 1.2 * r} {y0 - 10}, {x1 + 3.387 - 1.2 * r} {y1 + 10})", "edge"),
    ("missing", lambda x0, y0, x1, y1, r: f"LINESTRING({x1 + 30} {y0}, {x1 + 30} {y1})", "none"),
])
def test_roads_crossing_touching_missing(line_conn, scene_recipe, scene, case, wkt_fn, expect):
    from rasterio.features import rasterize
    from rasterio.warp import transform_geom
    from shapely import from_wkt
    from shapely.geometry import mapping, shape

    from pggeolearn.synthetic import utm_epsg

    t = _burn_case(line_conn, scene_recipe, scene, case, wkt_fn)
    assert t.data.shape == (1, 256, 256)
    # reference: buffer 3 ground metres in UTM, rasterize on the tile's grid
    wkt = line_conn.execute("SELECT ST_AsText(geom) FROM public.cases").fetchone()[0]
    cx, cy = (scene.bounds[0] + scene.bounds[2]) / 2, (scene.bounds[1] + scene.bounds[3]) / 2
    lon, lat = rasterio.warp.transform("EPSG:3857", "EPSG:4326", [cx], [cy])
    utm = f"EPSG:{utm_epsg(lon[0], lat[0])}"
    g = shape(transform_geom("EPSG:3857", utm, mapping(from_wkt(wkt))))
    g = shape(transform_geom(utm, "EPSG:3857", mapping(g.buffer(3.0, quad_segs=16))))
    tr = Affine(*[t.geotransform[i] for i in (1, 2, 0, 4, 5, 3)])
    ref = rasterize([(g, 1)], out_shape=(256, 256), transform=tr, fill=0, dtype="uint8")
    assert (t.data[0] == ref).mean() >= 0.999
    burned = int((t.data > 0).sum())
    if expect == "none":
        assert burned == 0
    elif expect == "edge":
        assert 0 < burned < 256 * 4  # a sliver along the east edge only
        assert t.data[0, :, :-3].sum() == 0
    else:
        assert burned > 256 * 10


def test_buffer_is_in_ground_metres(line_conn, scene_recipe, scene):
    # a horizontal road buffered by 5 m at latitude ~27.6: 10 ground metres wide, i.e.
    # 10 / cos(lat) EPSG:3857 units — not 10 "Mercator metres"
    t = _burn_case(line_conn, scene_recipe, scene, "crossing",
                   lambda x0, y0, x1, y1, r: f"LINESTRING({x0 - 50} {(y0 + y1) / 2}, {x1 + 50} {(y0 + y1) / 2})",
                   buffer_m=5.0)
    rows = int((t.data[0, :, 128] > 0).sum())
    lat = np.radians(27.6)
    expected_px = 10.0 / np.cos(lat) / scene.resolution
    assert abs(rows - expected_px) <= 1.5, (rows, expected_px)


def test_higher_class_wins_and_classes_merge(scene_conn, scene_recipe):
    ref = "pggeolearn.tile_ref('scene', 0)"
    datasets.create(scene_conn, scene_recipe)
    b = scene_conn.execute(f"""
        SELECT ST_AsBinary(pggeolearn.burn({ref},
            ARRAY[ST_Buffer(ST_Centroid(ST_Envelope({ref})), 10),
                  ST_Buffer(ST_Centroid(ST_Envelope({ref})), 5),
                  ST_Translate(ST_Buffer(ST_Centroid(ST_Envelope({ref})), 3), 25, 0)],
            ARRAY[3, 7, 200]))""").fetchone()[0]
    t = wkb.decode(bytes(b))
    assert t.nodata == (None,)
    values = set(np.unique(t.data))
    assert values == {0, 3, 7, 200}
    assert t.data[0, 128, 128] == 7  # the inner circle (higher class) wins over class 3


def test_burn_rejects_bad_input(scene_conn):
    flipped = "ST_MakeEmptyRaster(16, 16, 0, 0, 1, 1, 0, 0, 3857)"  # scaleY > 0 (trap 8)
    with pytest.raises(Exception, match="north-up"):
        scene_conn.execute(f"SELECT pggeolearn.burn({flipped}, ARRAY[ST_MakeEnvelope(1,1,5,5,3857)], ARRAY[1])")
    ok = "ST_MakeEmptyRaster(16, 16, 0, 16, 1, -1, 0, 0, 3857)"
    with pytest.raises(Exception, match="outside 1..255"):
        scene_conn.execute(f"SELECT pggeolearn.burn({ok}, ARRAY[ST_MakeEnvelope(1,1,5,5,3857)], ARRAY[256])")
    empty = scene_conn.execute(
        f"SELECT ST_AsBinary(pggeolearn.burn({ok}, '{{}}'::geometry[], '{{}}'::int[]))").fetchone()[0]
    t = wkb.decode(bytes(empty))  # trap 9: no geometry still gives an all-background tile
    assert t.data.shape == (1, 16, 16) and not t.data.any()


# -- bad recipes: one clear line, nothing written ------------------------------------------

def _count(conn):
    return conn.execute("SELECT count(*) FROM pggeolearn.datasets").fetchone()[0]


@pytest.mark.parametrize("label_sql,match", [
    ("SELECT way AS geom, 1 AS class_id FROM public.nope", "label SQL fails.*nope"),
    ("SELEC way", "label SQL fails.*syntax"),
    ("SELECT way AS geom, 1 AS class_id FROM public.planet_osm_line WHERE false",
     "no geometry anywhere"),
    ("SELECT way AS geom, 'road' AS class_id FROM public.planet_osm_line", "integer column class_id"),
    ("SELECT way AS geom, 1.5 AS class_id FROM public.planet_osm_line", "integer column class_id"),
    ("SELECT way AS the_geom, 1 AS class_id FROM public.planet_osm_line", "geometry column named geom"),
    ("SELECT way AS geom, 300 AS class_id FROM public.planet_osm_line WHERE way && tile_geom",
     "outside 1..255"),
    ("SELECT ST_SetSRID(way, 0) AS geom, 1 AS class_id FROM public.planet_osm_line", "SRID 0"),
    ("SELECT way AS geom, 1 AS class_id FROM public.planet_osm_line; DROP TABLE public.imagery",
     "label SQL fails"),
    ("WITH d AS (DELETE FROM public.planet_osm_line RETURNING way) SELECT way AS geom, 1 AS class_id FROM d",
     "label SQL fails"),
])
def test_bad_label_sql_is_one_line_and_writes_nothing(scene_conn, scene_recipe, label_sql, match):
    scene_recipe.label_sql = label_sql
    with pytest.raises(errors.ConfigError, match=match) as info:
        datasets.create(scene_conn, scene_recipe)
    assert "\n" not in str(info.value)
    assert _count(scene_conn) == 0
    assert scene_conn.execute("SELECT count(*) FROM public.planet_osm_line").fetchone()[0] > 0
    assert scene_conn.execute("SELECT to_regclass('public.imagery')").fetchone()[0] is not None


def test_volatile_function_cannot_write(scene_conn, scene_recipe):
    scene_conn.execute("CREATE TABLE public.loot (x int)")
    scene_conn.execute("""CREATE FUNCTION public.evil() RETURNS int LANGUAGE plpgsql VOLATILE AS
        $$ BEGIN INSERT INTO public.loot VALUES (1); RETURN 1; END $$""")
    scene_recipe.label_sql = ("SELECT way AS geom, public.evil() AS class_id "
                              "FROM public.planet_osm_line WHERE way && tile_geom")
    with pytest.raises(errors.RecipeError, match="read-only"):
        datasets.create(scene_conn, scene_recipe)
    assert scene_conn.execute("SELECT count(*) FROM public.loot").fetchone()[0] == 0
    assert _count(scene_conn) == 0


def test_bad_image_sql_and_extent(scene_conn, scene_recipe, scene):
    scene_recipe.image_sql = "SELECT way AS rast FROM public.planet_osm_line"
    with pytest.raises(errors.RecipeError, match="raster column named rast"):
        datasets.create(scene_conn, scene_recipe)
    scene_recipe.image_sql = IMAGE_SQL
    minx, miny, maxx, maxy = scene.bounds
    scene_recipe.extent = (minx + 10_000, miny, maxx + 10_000, maxy)  # no imagery there
    with pytest.raises(errors.RecipeError, match="no raster anywhere"):
        datasets.create(scene_conn, scene_recipe)
    assert _count(scene_conn) == 0


def test_srid_mismatch_is_reprojected_and_said(scene_conn, scene_recipe):
    scene_conn.execute("CREATE TABLE public.roads4326 AS SELECT highway, ST_Transform(way, 4326) AS geom "
                       "FROM public.planet_osm_line")
    scene_recipe.label_sql = ("SELECT geom, 1 AS class_id FROM public.roads4326 "
                              "WHERE geom && ST_Transform(tile_geom, 4326)")
    ds = datasets.create(scene_conn, scene_recipe)
    assert any("EPSG:4326" in n and "reprojected" in n for n in ds.notes)
    t = fetch_tiles(scene_conn, "scene", "label_tile")
    assert sum(int((x.data > 0).sum()) for x in t.values()) > 0


def test_unknown_dataset_and_srid(scene_conn, scene_recipe):
    with pytest.raises(errors.DatasetNotFound, match="unknown dataset 'nope'"):
        datasets.get(scene_conn, "nope")
    with pytest.raises(Exception, match="unknown dataset"):
        scene_conn.execute("SELECT pggeolearn.label_tile('nope', 0)")
    scene_recipe.srid = 999999
    with pytest.raises(errors.SridMismatch, match="unknown SRID"):
        datasets.create(scene_conn, scene_recipe)


def test_recipe_hash_and_overwrite(scene_conn, scene_recipe):
    a = datasets.create(scene_conn, scene_recipe)
    with pytest.raises(errors.AlreadyExists, match="--overwrite"):
        datasets.create(scene_conn, scene_recipe)
    scene_recipe.all_touched = True
    b = datasets.create(scene_conn, scene_recipe, overwrite=True)
    assert a.recipe_hash != b.recipe_hash
    assert [d.name for d in datasets.list_all(scene_conn)] == ["scene"]
    datasets.drop(scene_conn, "scene")
    assert datasets.list_all(scene_conn) == []


def test_recipe_from_toml(tmp_path, scene_conn, scene):
    path = tmp_path / "roads.toml"
    minx, miny, maxx, maxy = scene.bounds
    path.write_text(f'''
name = "roads"
srid = 3857
resolution = {scene.resolution!r}
tile_px = 128
overlap_px = 16
extent_from = "public.imagery"
image_sql = "{IMAGE_SQL}"
label_sql = """{ROAD_BUFFER_SQL}"""
all_touched = true
[classes]
1 = "road"
2 = "building"
''')
    ds = datasets.create(scene_conn, datasets.Recipe.from_toml(path))
    assert ds.recipe.tile_px == 128 and ds.recipe.all_touched
    assert ds.recipe.extent == pytest.approx(scene.bounds)
    n = scene_conn.execute("SELECT count(*) FROM pggeolearn.tile_grid('roads')").fetchone()[0]
    assert n == ds.n_tiles == ds.ncols * ds.nrows
    # overlapping tiles: neighbours share 16 px
    g = scene_conn.execute("SELECT ST_XMin(geom) FROM pggeolearn.tile_grid('roads') "
                           "WHERE tile_id IN (0, 1) ORDER BY tile_id").fetchall()
    assert g[1][0] - g[0][0] == pytest.approx(112 * scene.resolution)


# -- real data -----------------------------------------------------------------------------

@pytest.mark.banepa
def test_banepa_buildings_agree_with_rasterio(conn, banepa):
    import json

    from rasterio.features import rasterize
    from rasterio.warp import transform_geom
    from shapely.geometry import shape

    from pggeolearn.importers import import_raster, import_vector

    mosaic = banepa / "imagery" / "banepa_train_mosaic_epsg3857.tif"
    labels = banepa / "labels" / "osm_features_ac7e343eb1faacd2.geojson"
    import_raster(conn, [mosaic], "public.banepa", progress=False)
    import_vector(conn, labels, "public.buildings", progress=False)
    with rasterio.open(mosaic) as src:
        res, transform, shape_px = src.res[0], src.transform, (src.height, src.width)
        truth_img = src.read()
    recipe = datasets.Recipe(
        name="banepa", srid=3857, resolution=res, extent_from="public.banepa",
        image_sql="SELECT rast FROM public.banepa WHERE ST_Intersects(rast, tile_geom)",
        label_sql="SELECT geom, 1 AS class_id FROM public.buildings "
                  "WHERE geom && ST_Transform(tile_geom, 4326)",
        classes={1: "building"})
    ds = datasets.create(conn, recipe)
    assert (ds.ncols, ds.nrows) == (12, 16)
    ours = stitch(fetch_tiles(conn, "banepa", "label_tile"), ds)[0]
    feats = json.loads(labels.read_text())["features"]
    geoms = [shape(transform_geom("EPSG:4326", "EPSG:3857", f["geometry"])) for f in feats]
    ref = rasterize([(g, 1) for g in geoms], out_shape=shape_px, transform=transform,
                    fill=0, dtype="uint8")
    agreement = float((ours == ref).mean())
    print(f"Banepa building label agreement: {agreement:.5f}")
    assert agreement >= 0.999
    img = stitch(fetch_tiles(conn, "banepa", "image_tile"), ds)
    assert np.array_equal(img, truth_img)
