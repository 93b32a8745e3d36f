"""What holds a model's test mIoU down: where its wrong pixels lie against the labels.

Run: ``python benchmarks/bench_label_noise.py [--epochs 30] [--shift 32]`` (the Banepa data,
a scratch database, the defaults trained for a fixed number of epochs: the numbers do not depend
on the machine's load), or ``--dsn DSN --dataset NAME --model NAME`` to audit a trained model.

``--resolution-factor F`` builds the dataset at F x the imagery's pixel size (same recipe, 256 px
tiles: F^2 x the ground per chip, F^2 x fewer chips). For an integer F > 1 the native dataset is
built too, and the coarse model is also scored against the **native** labels: each native chip
is the (r % F, c % F) part of coarse tile (r // F, c // F); the coarse prediction of that part,
upsampled F x (nearest), is compared with the native label (table "native labels"), per native
split and per coarse split, beside a table of where the coarse splits lie on the native ones.
``--splits native`` gives the coarse tiles the native splits instead of their own: a coarse tile
whose F x F native tiles are all train is train, one holding a native test (else val) tile is
test (else val), any other is excluded; the native test area is then never trained on.
``--patience N`` passes N to training (0: no early stopping; default: the training default).

Per split (train, val, test), from the model's predictions of every chip:

* ``mIoU``: as ``evaluate`` scores it (NODATA left out);
* ``mIoU, labels moved``: each chip's label raster moved by the whole-pixel shift (within
  ``--shift`` px) that best matches the prediction, pixels moved in from outside left out: the
  most that co-registering labels and imagery tile by tile could add;
* ``wrong px near an edge``: the share of wrong pixels within 2, 4 and 8 px of a label edge
  (boundary disagreement) - the rest lies deeper inside objects or background;
* ``whole objects``: disagreement about whole objects rather than outlines - a predicted object
  (4-connected foreground) of at least ``--object-px`` px with at most 10 % of it labelled
  foreground, or a labelled object of that size with at most 10 % of it predicted: their share
  of the wrong pixels, and the mIoU with each counted as right. Both kinds are there: objects
  the labels miss (a roof not mapped) and objects the model gets wrong (a bus read as a roof),
  so the forgiven mIoU is the most that correcting the labels object by object could add, not
  what it would add. Foreground: every model channel but 0 (the lowest class id, background
  in a recipe that numbers it 0), classes lumped together.

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
from pggeolearn.predict.components import label_components  # noqa: E402
from pggeolearn.training import metrics  # noqa: E402

IGNORE = metrics.IGNORE
BANDS = (2, 4, 8)
OBJECT_OVERLAP = 0.1  # an object with at most this share on the other side counts as whole


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


def predictions_by_tile(dsn: str, dataset: str, model: str, batch: int = 8) -> dict[int, np.ndarray]:
    """``tile_id -> prediction`` (model channels) for every chip of ``dataset`` with imagery."""
    with connect(dsn) as conn:
        p = load_model(conn, model)
        rows = conn.execute("SELECT tile_id, ST_AsBinary(image) FROM pggeolearn.chips "
                            "WHERE dataset = %s AND image IS NOT NULL ORDER BY tile_id", [dataset]).fetchall()
    k = len(model_class_ids(p))
    out = {}
    for i in range(0, len(rows), batch):
        part = rows[i:i + batch]
        images = [wkb.decode(r[1], copy=True) for r in part]
        pred = call_model(p, np.stack([im.data for im in images]), k).argmax(axis=1)
        for (tid, _), pr in zip(part, pred, strict=True):
            out[int(tid)] = pr.astype(np.uint8)
    return out


def grid_info(dsn: str, dataset: str) -> tuple[int, float, float, float]:
    """(ncols, minx, maxy, resolution) of ``dataset``'s tile grid."""
    from pggeolearn import datasets

    with connect(dsn) as conn:
        r = datasets.get(conn, dataset).recipe
    return datasets.grid_shape(r)[0], r.extent[0], r.extent[3], r.resolution


def native_chips(dsn: str, dataset: str, lut: np.ndarray) -> dict[int, tuple]:
    """``tile_id -> (split, truth, upper-left x, y)`` of the native chips with imagery; truth in
    model channels, IGNORE where NODATA."""
    with connect(dsn) as conn:
        rows = conn.execute("SELECT tile_id, split, ST_AsBinary(image), ST_AsBinary(label), "
                            "ST_UpperLeftX(image), ST_UpperLeftY(image) FROM pggeolearn.chips "
                            "WHERE dataset = %s AND image IS NOT NULL", [dataset]).fetchall()
    out = {}
    for tid, split, image, label, ulx, uly in rows:
        im = wkb.decode(image, copy=True)
        truth = lut[np.asarray(wkb.decode(label).data[0], np.uint8)] if label is not None \
            else np.full(im.data.shape[1:], IGNORE, np.uint8)
        out[int(tid)] = (split, np.where(wkb.valid_mask(im.data, im.nodata), truth, IGNORE), ulx, uly)
    return out


