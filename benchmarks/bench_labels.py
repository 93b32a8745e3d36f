"""Label-tile build time per 256 px tile, on the same tiles, three ways:

(a) the original design's query style: a two-raster ST_MapAlgebra expression placing
    ST_AsRaster(ST_Buffer(ST_Union(roads))) onto the tile (per-pixel SQL evaluation);
(b) the client-side approach of file-based tools: fetch buffered geometries, then
    rasterio.features.rasterize on the client;
(c) ours: SELECT pggeolearn.label_tile(dataset, tile_id) (and its bytes to the client).

Scenes: a synthetic road scene (roads buffered by class, buildings) and, when ../shared/data is
present, Banepa buildings. (a) is slow, so it runs on a few tiles only.

    python benchmarks/bench_labels.py [--dsn DSN] [--tiles 32] [--slow-tiles 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import psycopg
import shapely
from affine import Affine
from rasterio.features import rasterize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, conditions, print_table, scratch_database  # noqa: E402

from pggeolearn import datasets  # noqa: E402
from pggeolearn.importers import import_raster, import_vector  # noqa: E402
from pggeolearn.synthetic import make_scene  # noqa: E402

ROADS_SQL = """
SELECT way AS geom, 1 AS class_id,
       CASE highway WHEN 'primary' THEN 5 WHEN 'secondary' THEN 4 WHEN 'residential' THEN 3
                    WHEN 'service' THEN 2 ELSE 1.5 END AS buffer_m
FROM public.roads WHERE highway IS NOT NULL AND way && ST_Expand(tile_geom, 20)
"""

# (a) the original style: union the buffered roads, rasterize, place onto the tile by a
# two-raster map-algebra expression evaluated per pixel
ORIGINAL_SQL = """
WITH t AS (SELECT ST_AddBand(pggeolearn.tile_ref(%(ds)s, %(tile)s), '8BUI'::text, 0, NULL) AS rast),
     u AS (SELECT ST_Buffer(ST_Union(way), 4 * (pggeolearn.ground_scale(
                ST_Centroid(ST_Envelope((SELECT rast FROM t)))))[1]) AS g
           FROM public.roads, t WHERE way && ST_Expand(ST_Envelope(t.rast), 20))
SELECT ST_AsBinary(ST_MapAlgebra(t.rast, 1, ST_AsRaster(u.g, t.rast, '8BUI'::text, 1::float8, 0::float8),
                                 1, '[rast2]'::text, '8BUI'::text, 'FIRST'::text,
                                 '[rast2]'::text, '[rast1]'::text, 0::float8))
FROM t, u
"""

# (b) what a file-based tool does: buffered geometries to the client, rasterize there
CLIENT_SQL = """
WITH g AS (SELECT ST_Envelope(pggeolearn.tile_ref(%(ds)s, %(tile)s)) AS geom),
     tile AS (SELECT g.geom AS tile_geom, pggeolearn.ground_scale(ST_Centroid(g.geom)) AS k FROM g)
SELECT ST_AsBinary(CASE WHEN {buffer} > 0
                        THEN ST_Buffer(ST_ClipByBox2D(ST_Transform(q.geom, ST_SRID(tile.tile_geom)),
                                                      ST_Expand(tile.tile_geom, 20)),
                                       {buffer} * tile.k[1])
                        ELSE ST_Transform(q.geom, ST_SRID(tile.tile_geom)) END),
       q.class_id
