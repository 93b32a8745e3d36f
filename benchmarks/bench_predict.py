"""Prediction throughput (output tiles/s, where the time goes) and the write-back rate of 256 x 256
class masks.

Scene: the unlabelled Banepa block (``../shared/data/banepa``, 2048 x 2048 px RGB at 15 cm, 64
output tiles of 256 px). Each predict run is ``pggeolearn.predict.predict`` end to end:
imagery read through SQL, windows of 256 px with 32 px overlap (centre stitching), class raster
+ polygons written, indexes, constraints, overviews 2 and 4, styles, all in one transaction.
The split of the time per run: model (inference), stitch, vectorize (labelling and polygons on
the client), write (class tiles encoded and sent), finalize (overviews, the server dissolving
objects across tile borders, styles), waiting for imagery.

* **no inference**: constant probabilities (nothing to vectorize) and a brightness threshold
  (~1 ms of numpy per window, real objects): what the pipeline around the model costs.
* **a trained U-Net**: the default run builds the demo's Banepa buildings dataset (chips of
  the train mosaic, OSM footprints) and trains ``pggeolearn train``'s defaults for
  ``--epochs`` (5, seeded) on the CPU, then predicts the block with it.
* **the same U-Net untrained**: the trained model's record with freshly initialized (seeded)
  weights: the same compute, noisy classes, tens of thousands of specks to vectorize.

Both U-Nets run with ``--min-pixels 0`` (every object vectorized) and with the default (4:
smaller objects left out before vectorizing). ``--model-file`` adds a model exported with
``registry.export``. Without the Banepa data a synthetic scene stands in and the U-Net rows
are skipped (they need its labels), said so.

Write-back of N 256 x 256 8BUI masks (the class tiles of a predict run, so realistic shapes):
ours - pipelined ``INSERT ... ST_RastFromWKB(%b)`` with binary parameters into an lz4 column
(what predict does) - against EXTERNAL storage and pglz with the same pipeline, and the naive
way: one ``INSERT`` per tile with hex WKB text into a default-storage (pglz) column,
autocommit. Best of ``--repeat`` runs (the no-inference predict rows too; the U-Net rows run once).

    python benchmarks/bench_predict.py [--dsn DSN] [--epochs 5] [--repeat 3] [--writes 2048] [--model-file ZIP]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, conditions, print_table, scratch_database  # noqa: E402

from pggeolearn import predict, wkb  # noqa: E402

BANEPA = SHARED_DATA / "banepa"


class Trivial:
    """Constant probabilities: the model costs nothing, everything else is measured."""

    name, framework, tile_px, bands, normalization = "trivial", "none", 256, 3, None
    classes = {0: "background", 1: "building"}

    def __init__(self, resolution: float, srid: int):
        self.resolution, self.srid = resolution, srid

    def predict_proba(self, images_uint8: np.ndarray) -> np.ndarray:
        n, _, h, w = images_uint8.shape
        out = np.empty((n, 2, h, w), np.float32)
        out[:, 0] = 0.7
        out[:, 1] = 0.3
        return out


class Threshold(Trivial):
    """Brightness above 200 -> class 1: objects to vectorize, ~1 ms of numpy per window."""

    name = "threshold"

    def predict_proba(self, images_uint8: np.ndarray) -> np.ndarray:
        p1 = (images_uint8.mean(axis=1, dtype=np.float32) > 200).astype(np.float32) * 0.8 + 0.1
        return np.stack([1 - p1, p1], axis=1)


def load_banepa(dsn: str) -> str:
    """The Banepa imagery and buildings, the demo's dataset ``banepa`` with its chips; returns
    the predict block's table."""
    from pggeolearn import chips, datasets, demo

    with psycopg.connect(dsn, autocommit=True) as conn:
        train_table, predict_table, label_sql, classes, res = demo.load_banepa(conn, BANEPA)
        datasets.create(conn, demo.recipe("banepa", train_table, label_sql, classes, res))
        chips.build(conn, "banepa", jobs=2, progress=False)
    return predict_table


def load_synthetic(conn: psycopg.Connection) -> str:
    from pggeolearn.importers import import_raster
    from pggeolearn.synthetic import make_scene

    path = make_scene(Path(tempfile.mkdtemp(prefix="pgl-bench-predict-")), size_px=2048, seed=3).image_path
    import_raster(conn, [path], "public.bench_img", progress=False)
    return "public.bench_img"


