"""The model registry: trained models live in table ``pggeolearn.models``, one row per name.

A row holds everything needed to use the model elsewhere: the framework, the architecture
(:class:`Architecture`), the classes (``{"0": "background", "1": ...}``; output channel ``i`` is
the ``i``-th class id in ascending order, i.e. class id ``i`` when the ids are 0..K-1), the
band normalization it was trained with, the grid it expects (tile size, resolution, SRID,
bands), the weights (bytes: MXNet ``save_parameters`` format or a torch state dict), the
per-epoch metrics and the best epoch.

:func:`load` gives a :class:`LoadedModel` whose :meth:`LoadedModel.predict_proba` maps uint8
images ``(N, C, H, W)`` to float32 class probabilities ``(N, K, H, W)``. :func:`export` writes a
self-contained zip (``model.json`` + the weights) that :func:`load_file` and
:func:`import_file` read back anywhere. mxnet and torch are imported only when a model of that
framework is built.
"""

from __future__ import annotations

import datetime as dt
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from pggeolearn import __version__, errors, runs
from pggeolearn.db.errors import db_errors
from pggeolearn.db.schema import require_schema
from pggeolearn.training.common import Architecture, json_safe

__all__ = [
    "Architecture", "LoadedModel", "ModelRecord", "drop", "exists", "export", "get",
    "import_file", "list_models", "load", "load_file", "read_export", "save",
]

FRAMEWORKS = ("mxnet", "torch")
EXPORT_FORMAT = "pggeolearn-model/1"
WEIGHT_FILES = {"mxnet": "weights.params", "torch": "weights.pt"}
COLUMNS = ("name", "dataset", "recipe_hash", "framework", "architecture", "hyperparameters",
           "classes", "normalization", "tile_px", "resolution", "srid", "bands", "weights",
           "metrics", "best_epoch", "package_version", "dataset_version")
JSON_COLUMNS = {"architecture", "hyperparameters", "classes", "normalization", "metrics"}


