"""The main job, end to end: data → PostGIS → dataset in SQL → chips → training → predictions.

Run by ``pggeolearn demo`` (and ``scripts/demo.sh``). Every step is a library call a notebook
user can make too; re-running replaces what the last run wrote.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from pggeolearn import chips, datasets, errors
from pggeolearn.db import connect, resolve_dsn, schema
from pggeolearn.db.connect import LIBPQ_VARS

ROADS_AND_BUILDINGS = """
SELECT way AS geom, 1 AS class_id,
       CASE highway WHEN 'primary' THEN 5 WHEN 'secondary' THEN 4 WHEN 'residential' THEN 3
                    WHEN 'service' THEN 2 ELSE 1.5 END AS buffer_m
FROM public.planet_osm_line
WHERE highway IS NOT NULL AND way && ST_Expand(tile_geom, 20)
UNION ALL
SELECT way, 2, 0 FROM public.planet_osm_polygon
WHERE building IS NOT NULL AND way && tile_geom
"""
BANEPA_BUILDINGS = """
SELECT geom, 1 AS class_id FROM public.banepa_buildings
WHERE geom && ST_Transform(tile_geom, 4326)
"""


@dataclass
class DemoReport:
    dsn: str
    dataset: str
    model: str
    tables: dict[str, str] = field(default_factory=dict)
    pictures: dict[str, Path] = field(default_factory=dict)
    steps: list[tuple[str, float]] = field(default_factory=list)
    metrics: str = ""

    def __str__(self) -> str:
        lines = ["", "== pggeolearn demo: done", "", "time per step:"]
        lines += [f"  {name:<28} {sec:7.1f} s" for name, sec in self.steps]
        lines += [f"  {'total':<28} {sum(s for _, s in self.steps):7.1f} s", ""]
        if self.metrics:
            lines += [self.metrics, ""]
        lines += ["tables written (open them in QGIS):"]
        lines += [f"  {name:<38} {what}" for name, what in self.tables.items()]
        lines += ["", "pictures:"] + [f"  {what:<10} {path}" for what, path in self.pictures.items()]
        lines += ["", f"DSN (psql, QGIS): {self.dsn}",
                  "QGIS: Browser > PostgreSQL > New Connection with the host/port/database/user above;",
                  "      the layers come styled (styles in public.layer_styles)."]
        return "\n".join(lines)


def _database(dsn: str | None, say: Callable[[str], None]) -> str:
    """The DSN to use; with nothing configured, the embedded cluster, started if needed."""
    import os

    if not dsn and not os.environ.get("PGGEOLEARN_DSN") and not any(os.environ.get(v) for v in LIBPQ_VARS):
        from pggeolearn.db.cluster import Cluster

        status = Cluster.default().up()
        say(f"embedded PostGIS running in {status.datadir}")
    target = resolve_dsn(dsn)
    if schema.current_revision(target) != schema.head_revision():  # installing needs its owner
        schema.upgrade(target)
    return target


def _load_osm(conn: psycopg.Connection, dsn: str, scene, osm: Path, say) -> None:
    """Roads and buildings into planet_osm_line / planet_osm_polygon, the way DBAs have OSM."""
    if shutil.which("osm2pgsql"):
        proc = subprocess.run(["osm2pgsql", "--create", "--log-level=warn", "-d", dsn, str(osm)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise errors.DatabaseError(f"osm2pgsql failed: {proc.stderr.strip().splitlines()[-1:]}")
        from pggeolearn.db import security

        for table in ("planet_osm_line", "planet_osm_polygon"):  # recipes read what is granted
            security.grant(conn, f"public.{table}")
        say(f"loaded {osm.name} with osm2pgsql")
        return
    from pggeolearn.importers import import_vector

    say("osm2pgsql not installed: loading the same roads and buildings with pggeolearn import vector")
    import_vector(conn, scene.roads_path, "public.planet_osm_line", srid=3857, geom_column="way",
                  overwrite=True, progress=False)
    import_vector(conn, scene.buildings_path, "public.planet_osm_polygon", srid=3857,
                  geom_column="way", overwrite=True, progress=False)


def load_banepa(conn: psycopg.Connection, data: str | Path
                ) -> tuple[str, str, str, dict[int, str], float]:
    """The Banepa folder (``../shared/data/banepa``) into PostGIS: ``(train imagery table,
    predict imagery table, label SQL, classes, resolution)`` for a buildings dataset."""
    from pggeolearn.importers import import_raster, import_vector

    data = Path(data)
    train_tif = data / "imagery" / "banepa_train_mosaic_epsg3857.tif"
    predict_tif = data / "imagery" / "banepa_predict_mosaic_epsg3857.tif"
    labels = next((data / "labels").glob("*.geojson"), None) if (data / "labels").is_dir() else None
    if not train_tif.exists() or labels is None:
        raise errors.ConfigError(f"{data} does not look like the Banepa folder "
                                 "(imagery/banepa_train_mosaic_epsg3857.tif, labels/*.geojson)")
    import_raster(conn, [train_tif], "public.banepa_train", overwrite=True, progress=False)
    import_raster(conn, [predict_tif], "public.banepa_predict", overwrite=True, progress=False)
    import_vector(conn, labels, "public.banepa_buildings", overwrite=True, progress=False)
    resolution = conn.execute("SELECT scale_x FROM raster_columns WHERE r_table_name = "
                              "'banepa_train'").fetchone()[0]
    return "public.banepa_train", "public.banepa_predict", BANEPA_BUILDINGS, {1: "building"}, resolution


def recipe(name: str, image_table: str, label_sql: str, classes: dict[int, str],
           resolution: float) -> datasets.Recipe:
    """The demo's dataset: 256 px tiles in EPSG:3857 over ``image_table`` at ``resolution``."""
    return datasets.Recipe(
        name=name, srid=3857, resolution=resolution, extent_from=image_table,
        image_sql=f"SELECT rast FROM {image_table} WHERE ST_Intersects(rast, tile_geom)",
        label_sql=label_sql, classes=classes)