def train_unets(dsn: str, epochs: int) -> tuple[str, str, str]:
    """``pggeolearn train``'s defaults on the Banepa chips for ``epochs`` (seed 0, CPU) as
    ``bench_trained``, and ``bench_untrained``: its record with fresh seeded weights.
    Returns the two names and a description."""
    from pggeolearn import training
    from pggeolearn.training import registry

    t0 = time.perf_counter()
    rep = training.train(dsn, "banepa", "bench_trained", epochs=epochs, seed=0, device="cpu", overwrite=True,
                         progress=False)
    seconds = time.perf_counter() - t0
    with psycopg.connect(dsn, autocommit=True) as conn:
        rec = registry.get(conn, "bench_trained")
        if rec.framework == "torch":
            from pggeolearn.training.models_torch import TorchModel as Model
        else:
            from pggeolearn.training.models_mx import MxModel as Model
        fresh = Model(rec.arch, "cpu", seed=0, normalization=rec.normalization, train=False).get_weights()
        registry.save(conn, dataclasses.replace(rec, name="bench_untrained", weights=fresh, metrics={},
                                                best_epoch=None), overwrite=True)
    a = rec.arch
    about = (f"U-Net width {a.width} depth {a.depth} ({rec.framework}, CPU), trained {len(rep.history)} epochs "
             f"in {seconds:.0f} s: val mIoU {rep.best.miou:.3f} (best epoch {rep.best_epoch})")
    return "bench_trained", "bench_untrained", about


def trained_model(conn: psycopg.Connection, path: str) -> tuple[str, str]:
    """An exported model file (registry.export) imported into the scratch database."""
    from pggeolearn.training import registry

    rec = registry.import_file(conn, path, name="bench_file", overwrite=True)
    a = rec.architecture
    return "bench_file", (f"{Path(path).name} (U-Net width {a.get('width')} depth {a.get('depth')}, "
                          f"{rec.framework} CPU)")


def bench_predict(dsn: str, model, imagery: str, extent, repeat: int, **kw) -> tuple[float, predict.PredictReport]:
    best, rep = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        rep = predict.predict(dsn, model, out="public.bench_out", imagery=imagery, extent=extent,
                              grid_origin=(extent[0], extent[3]), overwrite=True, progress=False, **kw)
        best = min(best, time.perf_counter() - t0)
    return best, rep


