"""Feeding an accelerator from PostgreSQL: chips/s onto the device, data wait while training the
default U-Net, and stream scaling over parallel connections.

Run: ``python benchmarks/bench_feed.py [--dsn DSN] [--chips 1024] [--steps 40] [--k 1 2 4 8]``

Chips: 3 x 256 x 256 uint8 + labels, as in bench_stream.py (its writer is reused). Three tables:

1. **Feed**: one epoch in batches of 32 delivered *onto the device*: GeoStream's numpy batches
   (host, the reference), MXNet GeoIter (NDArrays on the context, normalized there,
   ``wait_to_read``), and the PyTorch loader (pinned memory and ``non_blocking`` copies when
   the device is CUDA, then ``synchronize``).
2. **Training**: ``--steps`` steps of the default U-Net (``pggeolearn.training.loop.DEFAULTS``,
   batch 8), MXNet and PyTorch, through the same batches training uses; *data wait* is the
   share of wall time spent waiting for the next batch (what ``pggeolearn train`` stores per
   epoch). The goal on a GPU: >= 2,500 chips/s of feed and data wait <= 5 %.
3. **Scaling**: k processes each streaming shard i of k (``num_parts=k``) at once; aggregate
   chips/s against k x the single stream's (goal: >= 0.8 k up to the server's cores).

Without a GPU (this project's CI and development machines) everything runs on the CPU and the
script says so: the figures then show the CPU's limits, not a GPU feed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import conditions, print_table, scratch_database  # noqa: E402
from bench_stream import fill, scene_tiles  # noqa: E402

from pggeolearn.stream import GeoStream  # noqa: E402

BATCH, TRAIN_BATCH = 32, 8
NORM = ([120.0] * 3, [50.0] * 3)


def feed_numpy(dsn: str, name: str) -> int:
    n = 0
    with GeoStream(dsn, name, batch_size=BATCH) as s:
        for b in s:
            n += BATCH - int(b["pad"])
    return n


def feed_mxnet(dsn: str, name: str, gpu: bool) -> int:
    from pggeolearn.mxnet import GeoIter, mx

    ctx = mx.gpu(0) if gpu else mx.cpu()
    n = 0
    with GeoIter(dsn, name, batch_size=BATCH, ctx=ctx, normalize=NORM) as it:
        for b in it:
            b.data[0].wait_to_read()
            b.label[0].wait_to_read()
            n += BATCH - b.pad
    return n


def feed_torch(dsn: str, name: str, gpu: bool) -> int:
    import torch

    from pggeolearn.torch import make_loader

    dev = torch.device("cuda" if gpu else "cpu")
    n = 0
    for b in make_loader(dsn, name, batch_size=BATCH, normalize=False, pin_memory=gpu):
        x = b["image"].to(dev, non_blocking=True).float()
        y = b["label"].to(dev, non_blocking=True)
        n += BATCH - int(b["pad"])
    if gpu:
        torch.cuda.synchronize()
    del x, y
    return n


def train_steps(dsn: str, name: str, framework: str, steps: int) -> tuple[int, float, float]:
    """``steps`` steps of the default U-Net: (chips, seconds, data wait share)."""
    from pggeolearn.training.loop import DEFAULTS
    from pggeolearn.training.registry import Architecture

    arch = Architecture(in_channels=3, num_classes=3, **{k: DEFAULTS[k] for k in
                                                         ("width", "depth", "stem_stride", "block", "head")})
    if framework == "mxnet":
        from pggeolearn.training.models_mx import MxModel as Model
    else:
        from pggeolearn.training.models_torch import TorchModel as Model
    model = Model(arch, "auto", seed=0, normalization={"mean": NORM[0], "std": NORM[1]}, lr=1e-3,
                  loss=DEFAULTS["loss"])
    batches = model.batches(dsn, name, "train", batch_size=TRAIN_BATCH, shuffle=True,
                            augment=False, seed=0, epoch=0)
    waited, chips, started = 0.0, 0, time.perf_counter()
    try:
        for _ in range(steps):
            model.sync()  # as training measures it: compute is not data wait
            t = time.perf_counter()
            item = next(batches, None)
            waited += time.perf_counter() - t
            if item is None:
                break
            images, labels, pad = item
            model.train_step(images, labels, pad, 1e-3, None)
            chips += TRAIN_BATCH - pad
    finally:
        batches.close()
    elapsed = time.perf_counter() - started
    return chips, elapsed, waited / elapsed


def _shard(args: tuple[str, str, int, int]) -> int:
    dsn, name, k, i = args
    n = 0
    with GeoStream(dsn, name, batch_size=BATCH, num_parts=k, part_index=i) as s:
        for b in s:
            n += BATCH - int(b["pad"])
    return n


def _warm(_: int) -> int:
    import pggeolearn.stream  # noqa: F401 - imports paid before the clock starts

    return 0


def scaling(dsn: str, name: str, k: int) -> tuple[int, float]:
    with mp.get_context("spawn").Pool(k) as pool:
        pool.map(_warm, range(k))
        t0 = time.perf_counter()
        n = sum(pool.map(_shard, [(dsn, name, k, i) for i in range(k)]))
        return n, time.perf_counter() - t0


def gpus() -> tuple[bool, bool, str]:
    try:
        import torch

        t = torch.cuda.is_available()
        name = torch.cuda.get_device_name(0) if t else ""
    except ImportError:
        t, name = False, ""
    from pggeolearn.mxnet import mx

    m = mx.context.num_gpus() > 0
    return m, t, name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsn")
    ap.add_argument("--chips", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args()
    print(conditions())
    mx_gpu, torch_gpu, gpu_name = gpus()
    if not (mx_gpu or torch_gpu):
        print("no GPU here: every figure below is CPU-only (the feed goal of 2,500 chips/s per GPU "
              "with <= 5 % data wait needs a GPU machine; the README keeps the last GPU table)")
    else:
        print(f"GPU: {gpu_name or 'yes'} (MXNet sees one: {mx_gpu}; PyTorch: {torch_gpu})")
    with scratch_database(args.dsn) as dsn:
        fill(dsn, "feed", args.chips, scene_tiles())
        rows, ref = [], None
        for label, fn in (("GeoStream, numpy on the host", lambda: feed_numpy(dsn, "feed")),
                          (f"MXNet GeoIter -> {'gpu(0)' if mx_gpu else 'cpu'}",
                           lambda: feed_mxnet(dsn, "feed", mx_gpu)),
                          (f"PyTorch loader -> {'cuda' if torch_gpu else 'cpu'}",
                           lambda: feed_torch(dsn, "feed", torch_gpu))):
            t0 = time.perf_counter()
            n = fn()
            rate = n / (time.perf_counter() - t0)
            ref = ref or rate
            rows.append([label, n, f"{rate:,.0f}", f"{rate / ref:.2f}x"])
        print_table(f"1. feed onto the device ({args.chips} chips of 3 x 256², batches of {BATCH})",
                    ["path", "chips", "chips/s", "x GeoStream"], rows)

        rows = []
        for fw in ("mxnet", "torch"):
            chips, secs, wait = train_steps(dsn, "feed", fw, args.steps)
            rows.append([fw, chips, f"{chips / secs:,.1f}", f"{100 * wait:.1f} %"])
        print_table(f"2. training the default U-Net, {args.steps} steps of {TRAIN_BATCH} chips",
                    ["framework", "chips", "chips/s trained", "data wait"], rows)

        rows, single = [], None
        for k in args.k:
            n, secs = scaling(dsn, "feed", k)
            rate = n / secs
            single = single or rate
            rows.append([k, n, f"{rate:,.0f}", f"{rate / (k * single):.2f}"])
        print_table("3. parallel streams (k processes, shard i of k each)",
                    ["k", "chips", "chips/s (all)", "efficiency vs k x one"], rows)
    print(conditions())


if __name__ == "__main__":
    main()