def nesting(dsn: str, native: str, coarse: str, f: int):
    """``native tile_id -> coarse tile_id`` with a check that the grids nest: the coarse pixel
    size is f x the native one, the grids share their upper-left corner, and every native chip's
    upper-left corner is where its part of the coarse tile starts. Returns (parent, message)."""
    nc, nminx, nmaxy, nres = grid_info(dsn, native)
    cc, cminx, cmaxy, cres = grid_info(dsn, coarse)
    with connect(dsn) as conn:
        ul = dict((int(t), (x, y)) for t, x, y in conn.execute(
            "SELECT tile_id, ST_UpperLeftX(image), ST_UpperLeftY(image) FROM pggeolearn.chips "
            "WHERE dataset = %s AND image IS NOT NULL", [coarse]))
        nul = dict((int(t), (x, y)) for t, x, y in conn.execute(
            "SELECT tile_id, ST_UpperLeftX(image), ST_UpperLeftY(image) FROM pggeolearn.chips "
            "WHERE dataset = %s AND image IS NOT NULL", [native]))
    parent, worst = {}, 0.0
    for tid, (x, y) in nul.items():
        r, c = divmod(tid, nc)
        pid = (r // f) * cc + c // f
        parent[tid] = pid
        if pid in ul:
            px, py = ul[pid]
            tile_m = 256 * nres
            worst = max(worst, abs(px + (c % f) * tile_m - x), abs(py - (r % f) * tile_m - y))
    msg = (f"grids: native {nres!r} m/px, coarse {cres!r} m/px (ratio {cres / nres!r}); "
           f"upper-left corners native ({nminx!r}, {nmaxy!r}), coarse ({cminx!r}, {cmaxy!r}); "
           f"largest offset of a native chip from its place in its coarse tile: {worst:.3g} m "
           f"({worst / nres:.3g} native px)")
    return parent, msg


def native_splits_onto_coarse(dsn: str, native: str, coarse: str, parent: dict[int, int], f: int) -> str:
    """Give the coarse chips splits from the native ones (see the module docstring)."""
    from pggeolearn import chips as chips_mod

    with connect(dsn, autocommit=True) as conn:
        nsplit = dict((int(t), s) for t, s in conn.execute(
            "SELECT tile_id, split FROM pggeolearn.chips WHERE dataset = %s", [native]))
        coarse_ids = [int(t) for (t,) in conn.execute(
            "SELECT tile_id FROM pggeolearn.chips WHERE dataset = %s", [coarse])]
        kids: dict[int, list] = {t: [] for t in coarse_ids}
        for tid, pid in parent.items():
            kids.setdefault(pid, []).append(nsplit.get(tid))
        new = {}
        for t in coarse_ids:
            ks = kids.get(t, [])
            if len(ks) == f * f and all(k == "train" for k in ks):
                new[t] = "train"
            elif "train" in ks:
                new[t] = "excluded"
            elif "test" in ks:
                new[t] = "test"
            elif "val" in ks:
                new[t] = "val"
            else:
                new[t] = "excluded"
        with conn.transaction():
            for t, s in new.items():
                conn.execute("UPDATE pggeolearn.chips SET split = %s WHERE dataset = %s AND tile_id = %s",
                             [s, coarse, t])
        chips_mod.refresh_stats(conn, coarse)
    counts = {s: sum(v == s for v in new.values()) for s in ("train", "val", "test", "excluded")}
    return f"coarse splits from the native ones: {counts}"


def coverage(parent: dict[int, int], nat: dict, coarse_split: dict[int, str]) -> list[list]:
    """Native chips (with imagery) counted by (coarse split of their coarse tile, native split)."""
    names = ["train", "val", "test", "excluded"]
    rows = []
    for cs in names + [None]:
        row = [cs or "(no coarse chip)"]
        for ns in names:
            row.append(sum(1 for t, v in nat.items()
                           if (v[0] or "excluded") == ns and coarse_split.get(parent[t]) == cs))
        rows.append(row)
    return rows


def score_native(parent: dict[int, int], nat: dict, preds: dict[int, np.ndarray], f: int, k: int,
                 nc: int, key) -> list[list[str]]:
    """mIoU of the coarse predictions, upsampled f x, against the native labels, per ``key(t)``."""
    from collections import defaultdict

    cms = defaultdict(lambda: np.zeros((k, k), np.int64))
    n = defaultdict(int)
    part = 256 // f
    for t, (_split, truth, _, _) in nat.items():
        group = key(t)
        if group is None or parent[t] not in preds:
            continue
        r, c = divmod(t, nc)
        pr = preds[parent[t]][(r % f) * part:(r % f + 1) * part, (c % f) * part:(c % f + 1) * part]
        up = np.repeat(np.repeat(pr, f, axis=0), f, axis=1)
        cms[group] += metrics.confusion_matrix(up, truth, k)
        n[group] += 1
    rows = []
    for g in ("train", "val", "test"):
        if g in cms:
            cm = cms[g]
            rows.append([g, n[g], f"{metrics.mean_iou(cm):.3f}", f"{metrics.iou_per_class(cm)[-1]:.3f}",
                         f"{metrics.pixel_accuracy(cm):.3f}"])
    return rows


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


def whole_objects(truth: np.ndarray, pred: np.ndarray, min_px: int) -> tuple[np.ndarray, int]:
    """``truth`` with every whole-object disagreement (see the module docstring) set to the
    prediction, and the number of wrong pixels that changes. Foreground: any class but 0."""
    counted = truth != IGNORE
    fixed = truth.copy()
    for mine, theirs in (((pred != 0) & counted, (truth != 0) & counted),
                         ((truth != 0) & counted, pred != 0)):
        ids, kinds = label_components(mine.astype(np.uint8), skip=(0,))
        n = len(kinds)
        if not n:
            continue
        size = np.bincount(ids.ravel(), minlength=n + 1)
        other = np.bincount(ids.ravel(), weights=theirs.ravel(), minlength=n + 1)
        whole = (size >= min_px) & (other <= OBJECT_OVERLAP * size)
        whole[0] = False
        sel = whole[ids] & counted
        fixed[sel] = pred[sel]
    return fixed, int(((fixed != truth) & counted).sum())


def audit(chips: list, k: int, r: int, object_px: int) -> list[list[str]]:
    rows = []
    for split in ("train", "val", "test"):
        mine = [(t, p) for s, t, p in chips if s == split]
        if not mine:
            continue
        cm = np.zeros((k, k), np.int64)
        cm_moved = np.zeros((k, k), np.int64)
        wrong = 0
        near = dict.fromkeys(BANDS, 0)
        shifted = forgiven = 0
        cm_whole = np.zeros((k, k), np.int64)
        for t, p in mine:
            cm += metrics.confusion_matrix(p, t, k)
            dy, dx = best_shift(t, p, r)
            shifted += (dy, dx) != (0, 0)
            cm_moved += metrics.confusion_matrix(p, moved(t, dy, dx), k)
            bad = (p != t) & (t != IGNORE)
            wrong += int(bad.sum())
            for w in BANDS:
                near[w] += int((bad & near_edge(t, w)).sum())
            fixed, n_fixed = whole_objects(t, p, object_px)
            cm_whole += metrics.confusion_matrix(p, fixed, k)
            forgiven += n_fixed
        rows.append([split, len(mine), f"{metrics.mean_iou(cm):.3f}", f"{metrics.mean_iou(cm_moved):.3f}",
                     f"{shifted}/{len(mine)}", f"{metrics.pixel_accuracy(cm):.3f}"]
                    + [f"{near[w] / max(wrong, 1):.2f}" for w in BANDS]
                    + [f"{forgiven / max(wrong, 1):.2f}", f"{metrics.mean_iou(cm_whole):.3f}"])
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
    ap.add_argument("--object-px", type=int, default=500,
                    help="smallest object, in px, counted as a whole-object disagreement (default "
                         "500: 8.8 m2 on the ground at Banepa's 0.132 m pixels)")
    ap.add_argument("--resolution-factor", type=float, default=1.0,
                    help="build the dataset at this many times the imagery's pixel size (default 1)")
    ap.add_argument("--splits", default="own", choices=["own", "native"],
                    help="with an integer --resolution-factor > 1: the coarse dataset's own splits, "
                         "or the native dataset's carried over (see the module docstring)")
    ap.add_argument("--patience", type=int, default=None,
                    help="early-stopping patience for training (0: none; default: the training default)")
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

        f = args.resolution_factor
        f_int = int(round(f)) if f > 1 and abs(f - round(f)) < 1e-9 else None
        history = []
        with scratch_database() as dsn:
            native = None
            if f_int:
                native = build_dataset(dsn, data)
                dataset = build_dataset(dsn, data, f, load=False)
            else:
                dataset = build_dataset(dsn, data, f)
            parent = None
            if native:
                parent, msg = nesting(dsn, native, dataset, f_int)
                print(msg, flush=True)
                if args.splits == "native":
                    print(native_splits_onto_coarse(dsn, native, dataset, parent, f_int), flush=True)
            with connect(dsn) as conn:
                counts = dict(conn.execute("SELECT coalesce(split, 'none'), count(*) FROM pggeolearn.chips "
                                           "WHERE dataset = %s GROUP BY 1 ORDER BY 1", [dataset]).fetchall())
                _, _, _, res = grid_info(dsn, dataset)
            print(f"dataset {dataset}: {res:.4f} m/px (EPSG:3857 units), {256 * res:.1f} m per 256 px chip; "
                  f"chips per split: {counts}", flush=True)
            opts = {} if args.patience is None else {"patience": args.patience}
            rep = training.train(dsn, dataset, "audit", framework=args.framework, epochs=args.epochs,
                                 overwrite=True, progress=False, device="cpu",
                                 on_epoch=history.append, **opts)
            chips, k = chips_and_predictions(dsn, dataset, "audit")
            native_tables = []
            if native:
                preds = predictions_by_tile(dsn, dataset, "audit")
                with connect(dsn) as conn:
                    p = load_model(conn, "audit")
                    csplit = dict((int(t), s) for t, s in conn.execute(
                        "SELECT tile_id, coalesce(split, 'excluded') FROM pggeolearn.chips "
                        "WHERE dataset = %s AND image IS NOT NULL", [dataset]))
                ids = model_class_ids(p)
                lut = np.full(256, IGNORE, np.uint8)
                lut[ids] = np.arange(len(ids), dtype=np.uint8)
                nat = native_chips(dsn, native, lut)
                nc = grid_info(dsn, native)[0]
                native_tables = [
                    ("Where the coarse splits lie: native chips (with imagery) by the split of their "
                     "coarse tile (rows) and their native split (columns)",
                     ["coarse split", "native train", "native val", "native test", "native excluded"],
                     coverage(parent, nat, csplit)),
                    ("Coarse model against the NATIVE labels, by COARSE split (each coarse chip's "
                     f"prediction upsampled {f_int}x, all its native parts with imagery)",
                     ["coarse split", "native chips", "mIoU", "IoU building", "pixel accuracy"],
                     score_native(parent, nat, preds, f_int, k, nc, lambda t: csplit.get(parent[t]))),
                    ("Coarse model against the NATIVE labels, by NATIVE split (the native chips of each "
                     "split; a native chip whose coarse tile is coarse train was trained on)",
                     ["native split", "native chips", "mIoU", "IoU building", "pixel accuracy"],
                     score_native(parent, nat, preds, f_int, k, nc, lambda t: nat[t][0])),
                ]
        secs = [h["seconds"] for h in history]
        print_table(f"Training history ({args.framework}, {dataset}, patience "
                    f"{'default' if args.patience is None else args.patience}): {len(history)} epochs run"
                    f"{'' if len(history) == args.epochs else ' (stopped early)'}, best val epoch "
                    f"{rep.best_epoch}, seconds per epoch: "
                    f"median {float(np.median(secs)) if secs else float('nan'):.1f}, "
                    f"total {sum(secs):.0f}",
                    ["epoch", "lr", "train loss", "val mIoU", "seconds"],
                    [[h["epoch"], f"{h['lr']:.2e}", f"{h['train_loss']:.4f}", f"{h['val']['miou']:.3f}",
                      f"{h['seconds']:.1f}"] for h in history])
        for title, header, rows in native_tables:
            print_table(title, header, rows)
        what = (f"Banepa buildings, the defaults ({args.framework}) trained {args.epochs} epochs"
                + (f", {f:g}x the native pixel size" if f != 1 else "")
                + (", native splits" if native and args.splits == "native" else ""))
    print_table(f"Where the wrong pixels are: {what}",
                ["split", "chips", "mIoU", f"mIoU, labels moved (<= {args.shift} px)", "chips moved",
                 "pixel accuracy"] + [f"wrong px within {w} px of an edge" for w in BANDS]
                + [f"wrong px in whole objects (>= {args.object_px} px)", "mIoU, whole objects forgiven"],
                audit(chips, k, args.shift, args.object_px))


if __name__ == "__main__":
    main()