@dataclass
class ModelRecord:
    """One row of ``pggeolearn.models``. ``classes`` includes 0 (background)."""

    name: str
    dataset: str
    recipe_hash: str
    framework: str
    architecture: dict[str, Any]
    hyperparameters: dict[str, Any]
    classes: dict[int, str]
    normalization: dict[str, list[float]] | None
    tile_px: int
    resolution: float
    srid: int
    bands: int
    weights: bytes
    metrics: dict[str, Any]
    best_epoch: int | None = None
    package_version: str = __version__
    dataset_version: int | None = None  # the version of ``dataset`` (None: from before versions)
    created_at: dt.datetime | None = None
    weights_size: int | None = field(default=None, compare=False)

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for c in COLUMNS:
            v = getattr(self, c)
            if c == "classes":
                v = {str(k): n for k, n in sorted(v.items())}
            if c == "normalization":
                v = v or {}
            out[c] = Jsonb(json_safe(v)) if c in JSON_COLUMNS else v
        return out

    def meta(self) -> dict[str, Any]:
        """Everything but the weights, JSON-ready (what an export's model.json holds)."""
        out = {c: getattr(self, c) for c in COLUMNS if c != "weights"}
        out["classes"] = {str(k): v for k, v in sorted(self.classes.items())}
        out["created_at"] = self.created_at.isoformat() if self.created_at else None
        return json_safe(out)

    @classmethod
    def from_meta(cls, meta: dict[str, Any], weights: bytes) -> ModelRecord:
        kwargs = {c: meta[c] for c in COLUMNS if c != "weights" and c in meta}
        missing = set(COLUMNS) - {"weights", "best_epoch", "package_version", "dataset_version"} - set(kwargs)
        if missing:
            raise errors.ConfigError(f"model metadata lacks {', '.join(sorted(missing))}")
        kwargs["classes"] = {int(k): str(v) for k, v in kwargs["classes"].items()}
        kwargs["normalization"] = kwargs.get("normalization") or None
        created = meta.get("created_at")
        return cls(**kwargs, weights=weights,
                   created_at=dt.datetime.fromisoformat(created) if created else None)

    @property
    def dataset_ref(self) -> str:
        """``NAME@N``: the dataset version it was trained on (``NAME`` when unknown)."""
        base = self.dataset.split("@", 1)[0]
        return f"{base}@{self.dataset_version}" if self.dataset_version else self.dataset

    @property
    def arch(self) -> Architecture:
        return Architecture.from_json(self.architecture)

    def describe(self) -> str:
        """Several lines for ``pggeolearn model show``."""
        a = self.architecture
        best = (self.metrics or {}).get("best") or {}
        names = [self.classes[k] for k in sorted(self.classes)]
        hp = self.hyperparameters or {}
        lines = [
            f"model {self.name} ({self.framework}), trained on dataset {self.dataset_ref} "
            f"(recipe {self.recipe_hash}), pggeolearn {self.package_version}"
            + (f", {self.created_at:%Y-%m-%d %H:%M}" if self.created_at else ""),
            f"architecture: {a.get('name', 'unet')} width {a.get('width')} depth {a.get('depth')} "
            f"stem stride {a.get('stem_stride')}, {a.get('block', 'plain')} levels, {a.get('head', 'refine')} "
            f"head, {a.get('in_channels')} band(s) in, "
            f"{a.get('num_classes')} classes out; weights {_size(self.weights_size or len(self.weights))}",
            "classes: " + ", ".join(f"{k}={v}" for k, v in sorted(self.classes.items())),
            f"input: EPSG:{self.srid}, {self.resolution:g} units/px, {self.tile_px}px tiles, "
            f"{self.bands} band(s); normalization "
            + (", ".join(f"{m:.1f}/{s:.1f}" for m, s in zip(self.normalization["mean"],
                                                             self.normalization["std"], strict=True))
               if self.normalization else "none") + " (mean/std per band)",
            "training: " + ", ".join(f"{k} {v}" for k, v in hp.items() if v is not None),
        ]
        if best:
            iou = ", ".join(f"{n} {_f(v)}" for n, v in zip(names, best.get("iou", []), strict=False))
            lines.append(f"best epoch {self.best_epoch} of {len(self.metrics.get('epochs', []))}: "
                         f"val mIoU {_f(best.get('miou'))} (IoU {iou}), val loss {_f(best.get('loss'))}")
        for bname, b in ((self.metrics or {}).get("baselines") or {}).items():
            lines.append(f"baseline {bname}: val mIoU {_f(b.get('miou'))}")
        if (self.metrics or {}).get("stopped"):
            lines.append(f"stopped: {self.metrics['stopped']}")
        return "\n".join(lines)


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


# ----------------------------------------------------------------------------------------------
# the table


def exists(conn: psycopg.Connection, name: str) -> bool:
    with db_errors("model registry"):
        return conn.execute("SELECT EXISTS (SELECT 1 FROM pggeolearn.models WHERE name = %s)",
                            [name]).fetchone()[0]


def save(conn: psycopg.Connection, record: ModelRecord, *, overwrite: bool = False) -> None:
    """Store ``record`` (one transaction); AlreadyExists when the name is taken, unless
    ``overwrite``."""
    if record.framework not in FRAMEWORKS:
        raise errors.ConfigError(f"framework must be one of {', '.join(FRAMEWORKS)}")
    require_schema(conn)
    row = record.row()
    cols = list(row)
    insert = sql.SQL("INSERT INTO pggeolearn.models ({}) VALUES ({})").format(
        sql.SQL(", ").join(map(sql.Identifier, cols)),
        sql.SQL(", ").join(sql.Placeholder(c) for c in cols))
    with db_errors(f"saving model {record.name}"), conn.transaction():
        taken = conn.execute("SELECT 1 FROM pggeolearn.models WHERE name = %s FOR UPDATE",
                             [record.name]).fetchone()
        if taken and not overwrite:
            raise errors.AlreadyExists(f"model {record.name} exists (use --overwrite to replace it)")
        if taken:
            conn.execute("DELETE FROM pggeolearn.models WHERE name = %s", [record.name])
        conn.execute(insert, row)


def _not_found(conn: psycopg.Connection, name: str) -> errors.ModelNotFound:
    known = [r[0] for r in conn.execute("SELECT name FROM pggeolearn.models ORDER BY name")]
    hint = f" (known: {', '.join(known)})" if known else " (none trained yet: pggeolearn train)"
    return errors.ModelNotFound(f"unknown model {name!r}{hint}")


