"""Unit tests for the seeded synthetic scene generator (no database)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import rasterio
import shapely
from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.warp import transform_geom
from shapely.geometry import box, shape

from pggeolearn.synthetic import (
    ROAD_WIDTHS_M,
    Scene,
    _make_scene,
    lonlat_to_mercator,
    make_scene,
    mercator_to_lonlat,
    scene_label_reference,
    utm_epsg,
)

HIGHWAYS = {"primary", "secondary", "residential", "service", "track"}
BUILDING_KINDS = {"yes", "residential", "school"}


def _features(path) -> list[dict]:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["type"] == "FeatureCollection"
    return data["features"]


def _reference(scene: Scene, **kw) -> np.ndarray:
    return scene_label_reference(
        scene, width=scene.width, height=scene.height, transform=scene.transform, **kw
    )


def _read_image(scene: Scene) -> np.ndarray:
    with rasterio.open(scene.image_path) as ds:
        return ds.read()


@pytest.fixture(scope="module")
def scene_and_painted(tmp_path_factory) -> tuple[Scene, np.ndarray]:
    return _make_scene(tmp_path_factory.mktemp("scene"), size_px=1024, seed=0)


@pytest.fixture(scope="module")
def scene(scene_and_painted) -> Scene:
    return scene_and_painted[0]


@pytest.fixture(scope="module")
def reference(scene) -> np.ndarray:
    return _reference(scene)


def _utm_crs(scene: Scene) -> CRS:
    lon, lat = mercator_to_lonlat(
        (scene.bounds[0] + scene.bounds[2]) / 2, (scene.bounds[1] + scene.bounds[3]) / 2
    )
    return CRS.from_epsg(utm_epsg(float(lon), float(lat)))


def _to_crs(features: list[dict], crs) -> list:
    geoms = transform_geom("OGC:CRS84", crs, [f["geometry"] for f in features])
    return [shape(g) for g in geoms]


# --------------------------------------------------------------------------------------------
# grid and image


def test_scene_grid_and_geotiff_profile(tmp_path):
    lon0, lat0, pixel_m = 85.52, 27.63, 0.5
    sc = make_scene(tmp_path, size_px=300, seed=1, center_lonlat=(lon0, lat0), pixel_m=pixel_m)
    assert sc.srid == 3857
    assert sc.road_widths_m == ROAD_WIDTHS_M
    assert sc.road_widths_m["primary"] == 10 and sc.road_widths_m["track"] == 3
    assert sc.resolution == pytest.approx(pixel_m / math.cos(math.radians(lat0)))
    assert sc.image_path.name.endswith(".tif")
    assert sc.width == sc.height == 300

    # centred on center_lonlat
    cx, cy = lonlat_to_mercator(lon0, lat0)
    assert (sc.bounds[0] + sc.bounds[2]) / 2 == pytest.approx(float(cx), abs=1e-6)
    assert (sc.bounds[1] + sc.bounds[3]) / 2 == pytest.approx(float(cy), abs=1e-6)
    assert sc.bounds[2] - sc.bounds[0] == pytest.approx(300 * sc.resolution)
    assert sc.bounds[3] - sc.bounds[1] == pytest.approx(300 * sc.resolution)

    with rasterio.open(sc.image_path) as ds:
        assert (ds.count, ds.width, ds.height) == (3, 300, 300)
        assert ds.dtypes == ("uint8", "uint8", "uint8")
        assert ds.crs == CRS.from_epsg(3857)
        assert ds.nodata is None
        assert ds.transform.almost_equals(sc.transform)
        assert ds.transform.a == pytest.approx(sc.resolution)
        assert ds.transform.e == pytest.approx(-sc.resolution)
        assert ds.transform.b == ds.transform.d == 0  # north-up
        assert ds.bounds == pytest.approx(sc.bounds)
        assert ds.profile["tiled"] and ds.block_shapes[0] == (256, 256)
        assert ds.compression.name.lower() == "deflate"
        img = ds.read()
    assert img.std() > 10  # not a flat image
    assert not list(tmp_path.glob("*.aux.xml"))


def test_own_mercator_matches_proj():
    lon, lat = np.array([85.52, -47.9, 10.7]), np.array([27.63, -15.8, 59.9])
    x, y = lonlat_to_mercator(lon, lat)
    px, py = rasterio.warp.transform("OGC:CRS84", "EPSG:3857", lon.tolist(), lat.tolist())
    assert np.allclose(x, px, atol=1e-6) and np.allclose(y, py, atol=1e-6)
    lon2, lat2 = mercator_to_lonlat(x, y)
    assert np.allclose(lon2, lon) and np.allclose(lat2, lat)


def test_utm_epsg():
    assert utm_epsg(85.52, 27.63) == 32645
    assert utm_epsg(-47.9, -15.8) == 32723
    assert utm_epsg(-180.0, 10.0) == 32601
    assert utm_epsg(179.99, -1.0) == 32760


# --------------------------------------------------------------------------------------------
# determinism


def test_same_seed_gives_identical_bytes(tmp_path):
    a = make_scene(tmp_path / "a", size_px=512, seed=7)
    b = make_scene(tmp_path / "b", size_px=512, seed=7)
    c = make_scene(tmp_path / "c", size_px=512, seed=8)
    for attr in ("image_path", "roads_path", "buildings_path"):
        pa, pb, pc = (getattr(s, attr) for s in (a, b, c))
        assert pa.read_bytes() == pb.read_bytes(), attr
        assert pa.read_bytes() != pc.read_bytes(), attr
    assert a.bounds == b.bounds == c.bounds


# --------------------------------------------------------------------------------------------
# vectors


def test_vectors_are_valid_lonlat_with_osm_properties(scene):
    roads = _features(scene.roads_path)
    buildings = _features(scene.buildings_path)
    assert len(roads) >= 5
    assert len(buildings) >= 50

    lon0, lat0 = 85.52, 27.63
    ids = []
    for f in roads:
        geom = shape(f["geometry"])
        assert geom.geom_type == "LineString"
        assert geom.is_valid and not geom.is_empty and geom.length > 0
        props = f["properties"]
        assert props["highway"] in HIGHWAYS
        assert isinstance(props["osm_id"], int)
        assert props["name"] is None or isinstance(props["name"], str)
        ids.append(props["osm_id"])
    for f in buildings:
        geom = shape(f["geometry"])
        assert geom.geom_type == "Polygon"
        assert geom.is_valid and geom.area > 0
        assert geom.exterior.is_ccw  # RFC 7946 winding
        props = f["properties"]
        assert props["building"] in BUILDING_KINDS
        assert isinstance(props["osm_id"], int)
        assert isinstance(props["levels"], int) and 1 <= props["levels"] <= 6
        ids.append(props["osm_id"])
    assert len(set(ids)) == len(ids)

    coords = np.concatenate(
        [np.asarray(shape(f["geometry"]).exterior.coords if f["geometry"]["type"] == "Polygon"
                    else shape(f["geometry"]).coords) for f in roads + buildings]
    )
    assert np.all(np.abs(coords[:, 0]) <= 180) and np.all(np.abs(coords[:, 1]) <= 90)
    # lon/lat order, near the centre (a 512 m scene is a few thousandths of a degree wide)
    assert np.all(np.abs(coords[:, 0] - lon0) < 0.02)
    assert np.all(np.abs(coords[:, 1] - lat0) < 0.02)

    classes = {f["properties"]["highway"] for f in roads}
    assert "primary" in classes and len(classes) >= 3


def test_building_sizes_and_types(scene):
    utm = _utm_crs(scene)
    buildings = _features(scene.buildings_path)
    geoms = _to_crs(buildings, utm)
    for g in geoms:
        rect = g.minimum_rotated_rectangle
        xy = np.asarray(rect.exterior.coords)
        sides = np.hypot(*np.diff(xy[:3], axis=0).T)
        assert sides.min() > 5.9 and sides.max() < 25.1
        # rectangles (EPSG:3857 is not conformal on the ellipsoid: up to ~0.5 % shear in UTM)
        assert g.area == pytest.approx(rect.area, rel=1e-2)
    angles = {round(math.degrees(math.atan2(*np.diff(np.asarray(g.exterior.coords)[:2],
                                                        axis=0)[0][::-1])) % 90) for g in geoms}
    assert len(angles) > 10  # many orientations, not all axis-aligned


def test_buildings_clear_of_roads_and_each_other(scene):
    utm = _utm_crs(scene)
    roads = _features(scene.roads_path)
    buildings = _to_crs(_features(scene.buildings_path), utm)
    road_buffers = [
        g.buffer(scene.road_widths_m[f["properties"]["highway"]] / 2)
        for g, f in zip(_to_crs(roads, utm), roads, strict=True)
    ]
    hits = shapely.STRtree(road_buffers).query(buildings, predicate="intersects")
    assert hits.shape[1] == 0
    pairs = shapely.STRtree(buildings).query(buildings, predicate="intersects")
    assert np.all(pairs[0] == pairs[1])


def test_roads_cross_and_features_cross_scene_edges(scene):
    frame = box(*scene.bounds).exterior
    roads = _features(scene.roads_path)
    road_geoms = _to_crs(roads, "EPSG:3857")
    building_geoms = _to_crs(_features(scene.buildings_path), "EPSG:3857")
    assert sum(g.intersects(frame) for g in road_geoms) >= 2
    assert sum(g.intersects(frame) for g in building_geoms) >= 2
    # main roads run edge to edge and some of them cross each other
    main = [g for g, f in zip(road_geoms, roads, strict=True)
            if f["properties"]["highway"] in ("primary", "secondary")]
    assert any(a.crosses(b) for i, a in enumerate(main) for b in main[i + 1:])
    scene_box = box(*scene.bounds)
    assert any(g.intersection(scene_box).length > 0.95 * (scene.bounds[2] - scene.bounds[0])
               for g in main)


# --------------------------------------------------------------------------------------------
# reference labels and image content


def test_reference_label_classes_and_fractions(scene, reference):
    assert reference.dtype == np.uint8
    assert reference.shape == (scene.height, scene.width)
    assert set(np.unique(reference).tolist()) == {0, 1, 2}
    roads, buildings = (float((reference == k).mean()) for k in (1, 2))
    assert 0.03 <= roads <= 0.20
    assert 0.03 <= buildings <= 0.25
    touched = _reference(scene, all_touched=True)
    assert (touched > 0).sum() > (reference > 0).sum()


def test_painted_labels_match_reference(scene_and_painted, reference):
    # the painted road width is the buffer width: painted mask == UTM-buffered reference
    _, painted = scene_and_painted
    for k in (1, 2):
        a, b = painted == k, reference == k
        assert (a & b).sum() / (a | b).sum() > 0.98


@pytest.mark.parametrize(
    ("center", "pixel_m"), [((10.7, 59.9), 0.3), ((-47.9, -15.8), 1.0)]
)
def test_painted_width_is_ground_metres_at_any_latitude(tmp_path, center, pixel_m):
    sc, painted = _make_scene(tmp_path, size_px=512, seed=3, center_lonlat=center,
                              pixel_m=pixel_m)
    assert sc.resolution == pytest.approx(pixel_m / math.cos(math.radians(center[1])))
    ref = _reference(sc)
    for k in (1, 2):
        a, b = painted == k, ref == k
        assert a.any() and (a & b).sum() / (a | b).sum() > 0.98


def test_image_contains_the_labels(scene, reference):
    img = _read_image(scene).astype(np.float64)
    rgb = img.reshape(3, -1)
    lab = reference.ravel()
    mean = {k: rgb[:, lab == k].mean(axis=1) for k in (0, 1, 2)}
    chroma = img.max(axis=0) - img.min(axis=0)
    # roads: grey asphalt/gravel vs green-brown vegetation
    assert np.linalg.norm(mean[1] - mean[0]) > 20
    assert chroma.ravel()[lab == 1].mean() < chroma.ravel()[lab == 0].mean() - 15
    # buildings: bright/coloured roofs
    assert np.linalg.norm(mean[2] - mean[0]) > 20
    assert np.linalg.norm(mean[2] - mean[1]) > 10
    # vegetation is greener than everything else
    assert mean[0][1] > mean[0][2] + 20


def test_reference_on_another_grid_and_crs(scene, reference):
    # a coarser EPSG:3857 grid over the same area
    t2 = scene.transform @ Affine.scale(2)
    coarse = scene_label_reference(scene, width=scene.width // 2, height=scene.height // 2,
                                   transform=t2)
    for k in (1, 2):
        assert (coarse == k).mean() == pytest.approx((reference == k).mean(), abs=0.01)
    # a UTM grid
    utm = _utm_crs(scene)
    (x0, x1), (y0, y1) = rasterio.warp.transform(
        "EPSG:3857", utm, [scene.bounds[0], scene.bounds[2]], [scene.bounds[1], scene.bounds[3]]
    )
    res = 1.0
    w, h = int((x1 - x0) / res), int((y1 - y0) / res)
    lab = scene_label_reference(scene, width=w, height=h, crs=utm.to_epsg(),
                                transform=Affine(res, 0, x0, 0, -res, y1))
    for k in (1, 2):
        assert (lab == k).mean() == pytest.approx((reference == k).mean(), abs=0.02)


def test_counts_and_empty_scene(tmp_path):
    sc, painted = _make_scene(tmp_path / "few", size_px=400, seed=2, n_roads=3, n_buildings=12)
    assert len(_features(sc.roads_path)) <= 3
    assert 1 <= len(_features(sc.buildings_path)) <= 12
    empty, painted = _make_scene(tmp_path / "empty", size_px=64, seed=2, n_roads=0,
                                 n_buildings=0)
    assert _features(empty.roads_path) == [] and _features(empty.buildings_path) == []
    assert not painted.any() and not _reference(empty).any()


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError):
        make_scene(tmp_path, size_px=8)
    with pytest.raises(ValueError):
        make_scene(tmp_path, pixel_m=0)
    with pytest.raises(ValueError):
        make_scene(tmp_path, center_lonlat=(10.0, 89.0))
    with pytest.raises(ValueError):
        make_scene(tmp_path, size_px=1024, center_lonlat=(179.999, 0.0))


def test_large_scene_smoke(tmp_path):
    sc = make_scene(tmp_path, size_px=2048, seed=11)
    assert sc.width == sc.height == 2048
    ref = _reference(sc)
    assert 0.03 <= (ref == 1).mean() <= 0.20
    assert 0.03 <= (ref == 2).mean() <= 0.25
    with rasterio.open(sc.image_path) as ds:
        assert (ds.width, ds.height, ds.count) == (2048, 2048, 3)


def test_write_osm_is_valid_osm_xml(tmp_path):
    import xml.etree.ElementTree as ET

    from pggeolearn.synthetic import make_scene, write_osm

    scene = make_scene(tmp_path, size_px=256, seed=2)
    root = ET.parse(write_osm(scene, tmp_path / "scene.osm")).getroot()
    nodes = {n.get("id") for n in root.iter("node")}
    ways = list(root.iter("way"))
    roads = [w for w in ways if any(t.get("k") == "highway" for t in w.iter("tag"))]
    buildings = [w for w in ways if any(t.get("k") == "building" for t in w.iter("tag"))]
    assert roads and buildings and len(roads) + len(buildings) == len(ways)
    assert all(nd.get("ref") in nodes for w in ways for nd in w.iter("nd"))
    assert all(w.findall("nd")[0].get("ref") == w.findall("nd")[-1].get("ref") for w in buildings)
