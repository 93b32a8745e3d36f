"""import_vector against a real PostGIS: GeoJSON, GeoPackage, Shapefile, FlatGeobuf; types,
make_valid, SRIDs, layers, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyogrio.raw
import pytest
import shapely

from pggeolearn import errors
from pggeolearn.importers import import_vector
from pggeolearn.importers.vector import sanitize

X0, Y0 = 85.52, 27.63  # near Banepa, in lon/lat


def square(x: float, y: float, d: float = 1e-4) -> list:
    return [[[x, y], [x + d, y], [x + d, y + d], [x, y + d], [x, y]]]


def feature(geometry: dict | None, props: dict | None, **extra) -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": props, **extra}


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def polygons(tmp_path) -> Path:
    bowtie = [[[X0, Y0], [X0 + 1e-4, Y0 + 1e-4], [X0 + 1e-4, Y0], [X0, Y0 + 1e-4], [X0, Y0]]]
    feats = [
        feature({"type": "Polygon", "coordinates": square(X0, Y0)},
                {"name": "a", "levels": 2, "height": 3.5, "ok": True, "building:use": "house",
                 "id": 7, "geom": "x", "tags": {"k": "v"}, "mixed": 1}),
        feature({"type": "Polygon", "coordinates": bowtie},
                {"name": "bow", "levels": 3.5, "height": 4, "ok": False, "mixed": "x"}),
        feature({"type": "MultiPolygon",
                 "coordinates": [square(X0 + 1e-3, Y0), square(X0 + 2e-3, Y0)]},
                {"name": None, "levels": None, "Name": "dup", "mixed": True}),
    ]
    return write_json(tmp_path / "polygons.geojson", {"type": "FeatureCollection",
                                                      "features": feats})


def columns(conn, table: str) -> dict[str, str]:
    return dict(conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name = %s ORDER BY ordinal_position",
        [table]).fetchall())


def geometry_column(conn, table: str, column: str = "geom") -> tuple:
    return conn.execute(
        "SELECT type, srid, coord_dimension FROM geometry_columns "
        "WHERE f_table_name = %s AND f_geometry_column = %s", [table, column]).fetchone()


def test_polygons_typed_columns_and_make_valid(conn, polygons):
    report = import_vector(conn, polygons, "public.bld", progress=False)
    assert (report.features, report.made_valid, report.null_geometries) == (3, 1, 0)
    assert report.geometry_type == "MultiPolygon" and report.srid == 4326
    assert "made valid" in str(report)
    assert geometry_column(conn, "bld") == ("MULTIPOLYGON", 4326, 2)
    cols = columns(conn, "bld")
    assert cols == {
        "id": "bigint", "feature_id": "bigint", "name": "text", "levels": "double precision",
        "height": "double precision", "ok": "boolean", "building_use": "text",
        "id_1": "bigint", "geom_1": "text", "mixed": "text", "name_1": "text",
        "properties": "jsonb", "geom": "USER-DEFINED",
    }  # "tags" holds only objects: it lives in properties alone
    rows = conn.execute("SELECT id, name, levels, ok, id_1, mixed, properties, "
                        "ST_IsValid(geom), ST_NumGeometries(geom), feature_id FROM bld ORDER BY id"
                        ).fetchall()
    assert [r[0] for r in rows] == [1, 2, 3]
    assert rows[0][1:6] == ("a", 2.0, True, 7, "1")
    assert rows[0][6]["tags"] == {"k": "v"} and rows[0][6]["building:use"] == "house"
    assert rows[1][5] == "x" and rows[2][5] == "true" and rows[2][1] is None
    assert all(r[7] for r in rows)
    assert [r[8] for r in rows] == [1, 2, 2]  # the bowtie became two triangles
    assert rows[2][6] == {"name": None, "levels": None, "Name": "dup", "height": None, "ok": None,
                          "building:use": None, "id": None, "geom": None, "tags": None,
                          "mixed": True}  # every field of the layer, null where unset
    assert [r[9] for r in rows] == [7, 1, 2]  # GDAL's FID: an integer "id" names it
    idx = conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'bld'").fetchall()
    assert any("USING gist (geom)" in d[0] for d in idx)
    assert conn.execute("SELECT reltuples FROM pg_class WHERE relname = 'bld'").fetchone()[0] == 3


def test_transform_in_postgis(conn, polygons):
    report = import_vector(conn, polygons, "bld3857", srid=3857, geom_column="shape",
                           progress=False)
    assert report.srid == 3857 and report.transformed_from == 4326
    assert geometry_column(conn, "bld3857", "shape") == ("MULTIPOLYGON", 3857, 2)
    x, y = conn.execute("SELECT ST_XMin(shape), ST_YMin(shape) FROM bld3857 WHERE id = 1"
                        ).fetchone()
    assert x == pytest.approx(X0 * 20037508.342789244 / 180, abs=1e-3)
    assert 3.2e6 < y < 3.21e6
    back = conn.execute("SELECT ST_XMin(ST_Transform(shape, 4326)) FROM bld3857 WHERE id = 1"
                        ).fetchone()[0]
    assert back == pytest.approx(X0, abs=1e-9)


def test_newline_delimited_lines_with_string_ids(conn, tmp_path):
    lines = [
        feature({"type": "LineString", "coordinates": [[X0, Y0], [X0 + 1e-3, Y0]]},
                {"highway": "primary", "lanes": 2}, id="way/1"),
        feature({"type": "MultiLineString",
                 "coordinates": [[[X0, Y0], [X0, Y0 + 1e-3]], [[X0, Y0], [X0 - 1e-3, Y0]]]},
                {"highway": "track"}, id="way/2"),
        feature(None, {"highway": "gone"}),
    ]
    path = tmp_path / "roads.geojsonl"
    path.write_text("\n".join(json.dumps(f) for f in lines) + "\n\n")
    report = import_vector(conn, path, "roads", progress=False)
    assert (report.features, report.null_geometries) == (3, 1)
    assert geometry_column(conn, "roads") == ("MULTILINESTRING", 4326, 2)
    assert columns(conn, "roads")["id_1"] == "text"  # a string "id" is a field, not the FID
    assert conn.execute("SELECT id_1, lanes, feature_id FROM roads ORDER BY id").fetchall() == [
        ("way/1", 2, 0), ("way/2", None, 1), (None, None, 2)]


def test_mixed_families_and_declared_crs(conn, tmp_path):
    mixed = write_json(tmp_path / "mixed.json", {"type": "FeatureCollection", "features": [
        feature({"type": "Point", "coordinates": [X0, Y0]}, {}),
        feature({"type": "Polygon", "coordinates": square(X0, Y0)}, {}),
    ]})
    import_vector(conn, mixed, "mixed", progress=False)
    assert geometry_column(conn, "mixed") == ("GEOMETRY", 4326, 2)

    merc = write_json(tmp_path / "merc.geojson", {
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::3857"}},
        "features": [feature({"type": "Point", "coordinates": [9520000.0, 3202500.0, 12.5]},
                             {"v": 1})]})
    report = import_vector(conn, merc, "merc", progress=False)
    assert report.srid == 3857 and report.geometry_type == "PointZ"
    assert geometry_column(conn, "merc") == ("POINT", 3857, 3)


def test_existing_table_overwrite_append(conn, polygons, tmp_path):
    import_vector(conn, polygons, "bld", progress=False)
    conn.execute("UPDATE bld SET name = 'mine' WHERE id = 1")
    with pytest.raises(errors.AlreadyExists, match="--overwrite"):
        import_vector(conn, polygons, "bld", progress=False)
    assert conn.execute("SELECT count(*), string_agg(name, ',' ORDER BY id) FROM bld"
                        ).fetchone() == (3, "mine,bow")

    extra = write_json(tmp_path / "extra.geojson", {"type": "FeatureCollection", "features": [
        feature({"type": "Polygon", "coordinates": square(X0, Y0 + 1e-3)},
                {"name": "new", "colour": "red"})]})
    report = import_vector(conn, extra, "bld", append=True, progress=False)
    assert report.appended and report.features == 1
    assert conn.execute("SELECT name, colour, ST_GeometryType(geom) FROM bld WHERE id = 4"
                        ).fetchone() == ("new", "red", "ST_MultiPolygon")  # promoted
    with pytest.raises(errors.SridMismatch):
        import_vector(conn, extra, "bld", append=True, srid=3857, progress=False)

    report = import_vector(conn, extra, "bld", overwrite=True, progress=False)
    assert conn.execute("SELECT count(*) FROM bld").fetchone()[0] == 1
    assert geometry_column(conn, "bld") == ("POLYGON", 4326, 2)


def test_errors(conn, tmp_path):
    with pytest.raises(errors.NotFound, match="no such file"):
        import_vector(conn, tmp_path / "missing.geojson", "t", progress=False)
    text = tmp_path / "notes.geojson"
    text.write_text("hello, world")
    with pytest.raises(errors.ConfigError, match="notes.geojson: not a vector file GDAL reads"):
        import_vector(conn, text, "t", progress=False)
    with pytest.raises(errors.ConfigError, match="not a vector file GDAL reads.*TopoJSON"):
        import_vector(conn, write_json(tmp_path / "topo.json", {"type": "Topology"}), "t",
                      progress=False)
    empty = write_json(tmp_path / "empty.geojson", {"type": "FeatureCollection", "features": []})
    with pytest.raises(errors.ConfigError, match="no features"):
        import_vector(conn, empty, "t", progress=False)
    circle = write_json(tmp_path / "circle.geojson", {"type": "FeatureCollection", "features": [
        feature({"type": "Circle", "coordinates": [X0, Y0], "radius": 3}, {})]})
    with pytest.raises(errors.ConfigError, match="geometry type GDAL does not read"):
        import_vector(conn, circle, "t", progress=False)
    with pytest.raises(errors.ConfigError, match="exclude each other"):
        import_vector(conn, circle, "t", overwrite=True, append=True, progress=False)
    assert conn.execute("SELECT to_regclass('public.t')").fetchone()[0] is None


def test_sanitize():
    assert sanitize("building:levels") == "building_levels"
    assert sanitize("ROOF_TYPE") == "roof_type"
    assert sanitize("2nd floor") == "_2nd_floor"
    assert sanitize("नाम") == "field"
    assert len(sanitize("x" * 100)) == 63


@pytest.mark.banepa
def test_banepa_buildings(conn, banepa):
    path = banepa / "labels" / "osm_features_ac7e343eb1faacd2.geojson"
    report = import_vector(conn, path, "buildings", progress=False)
    assert (report.features, report.made_valid, report.srid) == (1466, 0, 4326)
    assert geometry_column(conn, "buildings") == ("POLYGON", 4326, 2)
    cols = columns(conn, "buildings")
    assert cols["osm_id"] == "bigint" and cols["building"] == "text"
    assert cols["roof_type"] == "text" and cols["roof_type_1"] == "text"  # roof:type, ROOF_TYPE
    row = conn.execute("SELECT count(*), bool_and(ST_IsValid(geom)), count(DISTINCT osm_id), "
                       "count(*) FILTER (WHERE building = 'yes'), "
                       "count(*) FILTER (WHERE properties ? 'roof:material') FROM buildings"
                       ).fetchone()
    assert row == (1466, True, 1466, 1439, 1466)
    geoms = shapely.from_wkb([r[0] for r in conn.execute(
        "SELECT ST_AsBinary(geom) FROM buildings ORDER BY id LIMIT 5")])
    assert all(g.geom_type == "Polygon" for g in geoms)


# -- other formats, written with pyogrio (numpy arrays + WKB from shapely: no geopandas) ------
def write_layer(path: Path, geoms: list, fields: dict[str, np.ndarray], *, crs: str | None,
                layer: str | None = None, driver: str | None = None, append: bool = False,
                geometry_type: str = "Unknown") -> Path:
    wkb = np.array(shapely.to_wkb(geoms), dtype=object)
    pyogrio.raw.write(path, wkb, list(fields.values()), list(fields), layer=layer, driver=driver,
                      crs=crs, geometry_type=geometry_type, append=append)
    return path


def utm_squares(n: int, z: float | None = None) -> list:
    x0, y0 = 350000.0, 3057000.0  # EPSG:32645, near Banepa
    sq = [shapely.box(x0 + 20 * i, y0, x0 + 20 * i + 10, y0 + 10) for i in range(n)]
    return [shapely.force_3d(g, z) for g in sq] if z is not None else sq


def test_geopackage_layers(conn, tmp_path):
    path = tmp_path / "labels.gpkg"
    write_layer(path, utm_squares(3), {
        "class": np.array(["house", "shed", "house"], dtype=object),
        "levels": np.array([2, 1, 3], dtype=np.int64),
        "area": np.array([100.0, np.nan, 80.5]),
        "ok": np.array([True, False, True]),
    }, crs="EPSG:32645", layer="buildings", geometry_type="Polygon")
    write_layer(path, [shapely.Point(350000, 3057000), None],
                {"name": np.array(["well", None], dtype=object)},
                crs="EPSG:32645", layer="points", geometry_type="Point", append=True)

    with pytest.raises(errors.ConfigError, match=r"has 2 layers \(buildings, points\): "
                                                 "choose one with --layer"):
        import_vector(conn, path, "b", progress=False)
    with pytest.raises(errors.ConfigError, match="no layer 'roads'"):
        import_vector(conn, path, "b", layer="roads", progress=False)

    report = import_vector(conn, path, "b", layer="buildings", progress=False)
    assert (report.features, report.srid, report.geometry_type) == (3, 32645, "Polygon")
    assert "from labels.gpkg (layer buildings) into public.b" in str(report)
    assert geometry_column(conn, "b") == ("POLYGON", 32645, 2)
    assert {k: v for k, v in columns(conn, "b").items() if k != "geom"} == {
        "id": "bigint", "feature_id": "bigint", "class": "text", "levels": "bigint",
        "area": "double precision", "ok": "boolean", "properties": "jsonb"}
    assert conn.execute("SELECT feature_id, class, levels, area, ok, properties, ST_Area(geom) "
                        "FROM b ORDER BY id").fetchall() == [
        (1, "house", 2, 100.0, True,
         {"class": "house", "levels": 2, "area": 100.0, "ok": True}, 100.0),
        (2, "shed", 1, None, False,
         {"class": "shed", "levels": 1, "area": None, "ok": False}, 100.0),
        (3, "house", 3, 80.5, True,
         {"class": "house", "levels": 3, "area": 80.5, "ok": True}, 100.0)]

    report = import_vector(conn, path, "pts", layer="points", srid=4326, progress=False)
    assert (report.features, report.null_geometries, report.transformed_from) == (2, 1, 32645)
    assert geometry_column(conn, "pts") == ("POINT", 4326, 2)
    x, y = conn.execute("SELECT ST_X(geom), ST_Y(geom) FROM pts WHERE name = 'well'").fetchone()
    assert 85.4 < x < 85.6 and 27.5 < y < 27.7


def test_shapefile_crs_and_no_crs(conn, tmp_path):
    shp = write_layer(tmp_path / "squares.shp", utm_squares(2),
                      {"CLASS": np.array(["a", "b"], dtype=object)}, crs="EPSG:32645",
                      geometry_type="Polygon")
    report = import_vector(conn, shp, "sq", progress=False)
    assert (report.features, report.srid) == (2, 32645)
    assert conn.execute("SELECT feature_id, class FROM sq ORDER BY id").fetchall() == [
        (0, "a"), (1, "b")]

    (tmp_path / "squares.prj").unlink()  # no CRS: --srid declares it
    with pytest.raises(errors.ConfigError, match="no CRS; pass --srid"):
        import_vector(conn, shp, "nocrs", progress=False)
    report = import_vector(conn, shp, "nocrs", srid=32645, progress=False)
    assert report.srid == 32645 and report.transformed_from is None
    assert geometry_column(conn, "nocrs") == ("POLYGON", 32645, 2)

    with pytest.raises(errors.ConfigError, match="SRID 990001 is not in spatial_ref_sys"):
        import_vector(conn, shp, "bad", srid=990001, progress=False)
    (tmp_path / "squares.prj").write_text(  # a local CRS: no EPSG code to load it with
        'LOCAL_CS["site grid",UNIT["metre",1]]')
    with pytest.raises(errors.ConfigError, match=r"CRS \(site grid\) has no EPSG code"):
        import_vector(conn, shp, "bad", progress=False)
    assert conn.execute("SELECT to_regclass('public.bad')").fetchone()[0] is None


def test_flatgeobuf_with_z(conn, tmp_path):
    fgb = write_layer(tmp_path / "z.fgb", utm_squares(2, z=1350.0),
                      {"h": np.array([1.5, 2.5])}, crs="EPSG:32645", driver="FlatGeobuf",
                      geometry_type="Polygon Z")
    report = import_vector(conn, fgb, "zz", progress=False)
    assert (report.features, report.geometry_type) == (2, "PolygonZ")
    assert geometry_column(conn, "zz") == ("POLYGON", 32645, 3)
    # FlatGeobuf stores features in its spatial index's order: order by the attribute
    assert conn.execute("SELECT h, ST_ZMax(geom) FROM zz ORDER BY h").fetchall() == [
        (1.5, 1350.0), (2.5, 1350.0)]


def test_ogr2ogr_geopackage_appends_to_geojson_table(conn, polygons, tmp_path):
    """A GeoPackage written by GDAL's own ogr2ogr, appended to a table a GeoJSON made."""
    if not shutil.which("ogr2ogr"):
        pytest.skip("ogr2ogr (gdal-bin) not installed")
    import_vector(conn, polygons, "bld", progress=False)
    extra = write_json(tmp_path / "extra.geojson", {"type": "FeatureCollection", "features": [
        feature({"type": "Polygon", "coordinates": square(X0, Y0 + 1e-3)}, {"name": "gp"})]})
    gpkg = tmp_path / "extra.gpkg"
    subprocess.run(["ogr2ogr", "-f", "GPKG", "-t_srs", "EPSG:3857", str(gpkg), str(extra)],
                   check=True, capture_output=True)
    report = import_vector(conn, gpkg, "bld", append=True, progress=False)
    assert report.appended and report.srid == 4326 and report.transformed_from == 3857
    x = conn.execute("SELECT ST_XMin(geom) FROM bld WHERE name = 'gp'").fetchone()[0]
    assert x == pytest.approx(X0, abs=1e-9)
