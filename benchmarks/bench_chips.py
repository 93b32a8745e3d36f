"""Chip store build rate (chips/s) for ``--jobs 1`` and ``--jobs 2``, and label write rates.

Scenes: a synthetic road scene (4096 px = 256 tiles of 256 px; roads buffered by class ->
class 1, buildings -> class 2), the same scene as a lon/lat file on a UTM grid (every chip
reprojected from the import tiles it overlaps) and, when ../shared/data is present, Banepa (192 tiles, OSM
buildings). Each build is ``chips.build(..., force=True)``: every tile recomputed (image_tile +
label_tile in READ ONLY transactions into a staging table, then moved into pggeolearn.chips);
the rate counts that phase only (splits and statistics are reported apart). Each build starts
from an empty store (DELETE + VACUUM + CHECKPOINT); best of ``--repeat`` interleaved runs.
The load average is printed, and for a local server the CPU time the build used (client +
all server processes) per chip and the average number of cores it kept busy: on a shared
machine other work takes cores away, which the ratio alone does not show.

Raster writes: ``INSERT ... SELECT`` of N 256 x 256 8BUI label rasters (the scenes' own labels,
so realistically compressible), and of N RGB image chips, into a table whose raster column
uses the default storage (pglz compression), ``SET STORAGE EXTERNAL`` (what pggeolearn.chips
uses) or ``SET COMPRESSION lz4``; the MB column is the table's size on disk.

    python benchmarks/bench_chips.py [--dsn DSN] [--repeat 2] [--size 4096] [--writes 512]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, conditions, cores_free, print_table, scratch_database  # noqa: E402

from pggeolearn import chips, datasets, importers  # noqa: E402
from pggeolearn.synthetic import make_scene, scene_variant, utm_epsg  # noqa: E402

ROADS_SQL = """
SELECT geom, 1 AS class_id,
       CASE highway WHEN 'primary' THEN 5 WHEN 'secondary' THEN 4 WHEN 'residential' THEN 3
                    WHEN 'service' THEN 2 ELSE 1.5 END AS buffer_m
