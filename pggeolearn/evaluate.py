"""Evaluate a model on the chips of a dataset split: numbers, a map layer and the worst tiles.

``evaluate(dsn, model, dataset=..., split="test")`` runs the model over every chip of the split
that has imagery (``pggeolearn.chips``, read as WKB in tile order, decoded with
:mod:`pggeolearn.wkb`) and reports

* the **confusion matrix** (rows: true class, columns: predicted) and per-class **IoU / F1**,
  mean IoU and pixel accuracy (:mod:`pggeolearn.training.metrics`), pixels where the image is
  NODATA in every band left out;
* optionally a **per-tile metrics layer** for QGIS (``out_layer``): each chip's footprint
  (``geometry(Polygon, srid)``, GiST index) with ``pixel_accuracy``, ``miou`` and one
  ``iou_<class>`` column per class, styled graduated by ``miou`` (red 0 -> green 1) in
  ``public.layer_styles``, so weak areas show on the map;
* optionally a **PNG of the worst tiles** (lowest mIoU): image, truth and prediction side by
  side, one row per tile;

and records a run (``pggeolearn.runs``, kind ``evaluate``) with the metrics. The layer is
written in one transaction with the run's ``done`` status: a failure leaves no layer behind.
"""

from __future__ import annotations

import heapq
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from tqdm import tqdm

from pggeolearn import errors, outputs, palette, runs, wkb
from pggeolearn.db.connect import connect, dsn_of
from pggeolearn.db.errors import db_errors
from pggeolearn.db.schema import require_schema
from pggeolearn.predict import (
    Predictor,
    call_model,
    check_pixel_types,
    input_pixel_types,
    load_model,
    model_class_ids,
    relkind,
)
from pggeolearn.resources import sql_text
from pggeolearn.training import metrics
from pggeolearn.tta import TTA

__all__ = ["EvalReport", "TileScore", "evaluate"]

IGNORE = metrics.IGNORE  # truth value of pixels left out of the metrics
MIOU_RANGES = list(palette.IOU_RANGES)


@dataclass(order=True)
class TileScore:
    """One chip's scores (``iou`` per class channel; NaN where undefined)."""

    miou: float
    tile_id: int
    accuracy: float = field(compare=False)
    iou: list[float] = field(compare=False)
    pixels: int = field(compare=False)
    loss: float = field(default=math.nan, compare=False)  # mean cross-entropy of valid pixels