def _select(weights: bool) -> sql.Composed:
    cols = [sql.Identifier(c) for c in COLUMNS if c != "weights"]
    cols.append(sql.SQL("weights") if weights else sql.SQL("NULL::bytea"))
    cols += [sql.SQL("created_at"), sql.SQL("octet_length(weights)")]
    return sql.SQL("SELECT {} FROM pggeolearn.models").format(sql.SQL(", ").join(cols))


def _record(row: tuple) -> ModelRecord:
    names = [c for c in COLUMNS if c != "weights"] + ["weights", "created_at", "weights_size"]
    d = dict(zip(names, row, strict=True))
    d["classes"] = {int(k): v for k, v in d["classes"].items()}
    d["normalization"] = d["normalization"] or None
    d["weights"] = bytes(d["weights"]) if d["weights"] is not None else b""
    return ModelRecord(**d)


def get(conn: psycopg.Connection, name: str, *, weights: bool = True) -> ModelRecord:
    """The stored model ``name`` (ModelNotFound names the known ones)."""
    require_schema(conn)
    with db_errors(f"reading model {name}"):
        row = conn.execute(_select(weights) + sql.SQL(" WHERE name = %s"), [name]).fetchone()
        if row is None:
            raise _not_found(conn, name)
    return _record(row)


def list_models(conn: psycopg.Connection) -> list[ModelRecord]:
    """Every stored model, without weights (``weights_size`` says how big they are)."""
    require_schema(conn)
    with db_errors("listing models"):
        rows = conn.execute(_select(False) + sql.SQL(" ORDER BY name")).fetchall()
    return [_record(r) for r in rows]


def drop(conn: psycopg.Connection, name: str) -> None:
    """Delete model ``name`` and the resumable checkpoints of its training runs (the runs'
    records stay, as history)."""
    require_schema(conn)
    with db_errors(f"dropping model {name}"), conn.transaction():
        if conn.execute("DELETE FROM pggeolearn.models WHERE name = %s", [name]).rowcount == 0:
            raise _not_found(conn, name)
        runs.drop_checkpoints(conn, name)


# ----------------------------------------------------------------------------------------------
# using a model


