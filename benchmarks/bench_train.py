"""Model quality against wall time: test mIoU on the real Banepa data for training configurations,
MXNet and PyTorch, each under the same time budget, side by side in one run.

Run: ``python benchmarks/bench_train.py [--dsn DSN] [--minutes 10 | --epochs N]
[--frameworks mxnet torch] [--configs default quarter ...] [--no-tta] [--png bench_train.png]``

The data: the Banepa mosaics and OSM buildings in ``../shared/data/banepa`` (skipped with a
message when absent), imported into a scratch database and cut into the demo's dataset (256 px
tiles, spatial train/val/test blocks). Every configuration trains with ``--time-limit MINUTES``
(the schedule anneals by then), or with ``--epochs N`` for N epochs each (the same training
whatever the machine's load: to compare configurations epoch for epoch); the best epoch on
**val** is the model, scored on the untouched **test** split, plain and with test-time
augmentation (``evaluate --tta``). Configurations (``--configs``, in order; ``default`` is
what ``pggeolearn train`` does with no options, every other one changes it):

* ``bilinear``: logits upsampled bilinearly instead of the full-resolution refinement layer
  (``--head bilinear``);
* ``jitter``: colour jitter 0.1 (``--jitter 0.1``);
* ``dice``: cross entropy + soft Dice (``--loss ce+dice``);
* ``batch4``: batches of 4 chips (``--batch-size 4``: twice the optimizer steps per epoch);
* ``lr2e-3``: twice the learning rate (``--lr 2e-3``);
* ``quarter``: a stride-4 stem, width 32, depth 4, residual levels, bilinear head, CE + Dice
  and jitter together.

The default run trains the defaults and ``dice`` (the IoU-shaped loss) in both frameworks
(4 runs, 40 minutes); name other configurations to compare them. The table gives epochs run,
best val mIoU, test mIoU (plain and TTA), test building IoU and the gain over the first
configuration of the same framework, and the share of CPU time the hypervisor stole during
each training (/proc/stat: on a shared cloud machine it moves the epochs a budget buys); the
PNG (matplotlib) plots val mIoU against wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (  # noqa: E402
    SHARED_DATA,
    conditions,
    cpu_ticks,
    print_table,
    scratch_database,
    steal_share,
)

from pggeolearn import chips, datasets, demo  # noqa: E402
from pggeolearn.db.connect import connect  # noqa: E402

CONFIGS = {  # each a change to the defaults (pggeolearn.training.loop.DEFAULTS)
    "default": {},
    "bilinear": {"head": "bilinear"},
    "jitter": {"jitter": 0.1},
    "dice": {"loss": "ce+dice"},
    "batch4": {"batch_size": 4},
    "lr2e-3": {"lr": 2e-3},
    "quarter": {"stem_stride": 4, "width": 32, "depth": 4, "block": "residual", "head": "bilinear",
                "loss": "ce+dice", "jitter": 0.1},
}


def build_dataset(dsn: str, data: Path, resolution_factor: float = 1.0, *, load: bool = True) -> str:
    """The demo's Banepa dataset (256 px tiles); ``resolution_factor`` F != 1: the same recipe at
    F x the imagery's pixel size (named ``banepa_xF``; the same extent, so for an integer F every
    coarse tile covers exactly F x F native tiles). ``load=False``: the data is already imported."""
    with connect(dsn, autocommit=True) as conn:
        if load:
            image_table, _, label_sql, classes, resolution = demo.load_banepa(conn, data)
        else:
            image_table, label_sql, classes = "public.banepa_train", demo.BANEPA_BUILDINGS, {1: "building"}
            resolution = None
        name = "banepa"
        if resolution_factor != 1.0:
            # the exact pixel size (raster_columns rounds it), times F
            resolution = conn.execute(f"SELECT ST_ScaleX(rast) FROM {image_table} LIMIT 1").fetchone()[0]
            resolution *= resolution_factor
            name = f"banepa_x{resolution_factor:g}".replace(".", "_")
        datasets.create(conn, demo.recipe(name, image_table, label_sql, classes, resolution))
        chips.build(conn, name, jobs=2, progress=False)
    return name


def run_one(dsn: str, dataset: str, framework: str, config: str, minutes: float | None, tta: bool,
            epochs: int | None = None) -> dict:
    from pggeolearn import training
    from pggeolearn.evaluate import evaluate

    curve: list[tuple[float, float]] = []
    ticks = cpu_ticks()
    t0 = time.perf_counter()
    model = f"bench-{framework}-{config}"
    budget = {"epochs": epochs} if epochs else {"epochs": 1000, "time_limit_min": minutes}
    rep = training.train(dsn, dataset, model, framework=framework, **budget,
                         overwrite=True, progress=False, device="cpu",
                         on_epoch=lambda r: curve.append((time.perf_counter() - t0, r["val"]["miou"])),
                         **CONFIGS[config])
    seconds = time.perf_counter() - t0
    steal = steal_share(ticks)
    test = evaluate(dsn, model, dataset=dataset, split="test", progress=False)
    row = {"framework": framework, "config": config, "epochs": len(rep.history), "seconds": seconds,
           "steal": "n/a" if steal is None else f"{steal:.0%}", "val": rep.best.miou,
           "test": test.scores.miou, "building": test.scores.iou[-1], "curve": curve}
    if tta:
        row["test_tta"] = evaluate(dsn, model, dataset=dataset, split="test", progress=False,
                                   tta=True).scores.miou
    print(f"  {framework} {config}: {row['epochs']} epochs in {seconds:.0f} s, val {row['val']:.3f}, "
          f"test {row['test']:.3f}", flush=True)
    return row


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {path} (pip install 'pggeolearn[plot]')")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        xs = [t / 60 for t, _ in r["curve"]]
        ax.plot(xs, [m for _, m in r["curve"]], marker="o", ms=3,
                label=f"{r['framework']} {r['config']} (test {r['test']:.3f})")
    ax.set_xlabel("wall time (min)")
    ax.set_ylabel("val mIoU")
    ax.set_title("Banepa buildings: val mIoU per epoch against training time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsn", help="a server to make a scratch database on (default: a temporary cluster)")
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget per configuration")
    ap.add_argument("--epochs", type=int, help="train every configuration for this many epochs instead")
    ap.add_argument("--frameworks", nargs="+", default=["mxnet", "torch"], choices=["mxnet", "torch"])
    ap.add_argument("--configs", nargs="+", default=["default", "dice"], choices=list(CONFIGS))
    ap.add_argument("--no-tta", dest="tta", action="store_false",
                    help="skip scoring the test split with test-time augmentation")
    ap.add_argument("--png", type=Path, default=Path("bench_train.png"))
    args = ap.parse_args()
    data = SHARED_DATA / "banepa"
    if not (data / "imagery").is_dir():
        print(f"skipped: the Banepa data is not at {data} (set PGGEOLEARN_DATA)")
        return
    print(conditions())
    rows = []
    with scratch_database(args.dsn) as dsn:
        dataset = build_dataset(dsn, data)
        for fw in args.frameworks:
            for config in args.configs:
                rows.append(run_one(dsn, dataset, fw, config, args.minutes, args.tta, args.epochs))
    first = {}
    table = []
    for r in rows:
        ref = first.setdefault(r["framework"], r["test"])
        table.append([r["framework"], r["config"], r["epochs"], f"{r['seconds'] / 60:.1f}", r["steal"],
                      f"{r['val']:.3f}", f"{r['test']:.3f}", f"{r['building']:.3f}"]
                     + ([f"{r['test_tta']:.3f}"] if args.tta else []) + [f"{r['test'] - ref:+.3f}"])
    budget = f"{args.epochs} epochs per run" if args.epochs else f"{args.minutes:g} min budget per run"
    print_table(f"Banepa buildings, {budget} on the CPU (test: the untouched split)",
                ["framework", "config", "epochs", "min", "steal", "val mIoU", "test mIoU", "test IoU building"]
                + (["test mIoU, TTA"] if args.tta else []) + ["gain"], table)
    print(conditions())
    plot(rows, args.png)


if __name__ == "__main__":
    main()