FROM tile, LATERAL ({label_sql}) q ORDER BY q.class_id
"""


def client_label(conn, ds: datasets.Dataset, tile: int, label_sql: str) -> np.ndarray:
    r = ds.recipe
    minx, _, _, maxy = r.extent
    row, col = divmod(tile, ds.ncols)
    size = r.tile_px * r.resolution
    transform = Affine(r.resolution, 0, minx + col * size, 0, -r.resolution, maxy - row * size)
    buffer = "q.buffer_m" if "buffer_m" in ds.label_columns else "0"
    query = CLIENT_SQL.replace("{label_sql}", label_sql).replace("{buffer}", buffer)
    rows = conn.execute(query, {"ds": ds.name, "tile": tile}).fetchall()
    geoms = shapely.from_wkb([bytes(g) for g, _ in rows])
    shapes = [(g, c) for g, (_, c) in zip(geoms, rows, strict=True)]
    if not shapes:
        return np.zeros((r.tile_px, r.tile_px), np.uint8)
    return rasterize(shapes, out_shape=(r.tile_px, r.tile_px), transform=transform, fill=0,
                     dtype="uint8", all_touched=r.all_touched)


def ours(conn, ds: datasets.Dataset, tile: int) -> bytes:
    return conn.execute("SELECT ST_AsBinary(pggeolearn.label_tile(%s, %s))",
                        [ds.name, tile]).fetchone()[0]


def per_tile(fn, tiles) -> float:
    t0 = time.perf_counter()
    for t in tiles:
        fn(t)
    return (time.perf_counter() - t0) / len(tiles) * 1000


def run_scene(conn, title: str, ds: datasets.Dataset, label_sql: str, n_tiles: int,
              slow_tiles: int, with_original: bool) -> list[list[object]]:
    rng = np.random.default_rng(0)
    tiles = sorted(rng.choice(ds.n_tiles, size=min(n_tiles, ds.n_tiles), replace=False).tolist())
    for t in tiles[:3]:  # warm caches (GDAL drivers, PROJ)
        ours(conn, ds, t)
        client_label(conn, ds, t, label_sql)
    c_ms = per_tile(lambda t: ours(conn, ds, t), tiles)
    b_ms = per_tile(lambda t: client_label(conn, ds, t, label_sql), tiles)
    t0 = time.perf_counter()  # how chips build runs it: set-based, labels stay in the database
    conn.execute("SELECT count(pggeolearn.label_tile(%s, t)) FROM unnest(%s::int[]) t", [ds.name, tiles])
    set_ms = (time.perf_counter() - t0) / len(tiles) * 1000
    rows = []
    if with_original:
        a_tiles = tiles[:slow_tiles]
        a_ms = per_tile(lambda t: conn.execute(ORIGINAL_SQL, {"ds": ds.name, "tile": t}).fetchone(), a_tiles)
        rows.append([title, "(a) original: ST_MapAlgebra expr + ST_Union", len(a_tiles), f"{a_ms:.1f}",
                     f"{a_ms / set_ms:.0f}x"])
    rows.append([title, "(b) client: fetch buffered geoms + rasterio", len(tiles), f"{b_ms:.2f}",
                 f"{b_ms / set_ms:.2f}x"])
    rows.append([title, "(c) ours: label_tile, one query per tile + bytes", len(tiles), f"{c_ms:.2f}",
                 f"{c_ms / set_ms:.2f}x"])
    rows.append([title, "(c) ours: label_tile set-based (as chips build)", len(tiles), f"{set_ms:.2f}", "1.00x"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsn")
    ap.add_argument("--tiles", type=int, default=32)
    ap.add_argument("--slow-tiles", type=int, default=3)
    args = ap.parse_args()
    print(conditions())  # commit, cores, cores free, load: beside every table
    warnings.filterwarnings("ignore", message="Invalid or empty shape")  # rasterio, empty clips
    rows: list[list[object]] = []
    with scratch_database(args.dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn, \
            tempfile.TemporaryDirectory() as tmp:
        scene = make_scene(Path(tmp), size_px=2048, seed=1)
        import_raster(conn, [scene.image_path], "public.imagery", progress=False)
        import_vector(conn, scene.roads_path, "public.roads", srid=3857, geom_column="way",
                      progress=False)
        ds = datasets.create(conn, datasets.Recipe(
            name="roads", srid=3857, resolution=scene.resolution, extent=scene.bounds,
            image_sql="SELECT rast FROM public.imagery WHERE ST_Intersects(rast, tile_geom)",
            label_sql=ROADS_SQL, classes={1: "road"}))
        rows += run_scene(conn, "synthetic roads", ds, ROADS_SQL, args.tiles, args.slow_tiles, True)

        banepa = SHARED_DATA / "banepa"
        if (banepa / "imagery").is_dir():
            import_raster(conn, [banepa / "imagery" / "banepa_train_mosaic_epsg3857.tif"],
                          "public.banepa", progress=False)
            import_vector(conn, banepa / "labels" / "osm_features_ac7e343eb1faacd2.geojson",
                          "public.buildings", progress=False)
            sql = ("SELECT geom, 1 AS class_id FROM public.buildings "
                   "WHERE geom && ST_Transform(tile_geom, 4326)")
            res = conn.execute("SELECT scale_x FROM raster_columns WHERE r_table_name = 'banepa'").fetchone()[0]
            bds = datasets.create(conn, datasets.Recipe(
                name="banepa", srid=3857, resolution=res, extent_from="public.banepa",
                image_sql="SELECT rast FROM public.banepa WHERE ST_Intersects(rast, tile_geom)",
                label_sql=sql, classes={1: "building"}))
            rows += run_scene(conn, "Banepa buildings", bds, sql, args.tiles, args.slow_tiles, False)
        else:
            print(f"(Banepa skipped: {banepa} not present)")
    print_table("Label tile build time per 256x256 tile (ms, lower is better; time / ours set-based)",
                ["scene", "method", "tiles", "ms/tile", "x ours"], rows)


if __name__ == "__main__":
    main()
