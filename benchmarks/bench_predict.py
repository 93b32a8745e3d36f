"""Prediction throughput (output tiles/s) and the write-back rate of 256 x 256 class masks.

Scene: the unlabelled Banepa block (``../shared/data/banepa``, 2048 x 2048 px RGB, 64 output
tiles of 256 px) when present, else a seeded synthetic scene of the same size. Each predict
run is ``pggeolearn.predict.predict`` end to end: imagery read through SQL, windows of 256 px
with 32 px overlap (centre stitching), class raster + polygons written, indexes, constraints,
overviews 2 and 4, styles, all in one transaction.

* **inference excluded**: trivial predictors - constant probabilities (nothing to vectorize)
  and a brightness threshold (~1 ms of numpy per window, real objects) - what the pipeline
  around the model costs, with and without vectorizing polygons.
* **inference included**: a U-Net from the model registry (``pggeolearn.training.registry``,
  saved and loaded by name, run on the CPU). Its weights are untrained (seeded): the same
  compute as a trained model of that architecture, meaningless (noisy) classes, so many tiny
  objects to vectorize. ``--model-file`` adds a trained model exported with
  ``registry.export``. Without the registry, a small numpy convolution stands in, labelled.

Write-back of N 256 x 256 8BUI masks (the class tiles the predict run produced, so realistic
shapes): ours - pipelined ``INSERT ... ST_RastFromWKB(%b)`` with binary parameters into an lz4
column (what predict does) - against EXTERNAL storage and pglz with the same pipeline, and the
naive way: one ``INSERT`` per tile with hex WKB text into a default-storage (pglz) column,
autocommit. Best of ``--repeat`` runs; the load average is printed (other work skews ratios).

    python benchmarks/bench_predict.py [--dsn DSN] [--repeat 3] [--writes 2048] [--model-file ZIP]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, conditions, print_table, scratch_database  # noqa: E402

from pggeolearn import predict, wkb  # noqa: E402
from pggeolearn.importers import import_raster  # noqa: E402

BANEPA_PREDICT = SHARED_DATA / "banepa" / "imagery" / "banepa_predict_mosaic_epsg3857.tif"


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


class NumpyConv(Trivial):
    """STAND-IN (no registry): two 3 x 3 convolutions with 8 channels in numpy."""

    name = "numpy-conv stand-in"

    def predict_proba(self, images_uint8: np.ndarray) -> np.ndarray:
        x = images_uint8.astype(np.float32) / 255.0
        rng = np.random.default_rng(0)
        for cout in (8, 2):
            k = rng.normal(0, 0.3, (cout, x.shape[1], 3, 3)).astype(np.float32)
            pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
            h, w = x.shape[2:]
            y = sum(np.einsum("oc,nchw->nohw", k[:, :, i, j], pad[:, :, i:i + h, j:j + w])
                    for i in range(3) for j in range(3))
            x = np.maximum(y, 0) if cout == 8 else y
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def load_scene(conn: psycopg.Connection) -> tuple[str, str]:
    """Import the imagery into public.bench_img; return (description, path)."""
    if BANEPA_PREDICT.exists():
        path, what = BANEPA_PREDICT, "Banepa predict block 2048 x 2048 (real)"
    else:
        from pggeolearn.synthetic import make_scene

        tmp = Path(tempfile.mkdtemp(prefix="pgl-bench-predict-"))
        path = make_scene(tmp, size_px=2048, seed=3).image_path
        what = "synthetic scene 2048 x 2048 (seed 3)"
    import_raster(conn, [path], "public.bench_img", progress=False)
    return what, str(path)


def trained_model(conn: psycopg.Connection, path: str) -> tuple[str, str]:
    """An exported model file (registry.export) imported into the scratch database."""
    from pggeolearn.training import registry

    rec = registry.import_file(conn, path, name="bench_trained", overwrite=True)
    a = rec.architecture
    return "bench_trained", (f"trained registry U-Net width {a.get('width')} depth {a.get('depth')} "
                             f"({rec.framework} CPU, {Path(path).name})")


def registry_model(conn: psycopg.Connection, res: float, srid: int):
    """(model spec for predict, label)."""
    try:
        import torch

        from pggeolearn.training import models_torch, registry
    except ImportError:
        return NumpyConv(res, srid), "STAND-IN numpy conv (registry/torch unavailable)"
    arch = registry.Architecture(in_channels=3, num_classes=2)
    torch.manual_seed(0)
    net = models_torch.build(arch)
    registry.save(conn, registry.ModelRecord(
        name="bench_unet", dataset="-", recipe_hash="-", framework="torch", architecture=arch.to_json(),
        hyperparameters={}, classes={0: "background", 1: "building"},
        normalization={"mean": [120.0] * 3, "std": [50.0] * 3}, tile_px=256, resolution=res,
        srid=srid, bands=3, weights=models_torch.weights_to_bytes(net), metrics={}), overwrite=True)
    return "bench_unet", (f"registry U-Net width {arch.width} depth {arch.depth} (torch CPU, "
                          "untrained weights: same compute)")


def bench_predict(dsn: str, model, extent, repeat: int, **kw) -> tuple[float, predict.PredictReport]:
    best, rep = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        rep = predict.predict(dsn, model, out="public.bench_out", imagery="public.bench_img", extent=extent,
                              overwrite=True, progress=False, **kw)
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsn")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--writes", type=int, default=2048, help="masks per write test")
    ap.add_argument("--model-file", help="also benchmark this exported model (pggeolearn.training.registry.export)")
    args = ap.parse_args()
    print(conditions())  # commit, cores, cores free, load: beside every table
    print(f"load average: {os.getloadavg()[0]:.2f} (2 cores)")
    with scratch_database(args.dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        what, _ = load_scene(conn)
        (res, srid) = conn.execute("SELECT scale_x, srid FROM raster_columns WHERE r_table_name = 'bench_img'"
                                   ).fetchone()
        ext = conn.execute("SELECT ST_XMin(e), ST_YMin(e), ST_XMax(e), ST_YMax(e) FROM "
                           "(SELECT ST_Extent(ST_Envelope(rast)) e FROM public.bench_img) s").fetchone()
        print(f"scene: {what}")
        rows = []
        runs = [("constant (no inference, no objects)", Trivial(res, srid), {"vectorize": True}),
                ("threshold (no inference), no polygons", Threshold(res, srid), {"vectorize": False}),
                ("threshold (no inference), polygons", Threshold(res, srid), {"vectorize": True})]
        model, label = registry_model(conn, res, srid)
        runs.append((label, model, {"vectorize": True, "device": "cpu"}))
        if args.model_file:
            model, label = trained_model(conn, args.model_file)
            runs.append((label, model, {"vectorize": True, "device": "cpu"}))
        for name, m, kw in runs:
            repeat = args.repeat if isinstance(m, Trivial) and not isinstance(m, NumpyConv) else 1
            secs, rep = bench_predict(dsn, m, ext, repeat, **kw)
            t = rep.timing
            n_obj = str(rep.polygons) if kw.get("vectorize") else "-"
            rows.append([name, rep.tiles, n_obj, f"{secs:.2f}", f"{rep.tiles / secs:.1f}",
                         f"{rep.windows_predicted / secs:.1f}", f"{t['read']:.2f}", f"{t['predict']:.2f}",
                         f"{t['write']:.2f}", f"{t['vectorize']:.2f}", f"{t['finalize']:.2f}"])
        base = float(rows[2][4])
        for r in rows:
            r.append(f"{float(r[4]) / base:.2f}x")
        print_table("predict end to end (256 px windows, overlap 32, centre stitching)",
                    ["model", "tiles", "objects", "seconds", "tiles/s", "windows/s", "read s", "predict s",
                     "write s", "vectorize s", "finalize s", "vs threshold+polygons"], rows)

        # realistic masks: the threshold model's class tiles (bright roofs and roads)
        predict.predict(dsn, Threshold(res, srid), out="public.bench_out", imagery="public.bench_img",
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
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