@dataclass
class EvalReport:
    """What :func:`evaluate` did; ``str()`` is what the CLI prints."""

    run_id: int
    model: str
    dataset: str
    split: str
    class_names: list[str]
    confusion: np.ndarray
    scores: metrics.Scores
    tiles: int
    out_layer: str | None = None
    png: Path | None = None
    worst: list[TileScore] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def confusion_table(self) -> str:
        names = self.class_names
        headers = ["true \\ predicted", *names, "total"]
        rows = [[names[i], *(str(int(v)) for v in row), str(int(row.sum()))]
                for i, row in enumerate(self.confusion)]
        rows.append(["total", *(str(int(v)) for v in self.confusion.sum(0)), str(int(self.confusion.sum()))])
        return metrics.text_table(headers, rows)

    def __str__(self) -> str:
        s = self.scores
        lines = [
            f"run {self.run_id}: model {self.model} on dataset {self.dataset}, split {self.split}: "
            f"{self.tiles} tiles, {s.pixels} pixels in {self.seconds:.1f} s",
            f"mIoU {_f(s.miou)}, mean F1 {_f(s.mean_f1)}, pixel accuracy {_f(s.accuracy)}",
            "",
            metrics.format_table({self.model: s}, self.class_names),
            "",
            "confusion matrix (pixels):",
            self.confusion_table(),
        ]
        if self.worst:
            lines += ["", "worst tiles: " + ", ".join(f"{t.tile_id} (mIoU {_f(t.miou)})" for t in self.worst)]
        if self.out_layer:
            lines.append(f"per-tile layer {self.out_layer}: footprints with pixel_accuracy, miou, "
                         "iou_<class>; styled by miou for QGIS")
        if self.png:
            lines.append(f"worst tiles image: {self.png}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _f(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.3f}"


def _column_names(classes: dict[int, str]) -> list[str]:
    """``iou_<name>`` per class (sanitized, unique, <= 63 bytes), else ``iou_<id>``."""
    used: set[str] = set()
    out = []
    for cid in sorted(classes):
        base = re.sub(r"[^a-z0-9_]+", "_", str(classes[cid]).lower()).strip("_")
        name = f"iou_{base}" if base else f"iou_{cid}"
        if name in used or len(name.encode()) > 63 or name in ("iou_", "miou"):
            name = f"iou_{cid}"
        used.add(name)
        out.append(name)
    return out


def _rgb(image: np.ndarray, nodata: tuple) -> np.ndarray:
    """(H, W, 3) uint8 for display: the first three bands (or the first, as gray)."""
    bands = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    if bands.dtype != np.uint8:  # 16-bit, float: stretched (2-98 %) over the valid pixels
        valid = wkb.valid_mask(image, nodata)
        vals = bands[:, valid].astype(np.float64)
        lo, hi = np.percentile(vals, [2, 98]) if vals.size else (0.0, 1.0)
        bands = np.clip((bands.astype(np.float64) - lo) / max(hi - lo, 1e-9) * 255, 0, 255)
    return np.ascontiguousarray(np.moveaxis(bands, 0, -1)).astype(np.uint8)


def _colour(classes_idx: np.ndarray, colours: np.ndarray) -> np.ndarray:
    return colours[np.clip(classes_idx, 0, len(colours) - 1)]


def _write_png(path: Path, worst: list[tuple[TileScore, np.ndarray, np.ndarray, np.ndarray]],
               class_ids: np.ndarray, class_names: list[str], tile_px: int) -> Path:
    from PIL import Image, ImageDraw

    from pggeolearn import publish

    pal = publish.palette({int(c): "" for c in class_ids})
    colours = np.zeros((256, 3), np.uint8)
    for k, cid in enumerate(class_ids):
        colours[k] = palette.BACKGROUND_PNG if cid == 0 else pal[int(cid)]
    colours[IGNORE] = palette.IGNORE_RGB
    size = min(tile_px, 256)
    pad, caption = 6, 16
    width = 3 * size + 4 * pad
    legend = 18
    height = legend + len(worst) * (size + caption + pad) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    x = pad
    for k, name in enumerate(class_names):
        draw.rectangle([x, 4, x + 10, 14], fill=tuple(int(v) for v in colours[k]))
        draw.text((x + 14, 3), name, fill=(0, 0, 0))
        x += 24 + 7 * len(name)
    y = legend
    for score, img, truth, pred in worst:
        draw.text((pad, y + 2), f"tile {score.tile_id}   mIoU {_f(score.miou)}   accuracy "
                                f"{_f(score.accuracy)}   (image | truth | prediction)", fill=(0, 0, 0))
        y += caption
        for i, arr in enumerate((img, _colour(truth, colours), _colour(pred, colours))):
            tile = Image.fromarray(arr)
            if tile.size != (size, size):
                tile = tile.resize((size, size), Image.NEAREST)
            sheet.paste(tile, (pad + i * (size + pad), y))
        y += size + pad
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def evaluate(dsn_or_conn: psycopg.Connection | str | None, model: str | Predictor, *, dataset: str,
             split: str = "test", out_layer: str | None = None, png: str | Path | None = None,
             n_worst: int = 8, batch_size: int = 8, overwrite: bool = False, force: bool = False,
             device: str | None = None, progress: bool = True, tta: bool = False) -> EvalReport:
    """Score ``model`` on the chips of ``dataset``'s ``split`` (see the module docstring).

    ``tta``: average the model over flips and 90° rotations (:mod:`pggeolearn.tta`, 8x slower).

    ``out_layer``: a table name for the per-tile layer (AlreadyExists unless ``overwrite``; only
    pggeolearn's own tables are replaced unless ``force``, see :mod:`pggeolearn.outputs`);
    ``png``: where to draw the ``n_worst`` tiles with the lowest mIoU.
    """
    from pggeolearn import datasets, publish

    started = time.perf_counter()
    if not 1 <= batch_size <= 4096:
        raise errors.ConfigError(f"batch size must be 1..4096, not {batch_size}")
    if not 0 <= n_worst <= 256:
        raise errors.ConfigError(f"worst tiles must be 0..256, not {n_worst}")
    layer = outputs.Output.parse(out_layer, what="--out-layer") if out_layer else None
    dsn = dsn_of(dsn_or_conn)
    with connect(dsn, autocommit=True, application_name="pggeolearn evaluate") as control:
        require_schema(control)
        outputs.check(control, [layer] if layer else [], overwrite=overwrite, force=force,
                      can_append=False)
        layer = layer.table.parts if layer else None
        p = load_model(control, model, device=device)
        model_name = model if isinstance(model, str) else str(p.name)
        if tta:
            p = TTA(p)
        ds = datasets.get(control, dataset)
        dataset = ds.name  # "NAME@N" of the current version N is NAME
        r = ds.recipe
        notes: list[str] = ["test-time augmentation: the mean over 8 flips and rotations"] if tta else []
        if int(p.tile_px) != r.tile_px:
            raise errors.ConfigError(f"model {model_name} takes {p.tile_px} px tiles, dataset {dataset}'s "
                                     f"chips are {r.tile_px} px (use pggeolearn predict --dataset)")
        if r.srid != int(p.srid) or abs(r.resolution - float(p.resolution)) > 1e-6 * r.resolution:
            notes.append(f"model {model_name} expects EPSG:{p.srid} at {float(p.resolution):.6g}, the chips "
                         f"are EPSG:{r.srid} at {r.resolution:.6g}: scored on the chips as they are")
        unknown = sorted(set(r.classes) - set(p.classes))
        if unknown:
            notes.append(f"label classes {unknown} are not classes of the model: their pixels are left out")
        with db_errors(f"chips of {dataset}"):
            n = control.execute("SELECT count(*) FROM pggeolearn.chips WHERE dataset = %s AND split = %s"
                                " AND image IS NOT NULL", [dataset, split]).fetchone()[0]
        if not n:
            raise errors.NotBuilt(f"dataset {dataset} has no chips with imagery in split {split!r} "
                                  "(pggeolearn chips build / chips split)")
        params = {"dataset": dataset, "split": split, "out_layer": out_layer,
                  "png": str(png) if png else None, "batch_size": batch_size, "tta": tta}
        with runs.Run.start(dsn, "evaluate", model=model_name, dataset=dataset, params=params) as run:
            report = _run(dsn, p, model_name, ds, split, n, run.run_id, layer=layer, png=png,
                          n_worst=n_worst, batch_size=batch_size, progress=progress, notes=notes,
                          publish=publish, started=started)
        from pggeolearn.qgis.project import refresh_after

        report.notes += refresh_after(control, model_name, dataset)  # the dataset's QGIS project
    return report


def _run(dsn, p: Predictor, model_name: str, ds, split: str, n: int, run_id: int, *, layer, png,
         n_worst: int, batch_size: int, progress: bool, notes: list[str], publish, started: float
         ) -> EvalReport:
    class_ids = model_class_ids(p)
    k = len(class_ids)
    lut = np.full(256, IGNORE, np.uint8)  # label class id -> model channel
    lut[class_ids] = np.arange(k, dtype=np.uint8)
    names = [str(p.classes[int(c)]) for c in class_ids]
    want_types = input_pixel_types(p)
    cm = np.zeros((k, k), np.int64)
    per_tile: list[tuple[TileScore, bytes]] = []
    heap: list[tuple[float, int, Any]] = []  # the n worst: (-miou, -tile_id, payload)

    def flush(batch: list) -> None:
        nonlocal cm
        x = np.stack([b[1] for b in batch])
        y = call_model(p, x, k)
        pred = y.argmax(axis=1).astype(np.uint8)
        for (tile_id, img, truth, nodata, geom), pr, probs in zip(batch, pred, y, strict=True):
            t = np.where(wkb.valid_mask(img, nodata), lut[truth], IGNORE)
            tcm = metrics.confusion_matrix(pr, t, k)
            cm += tcm
            iou = metrics.iou_per_class(tcm)
            score = TileScore(metrics.mean_iou(tcm), tile_id, metrics.pixel_accuracy(tcm),
                              [float(v) for v in iou], int(tcm.sum()), _loss(probs, t))
            per_tile.append((score, geom))
            if n_worst and math.isfinite(score.miou):
                item = (-score.miou, -tile_id, (score, _rgb(img, nodata), t, pr))
                if len(heap) < n_worst:
                    heapq.heappush(heap, item)
                else:
                    heapq.heappushpop(heap, item)

    with connect(dsn, application_name="pggeolearn evaluate reader") as rconn, rconn.transaction(), \
            rconn.cursor(name="pggeolearn_eval", binary=True) as cur, \
            tqdm(total=n, unit="tile", desc=f"evaluate {model_name}", disable=not progress, leave=False) as bar:
        cur.itersize = max(8, batch_size)
        with db_errors(f"chips of {ds.name}"):
            cur.execute(sql_text("predict_eval_chips"), {"dataset": ds.name, "split": split})
            batch: list = []
            for tile_id, image, label, geom in cur:
                img = wkb.decode(image, copy=True)
                lab = wkb.decode(label)
                if img.bands != int(p.bands) or img.width != int(p.tile_px) or img.height != int(p.tile_px):
                    raise errors.ChipError(f"chip {tile_id} of {ds.name} is {img.bands} x {img.height} x "
                                           f"{img.width}; model {model_name} takes {p.bands} x {p.tile_px}"
                                           f" x {p.tile_px}")
                if img.pixel_types != want_types:
                    check_pixel_types(p, model_name, img.pixel_types, f"chip {tile_id} of {ds.name}")
                batch.append((tile_id, img.data, np.asarray(lab.data[0], np.uint8), img.nodata, bytes(geom)))
                if len(batch) == batch_size:
                    flush(batch)
                    bar.update(len(batch))
                    batch = []
            if batch:
                flush(batch)
                bar.update(len(batch))

    scores = metrics.scores(cm)
    worst = [item[2] for item in sorted(heap, key=lambda it: (-it[0], -it[1]))]
    report = EvalReport(run_id, model_name, ds.name, split, names, cm, scores, len(per_tile),
                        worst=[w[0] for w in worst], notes=notes)
    if png is not None and worst:
        report.png = _write_png(Path(png), worst, class_ids, names, int(p.tile_px))
    with connect(dsn, application_name="pggeolearn evaluate writer") as w, w.transaction():
        _write_scores(w, model_name, run_id, ds.name, split, per_tile)
        if layer is not None:
            _write_layer(w, layer, per_tile, p, names, ds.recipe.srid, split, model_name, run_id, publish)
            report.out_layer = f"{layer[0]}.{layer[1]}"
        report.seconds = time.perf_counter() - started
        outputs = {"metrics": scores.to_json(), "class_names": names, "confusion": cm.tolist(),
                   "tiles": report.tiles, "out_layer": report.out_layer,
                   "png": str(report.png) if report.png else None,
                   "worst": [t.tile_id for t in report.worst], "seconds": round(report.seconds, 3)}
        runs.finish(w, run_id, outputs)
    return report


def _loss(probs: np.ndarray, truth: np.ndarray) -> float:
    """Mean cross-entropy of one chip's valid pixels: ``probs`` (k, H, W), ``truth`` channel ids
    with IGNORE where left out. NaN when no pixel counts."""
    valid = truth != IGNORE
    if not valid.any():
        return math.nan
    p_true = np.take_along_axis(probs, np.where(valid, truth, 0)[None].astype(np.int64), 0)[0]
    return float(-np.log(np.clip(p_true[valid], 1e-7, 1.0)).mean())


def _write_scores(w: psycopg.Connection, model: str, run_id: int, dataset: str, split: str,
                  per_tile: list[tuple[TileScore, bytes]]) -> None:
    """Every scored chip into pggeolearn.chip_scores, so the next training's sampling query can
    weigh hard examples (see docs/ml.md)."""
    def num(v: float) -> float | None:
        return v if math.isfinite(v) else None

    with w.cursor() as cur:
        cur.executemany(
            "INSERT INTO pggeolearn.chip_scores (model, run_id, dataset, split, tile_id, loss, miou, "
            "accuracy, pixels) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [(model, run_id, dataset, split, s.tile_id, num(s.loss), num(s.miou), num(s.accuracy),
              s.pixels) for s, _ in per_tile])


