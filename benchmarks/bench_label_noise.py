"""What holds a model's test mIoU down: where its wrong pixels lie against the labels.

Run: ``python benchmarks/bench_label_noise.py [--epochs 30] [--shift 32]`` (the Banepa data,
a scratch database, the defaults trained for a fixed number of epochs: the numbers do not depend
on the machine's load), or ``--dsn DSN --dataset NAME --model NAME`` to audit a trained model.

Per split (train, val, test), from the model's predictions of every chip:

* ``mIoU``: as ``evaluate`` scores it (NODATA left out);
* ``mIoU, labels moved``: each chip's label raster moved by the whole-pixel shift (within
  ``--shift`` px) that best matches the prediction, pixels moved in from outside left out: the
  most that co-registering labels and imagery tile by tile could add;
* ``wrong px near an edge``: the share of wrong pixels within 2, 4 and 8 px of a label edge
  (boundary disagreement) - the rest lies deeper inside objects or background.

A model that fits its own train split no better than val, with a "labels moved" ceiling close to
the plain mIoU, is limited by what the labels say inside objects (missing or generalised
outlines, roofs against footprints), not by a registration offset.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import SHARED_DATA, conditions, print_table, scratch_database  # noqa: E402
from bench_train import build_dataset  # noqa: E402

from pggeolearn import wkb  # noqa: E402
from pggeolearn.db.connect import connect  # noqa: E402
from pggeolearn.predict import call_model, load_model, model_class_ids  # noqa: E402
from pggeolearn.training import metrics  # noqa: E402

IGNORE = metrics.IGNORE
BANDS = (2, 4, 8)


def chips_and_predictions(dsn: str, dataset: str, model: str, batch: int = 8):
    """``(split, truth, prediction)`` per chip: truth in model channels, IGNORE where NODATA."""
    with connect(dsn) as conn:
        p = load_model(conn, model)
        rows = conn.execute("SELECT split, ST_AsBinary(image), ST_AsBinary(label) FROM pggeolearn.chips "
                            "WHERE dataset = %s AND image IS NOT NULL AND split IS NOT NULL "
                            "ORDER BY tile_id", [dataset]).fetchall()
    ids = model_class_ids(p)
    lut = np.full(256, IGNORE, np.uint8)
    lut[ids] = np.arange(len(ids), dtype=np.uint8)
    out = []
    for i in range(0, len(rows), batch):
        part = rows[i:i + batch]
        images = [wkb.decode(r[1], copy=True) for r in part]
        pred = call_model(p, np.stack([im.data for im in images]), len(ids)).argmax(axis=1)
        for (split, _, label), im, pr in zip(part, images, pred, strict=True):
            truth = lut[np.asarray(wkb.decode(label).data[0], np.uint8)]
            out.append((split, np.where(wkb.valid_mask(im.data, im.nodata), truth, IGNORE),
                        pr.astype(np.uint8)))
    return out, len(ids)


def best_shift(truth: np.ndarray, pred: np.ndarray, r: int) -> tuple[int, int]:
    """The (dy, dx) within ``r`` px moving the truth's foreground onto the predicted foreground
    with the largest overlap (FFT cross-correlation, zero padded)."""
    t = ((truth != 0) & (truth != IGNORE)).astype(np.float32)
    q = (pred != 0).astype(np.float32)
    if t.sum() == 0 or q.sum() == 0:
        return 0, 0
    n = t.shape[0] + 2 * r, t.shape[1] + 2 * r
    c = np.fft.irfft2(np.conj(np.fft.rfft2(t, n)) * np.fft.rfft2(q, n), n)
    c = np.roll(c, (r, r), (0, 1))[:2 * r + 1, :2 * r + 1]
    if c[r, r] >= c.max() - 0.5:  # no shift beats staying put: keep (0, 0)
        return 0, 0
    dy, dx = np.unravel_index(int(np.argmax(c)), c.shape)
    return int(dy) - r, int(dx) - r


def moved(truth: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``truth`` moved by (dy, dx); pixels moved in from outside are IGNORE."""
    out = np.full_like(truth, IGNORE)
    h, w = truth.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        truth[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def near_edge(truth: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` px (chessboard distance) of a place where the truth changes class."""
    edge = np.zeros(truth.shape, bool)
    edge[1:] |= truth[1:] != truth[:-1]
    edge[:-1] |= truth[1:] != truth[:-1]
    edge[:, 1:] |= truth[:, 1:] != truth[:, :-1]
    edge[:, :-1] |= truth[:, 1:] != truth[:, :-1]
    for _ in range(width - 1):
        grown = edge.copy()
        grown[1:] |= edge[:-1]
        grown[:-1] |= edge[1:]
        grown[:, 1:] |= grown[:, :-1].copy()
        grown[:, :-1] |= grown[:, 1:].copy()
        edge = grown
    return edge


def audit(chips: list, k: int, r: int) -> list[list[str]]:
    rows = []
    for split in ("train", "val", "test"):
        mine = [(t, p) for s, t, p in chips if s == split]
        if not mine:
            continue
        cm = np.zeros((k, k), np.int64)
        cm_moved = np.zeros((k, k), np.int64)
        wrong = 0
        near = dict.fromkeys(BANDS, 0)
        shifted = 0
        for t, p in mine:
            cm += metrics.confusion_matrix(p, t, k)
            dy, dx = best_shift(t, p, r)
            shifted += (dy, dx) != (0, 0)
            cm_moved += metrics.confusion_matrix(p, moved(t, dy, dx), k)
            bad = (p != t) & (t != IGNORE)
            wrong += int(bad.sum())
            for w in BANDS:
                near[w] += int((bad & near_edge(t, w)).sum())
        rows.append([split, len(mine), f"{metrics.mean_iou(cm):.3f}", f"{metrics.mean_iou(cm_moved):.3f}",
                     f"{shifted}/{len(mine)}", f"{metrics.pixel_accuracy(cm):.3f}"]
                    + [f"{near[w] / max(wrong, 1):.2f}" for w in BANDS])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsn", help="audit a model in this database (with --dataset and --model); "
                                  "default: train one on the Banepa data in a scratch database")
    ap.add_argument("--dataset")
    ap.add_argument("--model")
    ap.add_argument("--epochs", type=int, default=30, help="epochs of the defaults when training here")
    ap.add_argument("--framework", default="mxnet", choices=["mxnet", "torch"])
    ap.add_argument("--shift", type=int, default=32, help="largest shift tried per chip, in px")
    args = ap.parse_args()
    if args.dsn and not (args.dataset and args.model):
        ap.error("--dsn needs --dataset and --model")
    print(conditions())
    if args.dsn:
        chips, k = chips_and_predictions(args.dsn, args.dataset, args.model)
        what = f"model {args.model} on dataset {args.dataset}"
    else:
        data = SHARED_DATA / "banepa"
        if not (data / "imagery").is_dir():
            print(f"skipped: the Banepa data is not at {data} (set PGGEOLEARN_DATA)")
            return
        from pggeolearn import training

        with scratch_database() as dsn:
            dataset = build_dataset(dsn, data)
            training.train(dsn, dataset, "audit", framework=args.framework, epochs=args.epochs,
                           overwrite=True, progress=False, device="cpu")
            chips, k = chips_and_predictions(dsn, dataset, "audit")
        what = f"Banepa buildings, the defaults ({args.framework}) trained {args.epochs} epochs"
    print_table(f"Where the wrong pixels are: {what}",
                ["split", "chips", "mIoU", f"mIoU, labels moved (<= {args.shift} px)", "chips moved",
                 "pixel accuracy"] + [f"wrong px within {w} px of an edge" for w in BANDS],
                audit(chips, k, args.shift))


if __name__ == "__main__":
    main()
