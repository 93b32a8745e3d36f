"""Incremental refresh vs full rebuild of a 4,096-chip dataset after ~1 % of its tiles changed.

Scene: the synthetic road + building scene (``--size`` px, default 4096 at 0.5 m) on a grid of
``--tile-px`` tiles (default 64: 64 x 64 = 4,096 chips), the demo's recipe (roads buffered by
class -> 1, buildings -> 2). After one full build the dataset is watched, then buildings are
moved by 2 m until ~1 % of the tiles are touched (old and new footprints), as mappers' edits
would. Timed, in one run:

* full rebuild: ``chips.build(force=True)``, every tile recomputed, splits and statistics;
* ``chips refresh``: find the touched tiles from the recorded changes, rebuild those, keep
  splits, recompute statistics.

Both leave the store identical (checked: image and label bytes of every chip).

    python benchmarks/bench_refresh.py [--dsn DSN] [--size 4096] [--tile-px 64] [--share 0.01]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import conditions, print_table, scratch_database  # noqa: E402

from pggeolearn import chips, datasets, refresh  # noqa: E402
from pggeolearn.demo import ROADS_AND_BUILDINGS  # noqa: E402
from pggeolearn.importers import import_raster, import_vector  # noqa: E402
from pggeolearn.synthetic import make_scene  # noqa: E402

IMAGE_SQL = "SELECT rast FROM public.imagery WHERE ST_Intersects(rast, tile_geom)"


def store(conn: psycopg.Connection) -> dict[int, tuple[str, str]]:
    return {r[0]: r[1:] for r in conn.execute(
        "SELECT tile_id, md5(ST_AsBinary(image)), md5(ST_AsBinary(label)) FROM pggeolearn.chips "
        "WHERE dataset = 'bench'")}


def edit(conn: psycopg.Connection, share: float, n_tiles: int) -> int:
    """Move buildings by 2 m, in a seeded order, until ``share`` of the tiles are touched."""
    target = max(1, round(share * n_tiles))
    ids = [r[0] for r in conn.execute(
        "SELECT ctid::text FROM public.planet_osm_polygon ORDER BY md5(ctid::text)")]
    moved = 0
    for ctid in ids:
        touched = conn.execute(
            "SELECT count(DISTINCT c.tile_id) FROM pggeolearn.chips c, public.changes_probe p "
            "WHERE c.dataset = 'bench' AND ST_Intersects(c.geom, p.geom) "
            "AND NOT ST_Touches(c.geom, p.geom)").fetchone()[0]
        if touched >= target:
            break
        conn.execute("INSERT INTO public.changes_probe SELECT way FROM public.planet_osm_polygon "
                     "WHERE ctid = %s::tid UNION ALL SELECT ST_Translate(way, 2, 0) "
                     "FROM public.planet_osm_polygon WHERE ctid = %s::tid", [ctid, ctid])
        conn.execute("UPDATE public.planet_osm_polygon SET way = ST_Translate(way, 2, 0) "
                     "WHERE ctid = %s::tid", [ctid])
        moved += 1
    return moved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsn")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tile-px", type=int, default=64)
    ap.add_argument("--share", type=float, default=0.01)
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args()
    print(conditions())
    with tempfile.TemporaryDirectory() as tmp, scratch_database(args.dsn) as dsn, \
            psycopg.connect(dsn, autocommit=True) as conn:
        scene = make_scene(Path(tmp), size_px=args.size, seed=11)
        import_raster(conn, [scene.image_path], "public.imagery", progress=False)
        import_vector(conn, scene.roads_path, "public.planet_osm_line", srid=3857,
                      geom_column="way", progress=False)
        import_vector(conn, scene.buildings_path, "public.planet_osm_polygon", srid=3857,
                      geom_column="way", progress=False)
        ds = datasets.create(conn, datasets.Recipe(
            name="bench", srid=3857, resolution=scene.resolution, extent=scene.bounds,
            tile_px=args.tile_px, image_sql=IMAGE_SQL, label_sql=ROADS_AND_BUILDINGS,
            classes={1: "road", 2: "building"}))
        t0 = time.perf_counter()
        chips.build(dsn, "bench", jobs=args.jobs, progress=False)
        first = time.perf_counter() - t0
        _, margin = refresh.watch(conn, "bench")
        conn.execute("CREATE TABLE public.changes_probe (geom geometry)")
        moved = edit(conn, args.share, ds.n_tiles)

        t0 = time.perf_counter()
        rep = refresh.refresh(dsn, "bench", jobs=args.jobs, progress=False)
        t_refresh = time.perf_counter() - t0
        after_refresh = store(conn)

        t0 = time.perf_counter()
        chips.build(dsn, "bench", jobs=args.jobs, force=True, progress=False)
        t_full = time.perf_counter() - t0
        identical = store(conn) == after_refresh

    print(f"\n{ds.n_tiles} chips of {args.tile_px} px (first build {first:.1f} s); {moved} buildings "
          f"moved 2 m; refresh margin {margin:g} m (the recipe's largest road buffer)")
    print_table(
        f"refresh after {len(rep.tiles)} of {ds.n_tiles} tiles were touched "
        f"({100 * len(rep.tiles) / ds.n_tiles:.1f} %), --jobs {args.jobs}",
        ["method", "chips rebuilt", "seconds", "x refresh"],
        [["full rebuild (chips build --force)", ds.n_tiles, f"{t_full:.2f}",
          f"{t_full / t_refresh:.1f}x"],
         ["chips refresh", len(rep.tiles), f"{t_refresh:.2f}", "1.0x"]])
    print(f"chips whose bytes changed: {rep.changed}; store identical to a full rebuild: {identical}")
    print(conditions())


if __name__ == "__main__":
    main()