def masks(conn: psycopg.Connection, n: int) -> list[bytes]:
    """n 256 x 256 class tiles from the predict output (cycled, georeference shifted)."""
    rows = [bytes(r[0]) for r in conn.execute(
        "SELECT ST_AsBinary(rast) FROM public.bench_out WHERE ST_Width(rast) = 256 AND ST_Height(rast) = 256"
        " ORDER BY rid")]
    out = []
    for i in range(n):
        t = wkb.decode(rows[i % len(rows)])
        gt = list(t.geotransform)
        gt[0] += 256 * gt[1] * (i // len(rows) + 1) * 16
        out.append(wkb.encode(wkb.from_array(t.data, geotransform=gt, srid=t.srid, nodata=255)))
    return out


def write_rate(conn: psycopg.Connection, tiles: list[bytes], how: str, repeat: int) -> tuple[float, float]:
    """(rows/s, MB on disk) for one write method."""
    best, size = float("inf"), 0.0
    for _ in range(repeat):
        conn.execute("DROP TABLE IF EXISTS public.bench_w")
        conn.execute("CREATE TABLE public.bench_w (rid integer, rast raster)")
        if how == "lz4":
            conn.execute("ALTER TABLE public.bench_w ALTER COLUMN rast SET COMPRESSION lz4")
        elif how == "external":
            conn.execute("ALTER TABLE public.bench_w ALTER COLUMN rast SET STORAGE EXTERNAL")
        conn.execute("CHECKPOINT")
        t0 = time.perf_counter()
        if how == "naive":
            for i, b in enumerate(tiles):  # autocommit: one transaction per tile, hex text
                conn.execute("INSERT INTO public.bench_w VALUES (%s, %s::raster)", [i, b.hex()])
        else:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany("INSERT INTO public.bench_w VALUES (%s, ST_RastFromWKB(%b))",
                                [(i, b) for i, b in enumerate(tiles)])
        best = min(best, time.perf_counter() - t0)
        size = conn.execute("SELECT pg_total_relation_size('public.bench_w')").fetchone()[0] / 1e6
    return len(tiles) / best, size


def main() -> None:
    ap = argparse.ArgumentParser(description="Prediction throughput and class-mask write-back rate "
                                             "(python benchmarks/bench_predict.py; details: the module docstring)")
    ap.add_argument("--dsn")
    ap.add_argument("--epochs", type=int, default=5, help="training epochs of the trained U-Net [5]")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--writes", type=int, default=2048, help="masks per write test")
    ap.add_argument("--model-file", help="also benchmark this exported model (pggeolearn.training.registry.export)")
    args = ap.parse_args()
    print(conditions(), flush=True)  # commit, cores, cores free, load: beside every table
    with scratch_database(args.dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        banepa = (BANEPA / "labels").is_dir()
        imagery = load_banepa(dsn) if banepa else load_synthetic(conn)
        schema, table = imagery.split(".")
        res, srid = conn.execute("SELECT scale_x, srid FROM raster_columns WHERE r_table_schema = %s "
                                 "AND r_table_name = %s", [schema, table]).fetchone()
        ext = conn.execute(sql.SQL("SELECT ST_XMin(e), ST_YMin(e), ST_XMax(e), ST_YMax(e) FROM "
                                   "(SELECT ST_Extent(ST_Envelope(rast)) e FROM {}) s").format(
                                       sql.Identifier(schema, table))).fetchone()
        print(f"scene: {'Banepa predict block' if banepa else 'synthetic scene (seed 3; no Banepa data)'} "
              f"{imagery}, {round((ext[2] - ext[0]) / res)} x {round((ext[3] - ext[1]) / res)} px", flush=True)
        runs = [("constant (no inference, no objects)", Trivial(res, srid), {}),
                ("threshold (no inference), no polygons", Threshold(res, srid), {"vectorize": False}),
                ("threshold (no inference), polygons", Threshold(res, srid), {})]
        if banepa:
            trained, untrained, about = train_unets(dsn, args.epochs)
            print(f"model: {about}", flush=True)
            runs += [("untrained U-Net, every object", untrained, {"min_pixels": 0}),
                     ("untrained U-Net, --min-pixels 4 (default)", untrained, {}),
                     ("trained U-Net, every object", trained, {"min_pixels": 0}),
                     ("trained U-Net, --min-pixels 4 (default)", trained, {})]
        else:
            print("no U-Net rows: they train on the Banepa labels, not found in " + str(BANEPA))
        if args.model_file:
            name, label = trained_model(conn, args.model_file)
            runs.append((label, name, {}))
        rows = []
        for label, m, kw in runs:
            kw = {"device": "cpu", **kw} if isinstance(m, str) else kw
            secs, rep = bench_predict(dsn, m, imagery, ext, args.repeat if not isinstance(m, str) else 1, **kw)
            t = rep.timing
            polygons = kw.get("vectorize", True)
            rows.append([label, rep.tiles, rep.polygons if polygons else "-", rep.dropped if polygons else "-",
                         f"{secs:.2f}", f"{rep.tiles / secs:.1f}", f"{t['predict']:.2f}", f"{t['stitch']:.2f}",
                         f"{t['vectorize']:.2f}", f"{t['write']:.2f}", f"{t['finalize']:.2f}",
                         f"{t['read wait']:.2f}"])
            print(f"  {label}: {secs:.1f} s", flush=True)
        base = next((float(r[5]) for r in rows if r[0] == "untrained U-Net, every object"), float(rows[2][5]))
        for r in rows:
            r.append(f"{float(r[5]) / base:.2f}x")
        print_table("predict end to end (256 px windows, overlap 32, centre stitching; seconds of the run)",
                    ["model", "tiles", "objects", "left out", "seconds", "tiles/s", "model", "stitch",
                     "vectorize", "write", "finalize", "imagery wait",
                     "vs untrained, every object" if banepa else "vs threshold+polygons"], rows)

        # realistic masks: the threshold model's class tiles (bright roofs and roads)
        predict.predict(dsn, Threshold(res, srid), out="public.bench_out", imagery=imagery,
                        extent=ext, overwrite=True, progress=False, vectorize=False)
        tiles = masks(conn, args.writes)
        wrows = []
        for how, label in (("lz4", "ours: pipelined binary INSERT, lz4 column"),
                           ("external", "pipelined binary INSERT, STORAGE EXTERNAL"),
                           ("pglz", "pipelined binary INSERT, default pglz"),
                           ("naive", "naive: INSERT per tile, hex WKB text, pglz")):
            rate, size = write_rate(conn, tiles if how != "naive" else tiles[: max(256, args.writes // 4)],
                                    how, args.repeat)
            wrows.append([label, f"{rate:.0f}", f"{size:.1f}"])
        naive = float(wrows[-1][1])
        for r in wrows:
            r.append(f"{float(r[1]) / naive:.1f}x")
        print_table(f"writing 256 x 256 8BUI class masks ({args.writes} per run, best of {args.repeat})",
                    ["method", "masks/s", "table MB", "vs naive"], wrows)
    print("\n" + conditions())


if __name__ == "__main__":
    main()