class LoadedModel:
    """A registered model, built and ready on a device.

    ``classes`` maps class id -> name, 0 (background) included; :meth:`predict_proba` has
    ``K = len(classes)`` channels, channel ``i`` being class id ``class_ids[i]`` (the ids in
    ascending order: channel ``k`` is class id ``k`` when the ids are 0..K-1). ``normalization`` is
    ``{"mean": [...], "std": [...]}`` per band (or None); it is applied inside predict_proba.
    """

    def __init__(self, record: ModelRecord, device: str = "auto", batch_size: int = 8):
        self.record = record
        self.name = record.name
        self.framework = record.framework
        self.classes: dict[int, str] = dict(sorted(record.classes.items()))
        self.class_ids = np.array(sorted(self.classes), dtype=np.uint8)
        self.tile_px = int(record.tile_px)
        self.resolution = float(record.resolution)
        self.srid = int(record.srid)
        self.bands = int(record.bands)
        self.normalization = record.normalization or None
        self.architecture = record.arch
        self.architecture.validate()
        self.num_classes = self.architecture.num_classes
        if self.num_classes != len(self.classes):
            raise errors.ConfigError(f"model {self.name} has {self.num_classes} output channels "
                                     f"but {len(self.classes)} classes")
        self.batch_size = int(batch_size)
        self._model = _framework_model(record.framework, self.architecture, device,
                                       self.normalization)
        self._model.set_weights(record.weights)
        self.device = self._model.device

    def predict_proba(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """uint8 images ``(N, C, H, W)`` -> float32 softmax probabilities ``(N, K, H, W)``,
        computed in batches on the model's device. Sizes that are not a multiple of
        ``architecture.multiple`` are padded (reflect) and cropped back."""
        images = np.asarray(images)
        if images.ndim == 3:
            raise errors.ConfigError(f"expected a batch (N, C, H, W), got shape {images.shape} "
                                     "(add a leading axis: images[None])")
        if images.ndim != 4 or images.shape[1] != self.bands:
            raise errors.ConfigError(f"model {self.name} takes (N, {self.bands}, H, W) images, "
                                     f"got shape {images.shape}")
        if images.shape[0] == 0:
            return np.empty((0, self.num_classes, *images.shape[2:]), np.float32)
        return self._model.predict_proba(images, batch_size or self.batch_size)

    def predict(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """uint8 class ids ``(N, H, W)`` (of the most probable class)."""
        return self.class_ids[self.predict_proba(images, batch_size).argmax(axis=1)]

    def __repr__(self) -> str:
        return (f"LoadedModel({self.name!r}, {self.framework}, {self.num_classes} classes, "
                f"{self.tile_px}px @ {self.resolution:g} EPSG:{self.srid}, device {self.device})")


def _framework_model(framework: str, cfg: Architecture, device: str,
                     normalization: dict[str, list[float]] | None) -> Any:
    if framework == "mxnet":
        try:
            from pggeolearn.training.models_mx import MxModel
        except ImportError as exc:
            raise errors.MissingDependency(f"this model needs mxnet, which does not import: {exc}") from exc
        return MxModel(cfg, device, normalization=normalization, train=False)
    if framework == "torch":
        try:
            from pggeolearn.training.models_torch import TorchModel
        except ImportError as exc:
            raise errors.MissingDependency(
                f"this model needs PyTorch (pip install 'pggeolearn[torch]'): {exc}") from exc
        return TorchModel(cfg, device, normalization=normalization, train=False)
    raise errors.ConfigError(f"unknown framework {framework!r} (known: {', '.join(FRAMEWORKS)})")


def load(conn: psycopg.Connection, name: str, *, device: str = "auto", batch_size: int = 8) -> LoadedModel:
    """Model ``name`` from the registry, built on ``device`` (auto, cpu, gpu:N)."""
    return LoadedModel(get(conn, name), device=device, batch_size=batch_size)


# ----------------------------------------------------------------------------------------------
# moving models between databases


def export(conn: psycopg.Connection, name: str, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write model ``name`` as a self-contained zip: ``model.json`` (every column but the
    weights, plus the format name) and ``weights.params`` (MXNet) or ``weights.pt`` (torch)."""
    path = Path(out)
    if path.exists() and not overwrite:
        raise errors.AlreadyExists(f"{path} exists (use --overwrite to replace it)")
    if not path.parent.is_dir():
        raise errors.ConfigError(f"folder {path.parent} does not exist")
    record = get(conn, name)
    meta = {"format": EXPORT_FORMAT, **record.meta()}
    tmp = path.with_name(path.name + ".part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("model.json", json.dumps(meta, indent=2))
        z.writestr(WEIGHT_FILES[record.framework], record.weights)
    tmp.replace(path)
    return path


def read_export(path: str | Path) -> ModelRecord:
    """The record inside a file written by :func:`export`."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            meta = json.loads(z.read("model.json"))
            if meta.get("format") != EXPORT_FORMAT:
                raise errors.ConfigError(f"{path}: not a pggeolearn model file "
                                         f"(format {meta.get('format')!r})")
            weights = z.read(WEIGHT_FILES.get(meta.get("framework"), "weights"))
    except FileNotFoundError:
        raise errors.ConfigError(f"model file not found: {path}") from None
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
        raise errors.ConfigError(f"{path}: not a pggeolearn model file ({exc})") from exc
    return ModelRecord.from_meta(meta, weights)


def load_file(path: str | Path, *, device: str = "auto", batch_size: int = 8) -> LoadedModel:
    """A model from an exported file, without a database."""
    return LoadedModel(read_export(path), device=device, batch_size=batch_size)


def import_file(conn: psycopg.Connection, path: str | Path, *, name: str | None = None,
                overwrite: bool = False) -> ModelRecord:
    """Store an exported model in this database's registry (under ``name`` if given)."""
    record = read_export(path)
    if name:
        record.name = name
    record.created_at = None
    save(conn, record, overwrite=overwrite)
    return get(conn, record.name, weights=False)