def run_demo(dsn: str | None = None, *, out: str | Path = "pggeolearn-demo", data: str | Path | None = None,
             size_px: int = 2048, epochs: int = 30, minutes: float = 10.0, framework: str = "mxnet",
             jobs: int = 2, say: Callable[[str], None] = print) -> DemoReport:
    """Run the whole pipeline; ``data`` = a folder like ../shared/data/banepa for real data."""
    from pggeolearn.importers import import_raster

    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    steps: list[tuple[str, float]] = []
    clock = time.perf_counter()

    def step(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        steps.append((name, now - clock))
        clock = now

    say("== 1/7 database")
    target = _database(dsn, say)
    step("database")
    model_name = "demo-unet"
    with connect(target, autocommit=True) as conn:
        say("== 2/7 data")
        if data:
            image_table, predict_table, label_sql, classes, resolution = load_banepa(conn, data)
            say(f"loaded the Banepa train and predict mosaics and building footprints from {data}")
        else:
            from pggeolearn.synthetic import make_scene, write_osm

            scene = make_scene(out / "data", size_px=size_px, seed=7)
            osm = write_osm(scene, out / "data" / "scene.osm")
            unseen = make_scene(out / "data-unseen", size_px=size_px // 2, seed=8,
                                center_lonlat=(85.545, 27.63))
            import_raster(conn, [scene.image_path], "public.demo_imagery", overwrite=True, progress=False)
            import_raster(conn, [unseen.image_path], "public.demo_unseen", overwrite=True, progress=False)
            _load_osm(conn, target, scene, osm, say)
            image_table, predict_table = "public.demo_imagery", "public.demo_unseen"
            label_sql, classes = ROADS_AND_BUILDINGS, {1: "road", 2: "building"}
            resolution = scene.resolution
            say(f"synthetic scene {size_px} x {size_px} px (+ an unseen {size_px // 2} px block to predict)")
        step("load data")

        say("== 3/7 dataset recipe (labels in SQL)")
        ds = datasets.create(conn, recipe("demo", image_table, label_sql, classes, resolution),
                             overwrite=True)
        say(ds.describe())
        step("dataset create")

        say("== 4/7 chips")
        report = chips.build(conn, "demo", jobs=jobs, progress=True)
        say(str(report))
        chips.show(conn, "demo", out / "chips.png")
        step("chips build")

    say(f"== 5/7 training ({framework}, at most {minutes:g} min)")
    from pggeolearn import training

    trained = training.train(target, "demo", model_name, framework=framework, epochs=epochs,
                             time_limit_min=minutes, overwrite=True, plot=out / "curves.png")
    say(str(trained))
    step("train")

    say("== 6/7 prediction over the unseen block")
    from pggeolearn import evaluate as evaluation
    from pggeolearn import predict as prediction

    with connect(target, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS results")
        predicted = prediction.predict(conn, model_name, imagery=predict_table, out="results.demo_prediction",
                                       extent=_extent(conn, predict_table), overwrite=True)
        say(str(predicted))
        step("predict")

        say("== 7/7 evaluation on the held-out test split")
        evaluated = evaluation.evaluate(conn, model_name, dataset="demo", split="test",
                                        out_layer="results.demo_evaluation", png=out / "worst.png",
                                        overwrite=True)
        say(str(evaluated))
        step("evaluate")

    rep = DemoReport(dsn=target, dataset="demo", model=model_name, steps=steps)
    rep.tables = {
        image_table: "imagery (raster)",
        "pggeolearn.chips": f"{report.tiles} chips of dataset demo (see also the chips map view)",
        "results.demo_prediction": "predicted classes (raster, styled)",
        **({predicted.polygons_out: f"{predicted.polygons} predicted objects (polygons, styled)"}
           if predicted.polygons_out else {}),
        "results.demo_evaluation": "per-tile IoU on the test split (polygons, styled)",
    }
    rep.pictures = {"chips": out / "chips.png", "curves": out / "curves.png", "worst": out / "worst.png"}
    return rep


def _extent(conn: psycopg.Connection, table: str) -> tuple[float, float, float, float]:
    from psycopg import sql

    from pggeolearn.db.names import table_ident

    row = conn.execute(sql.SQL("SELECT ST_XMin(e), ST_YMin(e), ST_XMax(e), ST_YMax(e) FROM "
                               "(SELECT ST_Extent(ST_Envelope(rast)) AS e FROM {}) s").format(
        table_ident(table))).fetchone()
    return tuple(float(v) for v in row)