FROM public.roads WHERE geom && ST_Transform(ST_Expand(tile_geom, 20), 4326)
UNION ALL
SELECT geom, 2, 0 FROM public.buildings WHERE geom && ST_Transform(tile_geom, 4326)
"""


def load_vector(conn: psycopg.Connection, dsn: str, path: Path, table: str) -> None:
    """pggeolearn.importers.import_vector when it is there, else ogr2ogr (lon/lat kept)."""
    if callable(getattr(importers, "import_vector", None)):
        importers.import_vector(conn, path, table, geom_column="geom", progress=False)
        return
    if not shutil.which("ogr2ogr"):
        raise SystemExit("need pggeolearn.importers.import_vector or ogr2ogr to load vectors")
    subprocess.run(["ogr2ogr", "-f", "PostgreSQL", f"PG:{dsn}", str(path), "-nln", table,
                    "-lco", "GEOMETRY_NAME=geom", "-nlt", "PROMOTE_TO_MULTI", "-t_srs", "EPSG:4326",
                    "-overwrite"], check=True, capture_output=True)


def server_pid(dsn: str) -> int | None:
    """The postmaster's pid when the server is a local embedded cluster (socket dir = datadir)."""
    host = psycopg.conninfo.conninfo_to_dict(dsn).get("host") or ""
    try:
        return int((Path(host) / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def cpu_seconds(postmaster: int | None) -> float:
    """CPU seconds used so far by this process (all threads) and by the server: the postmaster,
    its children alive or not yet reaped, and the children it reaped (cutime/cstime)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    if postmaster is None:
        return total
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        if pid == postmaster:
            total += sum(int(f) for f in fields[11:15]) / tick  # utime stime cutime cstime
        elif int(fields[1]) == postmaster:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def fresh(conn: psycopg.Connection, name: str) -> None:
    """Empty the store for ``name`` and settle the server, so each timed build starts alike."""
    conn.execute("DELETE FROM pggeolearn.chips WHERE dataset = %s", [name])
    conn.execute("VACUUM pggeolearn.chips")
    try:
        conn.execute("CHECKPOINT")
    except psycopg.Error:  # needs superuser or pg_checkpoint
        pass


def bench_build(conn: psycopg.Connection, dsn: str, name: str,
                repeat: int) -> dict[int, tuple[chips.BuildReport, float | None]]:
    """Per --jobs value: the best of ``repeat`` fresh builds (interleaved 1, 2, 1, 2, ...) and the
    CPU seconds (client + server) it used, or None when the server is not local."""
    best: dict[int, tuple[chips.BuildReport, float | None]] = {}
    pid = server_pid(dsn)
    for _ in range(repeat):
        for jobs in (1, 2):
            fresh(conn, name)
            before = cpu_seconds(pid)
            r = chips.build(dsn, name, jobs=jobs, progress=False)
            time.sleep(0.3)  # let the postmaster reap the worker backends
            used = cpu_seconds(pid) - before if pid else None
            if jobs not in best or r.rate > best[jobs][0].rate:
                best[jobs] = (r, used)
    return best


def bench_writes(conn: psycopg.Connection, dataset: str, column: str, n: int,
                 repeat: int) -> list[tuple[str, float, float]]:
    """(storage, rasters/s, MB on disk) writing n of the store's ``column`` rasters (label or
    image) into a fresh table per storage variant; best of ``repeat``."""
    conn.execute("DROP TABLE IF EXISTS src, srcn")
    conn.execute(f"CREATE TEMP TABLE src AS SELECT {column} AS r FROM pggeolearn.chips "
                 f"WHERE dataset = %s AND {column} IS NOT NULL", [dataset])
    have = conn.execute("SELECT count(*) FROM src").fetchone()[0]
    # the source is stored uncompressed, so reading it costs the same for every variant
    # (ST_SetSRID makes a new datum: an already-compressed one would be copied as it is)
    conn.execute("CREATE TEMP TABLE srcn (r raster)")
    conn.execute("ALTER TABLE srcn ALTER COLUMN r SET STORAGE EXTERNAL")
    conn.execute("INSERT INTO srcn SELECT ST_SetSRID(s.r, ST_SRID(s.r)) FROM generate_series(1, %s) g "
                 "JOIN LATERAL (SELECT r FROM src OFFSET (g %% %s) LIMIT 1) s ON true", [n, have])
    variants = [("default (pglz)", None),
                ("STORAGE EXTERNAL", "ALTER TABLE {t} ALTER COLUMN r SET STORAGE EXTERNAL"),
                ("COMPRESSION lz4", "ALTER TABLE {t} ALTER COLUMN r SET COMPRESSION lz4")]
    out = []
    for i, (what, alter) in enumerate(variants):
        best, size = 0.0, 0
        for _ in range(repeat):
            table = f"public.write_test_{i}"
            conn.execute(f"CREATE TABLE {table} (id serial PRIMARY KEY, r raster)")
            if alter:
                try:
                    conn.execute(alter.format(t=table))
                except psycopg.Error:  # lz4 missing from this server build
                    conn.execute(f"DROP TABLE {table}")
                    break
            conn.execute("SELECT count(*) FROM srcn")  # warm
            t0 = time.perf_counter()
            conn.execute(f"INSERT INTO {table} (r) SELECT r FROM srcn")
            best = max(best, n / (time.perf_counter() - t0))
            size = conn.execute("SELECT pg_total_relation_size(%s::regclass)", [table]).fetchone()[0]
            conn.execute(f"DROP TABLE {table}")
        if best:
            out.append((what, best, size / 1e6))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsn")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size", type=int, default=4096, help="synthetic scene size in pixels")
    ap.add_argument("--writes", type=int, default=512, help="rasters per write test")
    args = ap.parse_args()
    print(conditions())  # commit, cores, cores free, load: beside every table
    rows: list[list[object]] = []
    notes: list[str] = [f"two busy processes got {cores_free():.2f} cores before the builds "
                        f"(2.00 on an idle 2-core machine)"]
    with scratch_database(args.dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn, \
            tempfile.TemporaryDirectory() as tmp:
        scene = make_scene(Path(tmp), size_px=args.size, seed=1)
        importers.import_raster(conn, [scene.image_path], "public.imagery", progress=False)
        load_vector(conn, dsn, scene.roads_path, "public.roads")
        load_vector(conn, dsn, scene.buildings_path, "public.buildings")
        datasets.create(conn, datasets.Recipe(
            name="roads", srid=3857, resolution=scene.resolution, extent_from="public.imagery",
            image_sql="SELECT rast FROM public.imagery WHERE ST_Intersects(rast, tile_geom)",
            label_sql=ROADS_SQL, classes={1: "road", 2: "building"}))
        scenes = [("synthetic roads", "roads")]
        # the same scene as a lon/lat file on a UTM grid: every chip is warped from the
        # import tiles it overlaps (mosaicked in EPSG:4326, then reprojected once)
        lonlat = scene_variant(scene, Path(tmp) / "lonlat.tif", crs=4326)
        importers.import_raster(conn, [lonlat], "public.imagery_lonlat", progress=False)
        datasets.create(conn, datasets.Recipe(
            name="roads_utm", srid=utm_epsg(85.52, 27.63), resolution=0.5,
            extent_from="public.imagery_lonlat",
            image_sql="SELECT rast FROM public.imagery_lonlat "
                      "WHERE ST_Intersects(rast, ST_Transform(tile_geom, 4326))",
            label_sql=ROADS_SQL, classes={1: "road", 2: "building"}))
        scenes.append(("synthetic roads, lon/lat source, UTM grid", "roads_utm"))
        banepa = SHARED_DATA / "banepa"
        if (banepa / "imagery").is_dir():
            importers.import_raster(conn, [banepa / "imagery" / "banepa_train_mosaic_epsg3857.tif"],
                                    "public.banepa", progress=False)
            load_vector(conn, dsn, banepa / "labels" / "osm_features_ac7e343eb1faacd2.geojson",
                        "public.banepa_buildings")
            datasets.create(conn, datasets.Recipe(
                name="banepa", srid=3857, resolution=0.14929107086948487, extent_from="public.banepa",
                image_sql="SELECT rast FROM public.banepa WHERE ST_Intersects(rast, tile_geom)",
                label_sql="SELECT geom, 1 AS class_id FROM public.banepa_buildings "
                          "WHERE geom && ST_Transform(tile_geom, 4326)",
                classes={1: "building"}))
            scenes.append(("Banepa buildings", "banepa"))
        else:
            notes.append(f"Banepa skipped: {banepa} not present")

        for title, name in scenes:
            best = bench_build(conn, dsn, name, args.repeat)
            notes.append(f"two busy processes got {cores_free():.2f} cores after the {title} builds")
            one = best[1][0]
            for jobs in (1, 2):
                r, cpu = best[jobs]
                # CPU seconds of the whole call (splits and statistics included) per chip, and
                # the cores it kept busy on average over the whole call
                cpu_cols = ["-", "-"] if cpu is None else [f"{cpu / r.built * 1000:.1f}",
                                                           f"{cpu / r.seconds:.2f}"]
                rows.append([f"chips build, {title}, --jobs {jobs} ({1000 / r.rate:.0f} ms/chip)",
                             r.built, f"{r.rate:.1f}",
                             f"{r.rate / one.rate:.2f}x", *cpu_cols])
            notes.append(f"{title}: splits + statistics {one.seconds - one.build_seconds:.2f} s "
                         f"after the build; splits {one.stats['splits']}")

        for column, kind in (("label", "labels 256x256 8BUI"), ("image", "images 3x256x256 8BUI")):
            for title, name in scenes:
                writes = bench_writes(conn, name, column, args.writes, args.repeat)
                base = writes[0][1]
                for what, rate, mb in writes:
                    rows.append([f"write {kind} ({title}), {what}: {mb:.1f} MB", args.writes,
                                 f"{rate:.0f}", f"{rate / base:.2f}x", "", ""])
    print_table("pggeolearn chips: build and write rates (per second; ratio vs the first row "
                "of its group; CPU: client + server, whole call)",
                ["what", "n", "per s", "ratio", "CPU ms/chip", "cores busy"], rows)
    for n in notes:
        print(f"  {n}")
    print(f"  load average (1, 5, 15 min) at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
