"""Training orchestration, the same for MXNet and PyTorch: :func:`train_rank`, one process's
training (:func:`pggeolearn.training.launch.train` decides how many processes run it).

One call trains a U-Net on a dataset's ``train`` split straight from the chip store and
validates it after every epoch on the spatially held-out ``val`` split:

* **Data**: :class:`~pggeolearn.mxnet.GeoIter` (MXNet) or :func:`~pggeolearn.torch.make_loader`
  (PyTorch) over :class:`~pggeolearn.stream.GeoStream`; the shuffle and the flips/rotations are
  seeded by ``(seed, epoch)``; the padded samples of a last batch carry no loss.
* **Loss**: pixel cross entropy, optionally weighted per class by the train split's stored
  class frequencies (:func:`class_weights`: inverse frequency, normalized, clipped).
* **Schedule**: Adam; the learning rate follows a cosine (or step) schedule per batch. With a
  time limit the schedule's progress is the larger of the epochs done and the time used, so
  the rate has annealed when the clock runs out.
* **Validation**: loss, confusion matrix, per-class IoU and F1, mean IoU, next to the trivial
  baselines (all background; the train split's majority class) on the same split.
* **Early stopping** when val mIoU has not improved for ``patience`` epochs (by default only
  with a constant rate: an annealing schedule runs to its end); the best epoch's weights are the
  model that is stored.
* **Checkpoints in the database**: a ``pggeolearn.runs`` row (kind ``train``) records the
  parameters and, after every epoch, the per-epoch metrics and a checkpoint (weights, optimizer
  state, best weights, history). ``resume=True`` continues from it exactly where it stopped.
  Ctrl-C stops at once: the last finished epoch's checkpoint is in the run row, the best model
  so far is saved, and the report says how to resume.
* The model is stored in the registry (:mod:`pggeolearn.training.registry`) at the end.
* **Several processes** (``nproc``, torchrun, MXNet's launcher): each rank trains on its shard
  of every split in a :class:`~pggeolearn.training.group.Group`; the ranks take equal step
  counts, agree on each step's loss denominator, learning rate and stop request, sum the val
  confusion matrices; rank 0 alone writes the run, checkpoints and model
  (:mod:`pggeolearn.training.launch`).

Only numpy and the database are imported here; the framework module is imported on demand.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from tqdm import tqdm

from pggeolearn import __version__, datasets, errors, runs
from pggeolearn.db.connect import connect
from pggeolearn.db.errors import db_errors
from pggeolearn.db.schema import require_schema
from pggeolearn.training import metrics as M
from pggeolearn.training.common import (
    LOSSES,
    Architecture,
    StepSync,
    json_safe,
    map_error,
    parse_device,
)
from pggeolearn.training.group import Group
from pggeolearn.training.registry import ModelRecord

__all__ = ["EarlyStopping", "TrainOptions", "TrainReport", "class_weights", "label_lut", "lr_at",
           "parse_device", "split_counts", "train_rank"]

log = logging.getLogger(__name__)
NAME_RE = datasets.NAME_RE
SCHEDULES = ("cosine", "step", "constant")
FRAMEWORKS = ("mxnet", "torch")
MAX_WEIGHT_RATIO = 10.0  # the rarest class weighs at most 10x the most common
MIN_LR_FRACTION = 0.01
DATA_WAIT_WARN = 0.05  # an epoch that waits longer than this share of its time for chips warns
# epochs without a better val mIoU: only for --schedule constant. An annealing schedule (cosine,
# step) and a time limit decide the end themselves: Banepa's val mIoU swings by 0.05-0.09 from
# epoch to epoch, so patience 5 ended the cosine run of 30 epochs after 11, before the rate had
# annealed (test mIoU 0.674 from epoch 6's weights; all 30: 0.723, bench_label_noise)
DEFAULT_PATIENCE = 5
CHECKPOINT_FORMAT = "pggeolearn-checkpoint/1"
DEFAULTS = {"framework": "mxnet", "width": 16, "depth": 3, "stem_stride": 2, "batch_size": 8,
            "lr": 1e-3, "schedule": "cosine", "seed": 0, "class_weights": True, "augment": True,
            "weight_decay": 0.0, "loss": "ce", "jitter": 0.0, "block": "plain", "head": "refine"}
# what a checkpoint fixes: changing it on --resume would train another model
FIXED_ON_RESUME = ("framework", "width", "depth", "stem_stride", "batch_size", "lr", "schedule",
                   "seed", "class_weights", "augment", "weight_decay", "loss", "jitter", "block", "head")


# ----------------------------------------------------------------------------------------------
# small pure helpers (also used by the framework modules)


def label_lut(class_ids: Sequence[int]) -> np.ndarray | None:
    """Class id -> output channel (a 256-entry uint8 table) when the ids are not simply
    0..K-1 (e.g. classes 1 and 5: channels 0, 1, 2 are ids 0, 1, 5); None when they are."""
    ids = list(class_ids)
    if ids == list(range(len(ids))):
        return None
    lut = np.zeros(256, np.uint8)  # ids outside the recipe (there should be none): background
    lut[ids] = np.arange(len(ids), dtype=np.uint8)
    return lut


def class_weights(class_pixels: dict[str, int] | None, class_ids: int | Sequence[int]) -> np.ndarray | None:
    """Per-class loss weights (in channel order, ``class_ids`` ascending; an int ``n`` means
    ids 0..n-1) from the train split's class pixel counts: inverse frequency relative to the
    most common class, clipped at ``MAX_WEIGHT_RATIO`` (a class with no train pixels gets the
    clip: it cannot be learned, but must not be ignored), then normalized so that the average
    train pixel weighs 1."""
    if not class_pixels:
        return None
    ids = list(range(class_ids)) if isinstance(class_ids, int) else list(class_ids)
    num_classes = len(ids)
    channel = {cid: i for i, cid in enumerate(ids)}
    counts = np.zeros(num_classes, np.float64)
    for k, v in class_pixels.items():
        if int(k) in channel:
            counts[channel[int(k)]] = float(v)
    total = counts.sum()
    if total <= 0:
        return None
    freq = counts / total
    w = np.full(num_classes, MAX_WEIGHT_RATIO)
    present = freq > 0
    w[present] = np.minimum(freq.max() / freq[present], MAX_WEIGHT_RATIO)
    w /= float((freq * w).sum())
    return w.astype(np.float32)


def lr_at(schedule: str, base_lr: float, progress: float) -> float:
    """The learning rate at ``progress`` (0..1) of training: cosine from ``base_lr`` down to
    1 % of it; step: x0.1 at 60 % and again at 85 %; constant."""
    p = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        lo = base_lr * MIN_LR_FRACTION
        return lo + 0.5 * (base_lr - lo) * (1 + math.cos(math.pi * p))
    if schedule == "step":
        return base_lr * (0.1 if p >= 0.6 else 1.0) * (0.1 if p >= 0.85 else 1.0)
    return base_lr


class EarlyStopping:
    """Patience on validation mIoU: ``update()`` after each epoch says whether it improved (by
    more than ``min_delta``); ``should_stop`` once ``patience`` epochs in a row did not
    (``patience=0``: never). Epochs count from 1."""

    def __init__(self, patience: int, min_delta: float = 1e-6):
        self.patience, self.min_delta = int(patience), float(min_delta)
        self.best, self.best_epoch, self.bad, self.epoch = -math.inf, None, 0, 0

    def update(self, value: float) -> bool:
        self.epoch += 1
        if value is not None and math.isfinite(value) and value > self.best + self.min_delta:
            self.best, self.best_epoch, self.bad = float(value), self.epoch, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best_miou": self.best if math.isfinite(self.best) else None,
                "best_epoch": self.best_epoch, "bad_epochs": self.bad, "epoch": self.epoch}

    def restore(self, state: dict[str, Any]) -> None:
        best = state.get("best_miou")
        self.best = -math.inf if best is None else float(best)
        self.best_epoch, self.bad, self.epoch = state["best_epoch"], state["bad_epochs"], state["epoch"]


# ----------------------------------------------------------------------------------------------
# options and report


@dataclass
class TrainOptions:
    """What :func:`~pggeolearn.training.launch.train` accepts. ``None`` means the default
    (:data:`DEFAULTS`), or on ``resume`` the value the checkpoint was trained with; an explicit
    value that differs from the checkpoint's is a ConfigError. ``epochs`` is the total (on resume:
    including those done)."""

    framework: str | None = None
    epochs: int = 20
    batch_size: int | None = None
    lr: float | None = None
    schedule: str | None = None
    device: str = "auto"
    seed: int | None = None
    width: int | None = None
    depth: int | None = None
    stem_stride: int | None = None
    class_weights: bool | None = None
    augment: bool | None = None
    weight_decay: float | None = None
    loss: str | None = None  # "ce" or "ce+dice"
    jitter: float | None = None  # colour jitter strength with augment (0: flips/rotations only)
    block: str | None = None  # "plain" or "residual" U-Net levels
    head: str | None = None  # after a stem: "refine" (full-resolution conv) or "bilinear" logits
    patience: int | None = None  # None: DEFAULT_PATIENCE with schedule "constant", else off
    time_limit_min: float | None = None
    overwrite: bool = False
    resume: bool = False
    force: bool = False  # resume onto another dataset or recipe all the same
    plot: str | Path | None = None
    progress: bool = True
    on_epoch: Callable[[dict[str, Any]], None] | None = None  # called after every epoch
    sampling: str | None = None  # SQL (tile_id, weight) over the chip store: weighted train epochs
    read_dsns: tuple[str, ...] = ()  # stream chips from these servers (primary + replicas)
    score_chips: bool = False  # after training: each train chip's loss and IoU -> chip_scores
    # called in every rank after each train step: (rank, epoch, tile ids of the unpadded chips)
    on_chips: Callable[[int, int, np.ndarray], None] | None = None

    def resolved(self, stored: dict[str, Any] | None = None) -> TrainOptions:
        """A copy with every None filled from ``stored`` (a checkpoint's) or the defaults."""
        out = replace(self)
        for k in DEFAULTS:
            mine = getattr(self, k)
            if stored is not None and k in stored:
                if mine is not None and mine != stored[k]:
                    raise errors.ConfigError(
                        f"--{k.replace('_', '-')} {mine} differs from the checkpoint's {stored[k]} "
                        "(leave it out to resume, or train a new model)")
                setattr(out, k, stored[k])
            elif mine is None:
                setattr(out, k, DEFAULTS[k])
        if out.patience is None:  # the schedule's end or the budget, not a patience, ends a run
            out.patience = DEFAULT_PATIENCE if out.schedule == "constant" and not out.time_limit_min else 0
        return out

    def validate(self) -> None:
        if self.framework not in FRAMEWORKS:
            raise errors.ConfigError(f"framework must be one of {', '.join(FRAMEWORKS)}, not {self.framework!r}")
        if self.schedule not in SCHEDULES:
            raise errors.ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise errors.ConfigError(f"epochs must be >= 1, not {self.epochs}")
        if self.batch_size < 1:
            raise errors.ConfigError(f"batch size must be >= 1, not {self.batch_size}")
        if not self.lr > 0:
            raise errors.ConfigError(f"learning rate must be > 0, not {self.lr}")
        if self.patience < 0:
            raise errors.ConfigError("patience must be >= 0 (0: no early stopping)")
        if self.time_limit_min is not None and self.time_limit_min <= 0:
            raise errors.ConfigError("time limit must be > 0 minutes")
        if self.loss not in LOSSES:
            raise errors.ConfigError(f"loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if not 0 <= self.jitter < 1:
            raise errors.ConfigError(f"colour jitter must be in [0, 1), not {self.jitter}")
        if self.weight_decay < 0:
            raise errors.ConfigError("weight decay must be >= 0")
        if self.seed < 0:
            raise errors.ConfigError("seed must be >= 0")
        parse_device(self.device)
        if self.plot is not None:
            folder = Path(self.plot).parent
            if not folder.is_dir():
                raise errors.ConfigError(f"folder {folder} for the plot does not exist")

    def hyperparameters(self) -> dict[str, Any]:
        """What the model registry and the run row record."""
        return {k: getattr(self, k) for k in ("batch_size", "lr", "schedule", "seed", "class_weights",
                                             "augment", "weight_decay", "loss", "jitter", "epochs",
                                             "patience", "time_limit_min")} | {"optimizer": "adam"}


@dataclass
class TrainReport:
    """What training did; ``str()`` is the table the CLI prints."""

    model: str
    dataset: str
    framework: str
    device: str
    run_id: int
    classes: dict[int, str]
    history: list[dict[str, Any]]
    best_epoch: int | None
    best: M.Scores | None
    baselines: dict[str, M.Scores]
    stopped: str
    seconds: float
    epochs_asked: int
    resumed_from: int | None = None
    saved: bool = False
    plot: Path | None = None
    val_chips: int = 0
    train_chips: int = 0
    notes: list[str] = field(default_factory=list)
    nproc: int = 1
    rank: int = 0  # data parallel: only rank 0's report has the model and the run
    weights_sha256: str | None = None  # of the final weights (data parallel: each rank's, equal)
    rank_weights: list[str] = field(default_factory=list)  # --nproc: weights_sha256 of every rank

    @property
    def interrupted(self) -> bool:
        return self.stopped.startswith("interrupted")

    def epoch_table(self) -> str:
        names = [self.classes[k] for k in sorted(self.classes)]
        headers = ["epoch", "lr", "train loss", "val loss", "val mIoU"] + [f"IoU {n}" for n in names] \
            + ["seconds", "data wait"]
        rows = []
        for h in self.history:
            mark = "*" if h["epoch"] == self.best_epoch else ""
            rows.append([f"{h['epoch']}{mark}", f"{h['lr']:.2e}", M._fmt(h["train_loss"], 4),
                         M._fmt(h["val"]["loss"], 4), M._fmt(h["val"]["miou"])]
                        + [M._fmt(v) for v in h["val"]["iou"]] + [f"{h['seconds']:.1f}"]
                        + [f"{100 * h['data_wait']:.1f} %" if "data_wait" in h else "-"])
        return M.text_table(headers, rows)

    def summary_table(self) -> str:
        names = [self.classes[k] for k in sorted(self.classes)]
        rows: dict[str, M.Scores] = {}
        if self.best is not None:
            rows[f"model (epoch {self.best_epoch})"] = self.best
        for name, s in self.baselines.items():
            label = name
            if s.extra.get("same_as"):
                label = f"{name} (= {s.extra['same_as']})"
            elif "class" in s.extra:
                label = f"{name} ({names[s.extra['class']]})"
            rows[label] = s
        return M.format_table(rows, names)

    def __str__(self) -> str:
        m, s = divmod(int(round(self.seconds)), 60)
        if self.rank:
            return (f"rank {self.rank} of {self.nproc}: {len(self.history)} epoch(s) in {m}m{s:02d}s; "
                    f"stopped: {self.stopped} (rank 0 reports the run and stores the model)")
        on = self.device if self.nproc == 1 else f"{self.nproc} processes, rank 0 on {self.device}"
        head = (f"model {self.model} ({self.framework} on {on}), dataset {self.dataset}: "
                f"{len(self.history)} epoch(s) run"
                + (f" (resumed after epoch {self.resumed_from})" if self.resumed_from else "")
                + f" in {m}m{s:02d}s; stopped: {self.stopped}; run {self.run_id}")
        lines = [head, f"train {self.train_chips} chips, validation {self.val_chips} chips "
                       "(the spatially held-out val split)"]
        lines += [f"note: {n}" for n in self.notes]
        if self.history:
            lines += ["", self.epoch_table(), ""]
            lines.append(f"validation split, best epoch {self.best_epoch} (*) vs trivial baselines:")
            lines.append(self.summary_table())
            lines.append("(the best epoch is chosen on val, which makes its val scores slightly "
                         "optimistic; the test split is left untouched)")
        if self.saved:
            lines.append(f"saved model {self.model} in pggeolearn.models")
        elif not self.history:
            lines.append("no epoch finished: nothing saved")
        if self.interrupted and self.history:
            lines.append(f"resume with: pggeolearn train {self.dataset} --model {self.model} --resume")
        if self.plot:
            lines.append(f"wrote {self.plot}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# checkpoints (a zip in pggeolearn.runs.checkpoint)


def pack_checkpoint(meta: dict[str, Any], weights: bytes, optimizer: bytes, best: bytes | None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("checkpoint.json", json.dumps({"format": CHECKPOINT_FORMAT, **meta}))
        z.writestr("weights", weights)
        z.writestr("optimizer", optimizer)
        if best is not None:
            z.writestr("best", best)
    return buf.getvalue()


def unpack_checkpoint(blob: bytes) -> tuple[dict[str, Any], bytes, bytes, bytes | None]:
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            meta = json.loads(z.read("checkpoint.json"))
            names = set(z.namelist())
            best = z.read("best") if "best" in names else None
            return meta, z.read("weights"), z.read("optimizer"), best
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
        raise errors.ConfigError(f"the stored checkpoint is unreadable ({exc})") from exc


def _latest_checkpoint(conn: psycopg.Connection, model: str) -> tuple[int, bytes] | None:
    with db_errors(f"reading the checkpoint of {model}"):
        row = conn.execute(
            "SELECT run_id, checkpoint FROM pggeolearn.runs WHERE kind = 'train' AND model = %s"
            " AND checkpoint IS NOT NULL ORDER BY run_id DESC LIMIT 1", [model]).fetchone()
    return (row[0], bytes(row[1])) if row else None


# ----------------------------------------------------------------------------------------------
# the database side


def split_counts(conn: psycopg.Connection, dataset: str) -> dict[str, int]:
    with db_errors(f"counting chips of {dataset}"):
        return dict(conn.execute(
            "SELECT coalesce(split, 'unassigned'), count(*) FROM pggeolearn.chips"
            " WHERE dataset = %s GROUP BY 1", [dataset]).fetchall())


def _check_built(ds: datasets.Dataset, counts: dict[str, int]) -> None:
    name = ds.name
    if not counts:
        raise errors.NotBuilt(f"dataset {name} has no chips yet (run: pggeolearn chips build {name})")
    have = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    for split in ("train", "val"):
        if not counts.get(split):
            raise errors.NotBuilt(
                f"dataset {name} has no chips in split {split} (it has: {have}); "
                f"re-split it (pggeolearn chips split {name}) or build more chips")
    if not (ds.stats or {}).get("bands"):
        raise errors.NotBuilt(f"dataset {name} has no chip statistics yet "
                              f"(run: pggeolearn chips build {name})")


def _class_counts(conn: psycopg.Connection, dataset: str, split: str, ids: Sequence[int]) -> np.ndarray:
    """Label pixels per class (channel order) over a split, from the stored per-chip counts."""
    with db_errors(f"class counts of {dataset}/{split}"):
        rows = conn.execute("SELECT class_counts FROM pggeolearn.chips WHERE dataset = %s"
                            " AND split = %s AND class_counts IS NOT NULL", [dataset, split]).fetchall()
    k = max(ids) + 1
    by_id = np.zeros(k, np.int64)
    for (counts,) in rows:
        c = np.asarray(counts[:k], np.int64)
        by_id[: len(c)] += c
    return by_id[list(ids)]


# ----------------------------------------------------------------------------------------------
# the loop


def check_nproc(nproc: int, train_chips: int, dataset: str) -> None:
    """Every process needs at least one train chip per epoch."""
    if nproc > train_chips:
        raise errors.ConfigError(f"--nproc {nproc} is more than the {train_chips} train chips of "
                                 f"dataset {dataset}: every process needs at least one")


def _framework(name: str) -> Any:
    if name == "mxnet":
        from pggeolearn.training import models_mx

        return models_mx
    try:
        from pggeolearn.training import models_torch
    except ImportError as exc:
        raise errors.MissingDependency(f"--framework torch needs PyTorch (pip install 'pggeolearn[torch]'): "
                                       f"{exc}") from exc
    return models_torch


def _model_class(module: Any) -> Any:
    return module.MxModel if module.FRAMEWORK == "mxnet" else module.TorchModel


def train_rank(dsn: str | None, dataset: str, model_name: str, opts: TrainOptions,
               group: Group | None = None, stop: Any = None) -> TrainReport:
    """One process's training (what :func:`pggeolearn.training.launch.train` runs in every
    process): all of it, or rank ``group.rank`` of a data-parallel group;
    ``stop`` (an Event) set in any rank ends every rank after the same step, like Ctrl-C."""
    with connect(dsn, autocommit=True, application_name=f"pggeolearn train {model_name}"[:63]) as conn:
        return _Training(conn, dsn, dataset, model_name, opts, group or Group(), stop).run()


class _Training:
    """The state of one call of :func:`train_rank`."""

    def __init__(self, conn: psycopg.Connection, dsn: str | None, dataset: str, model_name: str,
                 opts: TrainOptions, group: Group, stop: Any = None):
        self.conn, self.dsn, self.dataset_name, self.name = conn, dsn, dataset, model_name
        self.group, self.stop = group, stop
        self.started = time.perf_counter()
        require_schema(conn)
        self.ds = datasets.get(conn, dataset)
        counts = split_counts(conn, self.ds.name)  # "NAME@N" of the current N is NAME
        _check_built(self.ds, counts)
        self.counts = counts
        r = self.ds.recipe
        self.classes = {0: "background", **{int(k): v for k, v in r.classes.items()}}
        self.class_ids = sorted(self.classes)  # output channel i is class id class_ids[i]
        self.num_classes = len(self.class_ids)
        self.bands = len(self.ds.stats["bands"])
        self.notes: list[str] = []

        from pggeolearn.training import registry

        taken = registry.exists(conn, model_name)
        if taken and not (opts.overwrite or opts.resume):
            raise errors.AlreadyExists(f"model {model_name} exists (use --overwrite to replace it, "
                                       "or --resume to continue its training)")
        self.state: dict[str, Any] | None = None
        self.blobs: tuple[bytes, bytes, bytes | None] | None = None
        stored = None
        if opts.resume:
            found = _latest_checkpoint(conn, model_name)
            if found is None:
                raise errors.NotFound(f"no checkpoint of model {model_name} to resume "
                                      "(train it without --resume first)")
            self.resumed_run, blob = found
            meta, weights, optimizer, best = unpack_checkpoint(blob)
            self._check_resume(meta, force=opts.force)
            self.state, self.blobs = meta, (weights, optimizer, best)
            stored = meta["options"]
        self.opts = opts.resolved(stored)
        self.opts.validate()
        if self.state is not None and self.state["epoch"] >= self.opts.epochs:
            raise errors.ConfigError(
                f"model {model_name} has trained {self.state['epoch']} epochs already: ask for "
                f"more with --epochs (the total), e.g. --epochs {self.state['epoch'] + 10}")
        o = self.opts
        self.arch = Architecture(in_channels=self.bands, num_classes=self.num_classes, width=o.width,
                                 depth=o.depth, stem_stride=o.stem_stride, block=o.block,
                                 head=o.head)
        self.arch.validate()
        if r.tile_px % self.arch.multiple:
            raise errors.ConfigError(
                f"tiles of {r.tile_px}px do not halve {o.depth} times after a stride-{o.stem_stride} "
                f"stem (they must be a multiple of {self.arch.multiple}px): use a smaller --depth")
        stats = self.ds.stats
        # the model's input: what predict and evaluate check imagery against
        pixel_types = _pixel_types(conn, self.ds.name)
        self.normalization = {"mean": [float(b["mean"]) for b in stats["bands"]],
                              "std": [float(b["std"]) or 1.0 for b in stats["bands"]],
                              "pixel_types": pixel_types}
        if self.state is not None:
            self.normalization = self.state["normalization"]
            had = self.normalization.get("pixel_types")
            if had is not None and had != pixel_types:
                raise errors.ConfigError(
                    f"cannot resume {self.name}: it was trained on {','.join(had)} imagery, "
                    f"dataset {self.ds.name} has {','.join(pixel_types)}")
        self.weights = class_weights(stats.get("class_pixels"), self.class_ids) \
            if o.class_weights else None
        train_counts = _class_counts(conn, dataset, "train", self.class_ids)
        self.val_counts = _class_counts(conn, dataset, "val", self.class_ids)
        self.baselines = M.baselines(self.val_counts, train_counts, self.num_classes)
        # the framework last: a wrong device is a ConfigError before anything is written
        self.fw = _framework(o.framework)
        self.model = _model_class(self.fw)(self.arch, o.device, seed=o.seed,
                                           normalization=self.normalization, lr=o.lr,
                                           weight_decay=o.weight_decay, loss=o.loss)
        self.model.label_lut = label_lut(self.class_ids)
        if group.world > 1:
            check_nproc(group.world, counts["train"], self.ds.name)
            self.model.distribute(group)
        ndev = len(getattr(self.model, "ctx", [None]))
        if ndev > o.batch_size:
            raise errors.ConfigError(f"--batch-size {o.batch_size} is smaller than the {ndev} devices "
                                     "it is split over: use at least one chip per device")

    def _check_resume(self, meta: dict[str, Any], *, force: bool = False) -> None:
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise errors.ConfigError(f"checkpoint of {self.name} has an unknown format {meta.get('format')!r}")
        mine = {str(k): v for k, v in self.classes.items()}
        if meta["classes"] != mine:
            raise errors.ConfigError(
                f"cannot resume {self.name}: its classes {_classes_str(meta['classes'])} differ from "
                f"dataset {self.ds.name}'s {_classes_str(mine)}")
        if meta["bands"] != self.bands:
            raise errors.ConfigError(f"cannot resume {self.name}: it takes {meta['bands']} bands, "
                                     f"dataset {self.ds.name} has {self.bands}")
        if meta["tile_px"] != self.ds.recipe.tile_px:
            self.notes.append(f"the checkpoint was trained on {meta['tile_px']}px tiles, "
                              f"these are {self.ds.recipe.tile_px}px")
        was = (meta.get("dataset"), meta.get("recipe_hash"))
        if was != (self.ds.name, self.ds.recipe_hash):
            what = (f"dataset {was[0]}" if was[0] != self.ds.name else
                    f"dataset {self.ds.name} with another recipe ({str(was[1])[:12]} -> {self.ds.recipe_hash[:12]})")
            if not force:
                raise errors.ConfigError(
                    f"cannot resume {self.name} on dataset {self.ds.name}: its checkpoint was trained on "
                    f"{what} (pass --force to continue training on this data anyway)")
            self.notes.append(f"resumed with --force on other data: the checkpoint was trained on {what}")

    # -- the epochs ------------------------------------------------------------------------------
    def run(self) -> TrainReport:
        o, model = self.opts, self.model
        stopper = EarlyStopping(o.patience)
        start_epoch, history, best_weights, resumed_from = 0, [], None, None
        if self.state is not None:
            weights, optimizer, best_weights = self.blobs
            model.set_weights(weights)
            model.set_optimizer_state(optimizer)
            stopper.restore(self.state)
            start_epoch = resumed_from = self.state["epoch"]
            history = self.state["history"]
        params = {"options": self._options_json(), "architecture": self.arch.to_json(),
                  "device": model.device, "resumed_from_run": getattr(self, "resumed_run", None),
                  "package_version": __version__}
        if self.group.world > 1:
            params["nproc"] = self.group.world
        if not self.group.lead:  # rank 0 writes the run, the checkpoints and the model
            self.run = None
            return self._epochs(model, stopper, start_epoch, history, best_weights, resumed_from)
        # reserves the model name: a second concurrent `train --model X` is refused here, at once
        self.run = runs.Run.start(self.dsn, "train", model=self.name, dataset=self.ds.name, params=params)
        with self.run:  # fails the run on an error not handled below (e.g. at save), then closes it
            return self._epochs(model, stopper, start_epoch, history, best_weights, resumed_from)

    def _epochs(self, model, stopper: EarlyStopping, start_epoch: int, history: list,
                best_weights: bytes | None, resumed_from: int | None) -> TrainReport:
        o, lead = self.opts, self.group.lead
        run_id = self.run.run_id if lead else 0
        report = TrainReport(
            model=self.name, dataset=self.ds.name, framework=o.framework, device=model.device,
            run_id=run_id, classes=self.classes, history=history, best_epoch=stopper.best_epoch,
            best=None, baselines=self.baselines, stopped="completed", seconds=0.0,
            epochs_asked=o.epochs, resumed_from=resumed_from, val_chips=self.counts.get("val", 0),
            train_chips=self.counts.get("train", 0), notes=self.notes, nproc=self.group.world,
            rank=self.group.rank)
        limit_s = o.time_limit_min * 60 if o.time_limit_min else None
        t_start = time.perf_counter()
        steps_per_epoch = self._steps_per_epoch()
        status, error = "done", None
        try:
            for epoch in range(start_epoch, o.epochs):
                t0 = time.perf_counter()

                def progress(step: int, _epoch: int = epoch) -> float:
                    p = (_epoch + step / steps_per_epoch) / o.epochs
                    if limit_s:
                        p = max(p, (time.perf_counter() - t_start) / limit_s)
                    return p

                train_loss, lr, data_wait, chips = self._train_epoch(epoch, progress, steps_per_epoch)
                val = self._validate(epoch)
                record = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss,
                          "val": val.to_json(), "seconds": time.perf_counter() - t0,
                          "data_wait": data_wait}
                if self.group.world > 1:  # chips trained by all ranks: the train split, once
                    record["chips"] = chips
                if data_wait > DATA_WAIT_WARN:
                    self._warn_data_wait(epoch + 1, data_wait)
                history.append(record)
                improved = stopper.update(val.miou)
                if improved:
                    best_weights = model.get_weights()
                if o.progress and lead:
                    tqdm.write(f"epoch {epoch + 1}/{o.epochs}: train loss {train_loss:.4f}, val loss "
                               f"{val.loss:.4f}, val mIoU {val.miou:.3f}, {record['seconds']:.1f} s, "
                               f"data wait {100 * data_wait:.1f} %"
                               + (" (best)" if improved else ""))
                report.best_epoch = stopper.best_epoch
                if lead:
                    self._checkpoint(run_id, {**stopper.state(), "history": history}, best_weights)
                    if o.on_epoch is not None:
                        o.on_epoch(dict(record))
                if stopper.should_stop:  # val scores are reduced over the ranks: all agree
                    report.stopped = f"early stopping (val mIoU not better for {stopper.bad} epochs)"
                    break
                if limit_s and epoch + 1 < o.epochs:
                    # rank 0's clock decides for every rank
                    spent, epoch_s = self.group.allreduce(
                        [time.perf_counter() - t_start, record["seconds"]] if lead else [0.0, 0.0])
                    if spent >= limit_s:
                        report.stopped = f"time limit ({o.time_limit_min:g} min) after epoch {epoch + 1}"
                        break
                    if spent + epoch_s > limit_s:  # the next epoch would not fit
                        report.stopped = (f"time limit ({o.time_limit_min:g} min): after epoch "
                                          f"{epoch + 1} ({spent:.0f} s spent) another "
                                          f"{epoch_s:.0f} s epoch would not fit")
                        break
        except KeyboardInterrupt:
            done = history[-1]["epoch"] if history else 0
            report.stopped = f"interrupted (Ctrl-C) after epoch {done}"
            status, error = "failed", f"interrupted after epoch {done}; resume with --resume"
        except Exception as exc:
            mapped = map_error(exc, o.batch_size) or self.fw.map_error(exc, o.batch_size)
            err = mapped or exc
            if isinstance(err, errors.ConnectionLost) and history:
                mapped = err = errors.ConnectionLost(
                    f"{str(err).splitlines()[0]}; run {run_id} failed after epoch {history[-1]['epoch']}, "
                    f"resume with: pggeolearn train {self.ds.name} --model {self.name} --resume")
            # the database gone too: the run is marked failed by the next command that looks
            if lead:
                self.run.fail(str(err) or type(err).__name__,
                              self._outputs(history, stopper.best_epoch, "failed"))
            if mapped is not None:
                raise mapped from exc
            raise
        report.seconds = time.perf_counter() - self.started
        best_epoch = stopper.best_epoch
        if self.group.world > 1:
            report.weights_sha256 = hashlib.sha256(model.get_weights()).hexdigest()
        if not lead:
            report.best_epoch = best_epoch
            return report
        if best_epoch is not None:
            report.best = _scores(history[best_epoch - 1]["val"])
            self._save_model(history, best_epoch, best_weights, report.stopped)
            report.saved = True
        if status == "done":
            self.run.finish(self._outputs(history, best_epoch, report.stopped))
        else:
            self.run.fail(error, self._outputs(history, best_epoch, report.stopped))
        if o.plot and history:
            from pggeolearn.training.plot import plot_history

            report.plot = plot_history(history, o.plot, classes=self.classes, baselines=self.baselines,
                                       title=f"{self.name} on {self.ds.name} ({o.framework})",
                                       best_epoch=best_epoch)
        if o.score_chips and report.saved:
            report.notes.append(self._score_chips())
        return report

    def _score_chips(self) -> str:
        """Every train chip's loss and IoU under the saved model, into pggeolearn.chip_scores
        (an evaluate run): what the next run's ``--sampling`` query weighs hard examples by."""
        from pggeolearn.evaluate import evaluate  # predict's machinery: only when asked

        rep = evaluate(self.dsn, self.name, dataset=self.ds.name, split="train",
                       progress=self.opts.progress)
        return (f"scored {rep.tiles} train chips into pggeolearn.chip_scores (run {rep.run_id}): "
                f"weigh them with --sampling")

    @property
    def _read_dsn(self) -> str | Sequence[str] | None:
        """Where the chips stream from: the read replicas given, else the training's server."""
        return list(self.opts.read_dsns) if self.opts.read_dsns else self.dsn

    def _steps_per_epoch(self) -> int:
        """Train steps every rank takes per epoch: those of the largest shard (rank 0's), so
        that all ranks step together; a smaller shard ends with steps whose samples are all
        padding, which carry no loss (each chip is still trained on exactly once)."""
        return math.ceil(math.ceil(self.counts["train"] / self.group.world) / self.opts.batch_size)

    def _step_sync(self, progress: Callable[[int], float], step: int) -> StepSync:
        """What the ranks agree on before a step: the global weight sum, rank 0's learning rate,
        and whether any rank was asked to stop (raised after the step, in every rank)."""
        o, group = self.opts, self.group

        def sync(weight_sum: float) -> tuple[float, float]:
            lr = lr_at(o.schedule, o.lr, progress(step)) if group.lead else 0.0
            stop = float(self.stop is not None and self.stop.is_set())
            total, lr, self._stopping = (float(v) for v in group.allreduce([weight_sum, lr, stop]))
            self._lr = lr  # a float: numpy scalars in the optimizer state fail weights_only loads
            return total, lr

        return sync

    def _train_epoch(self, epoch: int, progress: Callable[[int], float],
                     steps: int) -> tuple[float, float, float, int]:
        """One epoch of training: ``(mean loss, last lr, data wait, chips)``, the data wait
        being the share of the epoch's wall time spent waiting for the next batch, chips the
        unpadded samples trained on by all ranks."""
        o, model, group = self.opts, self.model, self.group
        total, n, lr = 0.0, 0, lr_at(o.schedule, o.lr, progress(0))
        chips, self._stopping = 0, 0.0
        waited, started = 0.0, time.perf_counter()
        batches = model.batches(self._read_dsn, self.ds.name, "train", batch_size=o.batch_size,
                                shuffle=True, augment=o.augment, seed=o.seed, epoch=epoch,
                                jitter=o.jitter, **({"sampling": o.sampling} if o.sampling else {}))
        bar = tqdm(batches, total=steps, desc=f"epoch {epoch + 1}/{o.epochs} train", unit="batch",
                   leave=False, disable=not (o.progress and group.lead), dynamic_ncols=True)
        try:
            it, last = iter(bar), None
            for step in itertools.count():
                model.sync()  # the previous step's compute is compute, not waiting for data
                t = time.perf_counter()
                item = next(it, None)
                waited += time.perf_counter() - t
                if item is None:
                    if step >= steps or last is None:
                        break
                    item = (last[0], last[1], o.batch_size)  # this shard is done: all padding
                last = item
                images, labels, pad = item
                kept = o.batch_size - pad
                if o.on_chips is not None and kept:
                    o.on_chips(group.rank, epoch, np.array(model.last_tile_ids[:kept]))
                chips += kept
                if group.world > 1:
                    loss = model.train_step(images, labels, pad, lr, self.weights,
                                            sync=self._step_sync(progress, step))
                    lr = self._lr
                    if self._stopping:
                        raise KeyboardInterrupt
                else:
                    lr = lr_at(o.schedule, o.lr, progress(step))
                    loss = model.train_step(images, labels, pad, lr, self.weights)  # synchronous
                total += loss
                n += 1
                bar.set_postfix(loss=f"{total / n:.4f}", lr=f"{lr:.1e}", refresh=False)
        finally:
            bar.close()
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        if group.world > 1:  # the ranks' shares of each step's loss add up to the step's
            model.average_buffers()
            total, chips = group.allreduce([total, chips])
        elapsed = time.perf_counter() - started
        return (total / n if n else math.nan), lr, (waited / elapsed if elapsed > 0 else 0.0), int(chips)

    def _warn_data_wait(self, epoch: int, share: float) -> None:
        """Once per run: training waited for data more than it should (stored per epoch)."""
        if any(n.startswith("data wait") for n in self.notes):
            return
        self.notes.append(
            f"data wait {100 * share:.0f} % of epoch {epoch} (above {100 * DATA_WAIT_WARN:.0f} %): the "
            "model waits for chips; stream from more servers (--read-dsn) or a closer one, or "
            "raise --batch-size")
        if self.group.lead:
            log.warning(self.notes[-1])

    def _validate(self, epoch: int) -> M.Scores:
        o, model = self.opts, self.model
        cm = np.zeros((self.num_classes, self.num_classes), np.int64)
        loss_sum = w_sum = 0.0
        batches = model.batches(self._read_dsn, self.ds.name, "val", batch_size=o.batch_size,
                                shuffle=False, augment=False, seed=o.seed, epoch=0)
        shard = math.ceil(self.counts["val"] / self.group.world)
        bar = tqdm(batches, total=math.ceil(shard / o.batch_size),
                   desc=f"epoch {epoch + 1}/{o.epochs} val", unit="batch", leave=False,
                   disable=not (o.progress and self.group.lead), dynamic_ncols=True)
        try:
            for images, labels, pad in bar:
                s, w, pred, true = model.eval_step(images, labels, pad, self.weights)
                loss_sum += s
                w_sum += w
                cm += M.confusion_matrix(pred, true, self.num_classes)
        finally:
            bar.close()
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        if self.group.world > 1:  # each rank validated its shard of val: the sums are val's
            cm = self.group.allreduce(cm, counts=True).astype(np.int64)
            loss_sum, w_sum = self.group.allreduce([loss_sum, w_sum])
        return M.scores(cm, loss_sum / w_sum if w_sum else math.nan)

    # -- saving ------------------------------------------------------------------------------------
    def _options_json(self) -> dict[str, Any]:
        o = self.opts
        return {k: getattr(o, k) for k in DEFAULTS} | {
            "epochs": o.epochs, "patience": o.patience, "time_limit_min": o.time_limit_min,
            "device": o.device}

    def _meta(self, state: dict[str, Any]) -> dict[str, Any]:
        return {**state, "options": {k: getattr(self.opts, k) for k in DEFAULTS},
                "classes": {str(k): v for k, v in self.classes.items()}, "bands": self.bands,
                "tile_px": self.ds.recipe.tile_px, "recipe_hash": self.ds.recipe_hash,
                "dataset": self.ds.name, "normalization": self.normalization,
                "architecture": self.arch.to_json()}

    def _checkpoint(self, run_id: int, state: dict[str, Any], best: bytes | None) -> None:
        model = self.model
        blob = pack_checkpoint(json_safe(self._meta(state)), model.get_weights(),
                               model.get_optimizer_state(), best)
        self.run.heartbeat(self._outputs(state["history"], state["best_epoch"]), blob)

    def _outputs(self, history: list[dict[str, Any]], best_epoch: int | None,
                 stopped: str | None = None) -> dict[str, Any]:
        return json_safe({"epochs": history, "best_epoch": best_epoch,
                            "best": history[best_epoch - 1]["val"] if best_epoch else None,
                            "baselines": {k: v.to_json() for k, v in self.baselines.items()},
                            "stopped": stopped})

    def _save_model(self, history: list[dict[str, Any]], best_epoch: int, weights: bytes,
                    stopped: str) -> None:
        from pggeolearn.training import registry

        r = self.ds.recipe
        record = ModelRecord(
            name=self.name, dataset=self.ds.name, recipe_hash=self.ds.recipe_hash,
            dataset_version=self.ds.version,
            framework=self.opts.framework, architecture=self.arch.to_json(),
            hyperparameters=self.opts.hyperparameters(), classes=self.classes,
            normalization=self.normalization, tile_px=r.tile_px, resolution=r.resolution,
            srid=r.srid, bands=self.bands, weights=weights,
            metrics=self._outputs(history, best_epoch, stopped) | {"split": "val"},
            best_epoch=best_epoch)
        # on the run's connection: it reconnects when the server restarted during training
        registry.save(self.run.connection(), record, overwrite=self.opts.overwrite or self.opts.resume)


def _pixel_types(conn: psycopg.Connection, dataset: str) -> list[str]:
    """The pixel types of the dataset's image bands (recorded when the recipe was made)."""
    row = conn.execute("SELECT recipe -> 'image_bands' FROM pggeolearn.datasets WHERE name = %s",
                       [dataset]).fetchone()
    return [str(b["pixeltype"]) for b in (row[0] if row and row[0] else [])]


def _scores(d: dict[str, Any]) -> M.Scores:
    nan = math.nan
    return M.Scores(miou=nan if d["miou"] is None else d["miou"],
                    iou=[nan if v is None else v for v in d["iou"]],
                    f1=[nan if v is None else v for v in d["f1"]],
                    accuracy=nan if d["accuracy"] is None else d["accuracy"],
                    pixels=d["pixels"], loss=d.get("loss"))


def _classes_str(classes: dict[str, str]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in sorted(classes.items(), key=lambda kv: int(kv[0]))) + "}"