def _write_layer(w: psycopg.Connection, layer: tuple[str, str], per_tile, p: Predictor, names: list[str],
                 srid: int, split: str, model_name: str, run_id: int, publish) -> None:
    schema, name = layer
    ident = sql.Identifier(schema, name)
    w.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    cols = _column_names({int(c): n for c, n in zip(model_class_ids(p), names, strict=True)})
    if relkind(w, schema, name) is not None:
        w.execute(sql.SQL("DROP TABLE {}").format(ident))
    w.execute(sql.SQL(sql_text("predict_eval_layer")).format(
        table=ident, srid=sql.Literal(int(srid)),
        iou_columns=sql.SQL(",\n    ").join(sql.SQL("{} real").format(sql.Identifier(c)) for c in cols)))
    insert = sql.SQL("INSERT INTO {} (tile_id, split, pixels, pixel_accuracy, miou, {}, model, run_id, geom) "
                     "VALUES (%s, %s, %s, %s, %s, {}, %s, %s, ST_SetSRID(ST_GeomFromWKB(%b), %s))").format(
        ident, sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(", ").join([sql.Placeholder()] * len(cols)))

    def num(v: float) -> float | None:
        return v if math.isfinite(v) else None

    rows = [(s.tile_id, split, s.pixels, num(s.accuracy), num(s.miou), *(num(v) for v in s.iou),
             model_name, run_id, geom, int(srid)) for s, geom in per_tile]
    with w.cursor() as cur:
        cur.executemany(insert, rows)
    publish.publish_vector(w, f"{schema}.{name}")
    publish.save_style(w, f"{schema}.{name}", publish.graduated_qml("miou", MIOU_RANGES),
                       geometry_column="geom", geometry_type="Polygon", name=f"{name} by mIoU",
                       description=f"pggeolearn evaluate, model {model_name}, split {split}")
    w.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(ident, sql.Literal(
        f"pggeolearn evaluate: per-tile metrics of model {model_name} on split {split} (run {run_id})")))
