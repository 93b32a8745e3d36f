"""The model contract: what prediction needs of a model (:class:`Predictor`), loading one
(registry name, ``module:attribute`` or an object), its input pixel types, class ids, and
calling it on a batch of windows."""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import psycopg

from pggeolearn import errors, wkb
from pggeolearn.predict.grid import NODATA

__all__ = ["Predictor", "call_model", "check_pixel_types", "check_predictor", "input_pixel_types",
           "load_model", "model_class_ids"]


@runtime_checkable
class Predictor(Protocol):
    """What prediction needs of a model (``pggeolearn.training.registry.LoadedModel`` is one).

    ``predict_proba`` takes ``(N, bands, tile_px, tile_px)`` images in the pixel type the model
    was trained on (:func:`input_pixel_types`; the imagery's raw values, the model normalizes
    them itself) and returns ``(N, K, tile_px, tile_px)`` float32
    probabilities (softmax over the K classes, background included); channel ``k`` is the
    ``k``-th smallest class id of ``classes``.
    """

    name: str
    classes: dict[int, str]
    tile_px: int
    resolution: float
    srid: int
    bands: int
    normalization: Any
    framework: str

    def predict_proba(self, images_uint8: np.ndarray) -> np.ndarray: ...


_ATTRS = ("name", "classes", "tile_px", "resolution", "srid", "bands", "normalization", "framework")


def check_predictor(obj: Any, label: str = "model") -> Predictor:
    """``obj`` if it fulfils :class:`Predictor` with sane values, else a one-line ConfigError."""
    missing = [a for a in (*_ATTRS, "predict_proba") if not hasattr(obj, a)]
    if missing:
        raise errors.ConfigError(f"{label} is not a predictor: it lacks {', '.join(missing)}")
    if not callable(obj.predict_proba):
        raise errors.ConfigError(f"{label}.predict_proba is not callable")
    try:
        classes = {int(k): str(v) for k, v in dict(obj.classes).items()}
        tile_px, srid, bands = int(obj.tile_px), int(obj.srid), int(obj.bands)
        res = float(obj.resolution)
    except (TypeError, ValueError) as exc:
        raise errors.ConfigError(f"{label} has bad metadata: {exc}") from None
    if 0 not in classes or len(classes) < 2:
        raise errors.ConfigError(f"{label} classes must include 0 (background) and one more: {classes}")
    if min(classes) < 0 or max(classes) >= NODATA:
        raise errors.ConfigError(f"{label} class ids must be 0..254 ({NODATA} is NODATA): {sorted(classes)}")
    if not 8 <= tile_px <= 4096 or bands < 1 or srid <= 0 or not (math.isfinite(res) and res > 0):
        raise errors.ConfigError(f"{label} has bad metadata: tile_px {tile_px}, bands {bands}, "
                                 f"srid {srid}, resolution {res}")
    return obj


def input_pixel_types(p: Predictor) -> tuple[str, ...]:
    """The PostGIS pixel types of the imagery ``p`` takes, one per band: what training recorded
    (``normalization["pixel_types"]``), else 8BUI (models trained before it was recorded)."""
    norm = p.normalization if isinstance(p.normalization, dict) else {}
    types = norm.get("pixel_types") or ["8BUI"] * int(p.bands)
    return tuple(str(t) for t in types[: int(p.bands)])


def check_pixel_types(p: Predictor, model_name: str, types: Sequence[str], what: str) -> np.dtype:
    """The numpy dtype of the model's input, after checking that ``what`` (imagery, chips)
    has the pixel types the model was trained on; a mismatch names both sides."""
    want = input_pixel_types(p)
    got = tuple(types[: len(want)])
    if got != want:
        raise errors.ConfigError(f"{what} has {','.join(got) or 'no'} bands; model {model_name} "
                                 f"was trained on {','.join(want)} imagery")
    return wkb.PIXEL_TYPES[want[0]].dtype


def load_model(conn: psycopg.Connection, model: str | Predictor, *, device: str | None = None
               ) -> Predictor:
    """A :class:`Predictor` from a registry name, a ``module:attribute`` spec, or as given.

    A name is loaded with ``pggeolearn.training.registry.load(conn, name, device=device)``;
    ``module:attribute`` imports a Predictor object (or a callable returning one: a class, a
    factory) - a way to bring a model from outside the registry.
    """
    if not isinstance(model, str):
        return check_predictor(model, getattr(model, "name", "model"))
    if ":" in model:
        mod_name, _, attr = model.partition(":")
        try:
            obj = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise errors.ModelNotFound(f"cannot import model {model!r}: {exc}") from None
        if not hasattr(obj, "predict_proba") and callable(obj):
            obj = obj()
        return check_predictor(obj, model)
    try:
        from pggeolearn.training import registry
    except ModuleNotFoundError as exc:
        if exc.name not in ("pggeolearn.training", "pggeolearn.training.registry"):
            raise
        registry = None
    if registry is None:
        row = conn.execute("SELECT 1 FROM pggeolearn.models WHERE name = %s", [model]).fetchone()
        if row is None:
            raise errors.ModelNotFound(_unknown_model(conn, model))
        raise errors.MissingDependency(
            f"model {model!r} is in pggeolearn.models but the model registry "
            "(pggeolearn.training.registry) is not installed")
    loaded = registry.load(conn, model, device=device or "auto")
    return check_predictor(loaded, model)


def _unknown_model(conn: psycopg.Connection, name: str) -> str:
    known = [r[0] for r in conn.execute("SELECT name FROM pggeolearn.models ORDER BY name LIMIT 20")]
    hint = f" (known: {', '.join(known)})" if known else " (none trained yet: pggeolearn train)"
    return f"unknown model {name!r}{hint}"


def model_class_ids(p: Predictor) -> np.ndarray:
    """The model's class ids, ascending: channel ``k`` of its probabilities is class ``ids[k]``."""
    return np.array(sorted(int(k) for k in p.classes), dtype=np.uint8)


def call_model(p: Predictor, x: np.ndarray, n_classes: int) -> np.ndarray:
    """``p.predict_proba(x)`` as float32, after checking it is ``(N, n_classes, H, W)``."""
    y = np.asarray(p.predict_proba(x))
    want = (x.shape[0], n_classes, x.shape[2], x.shape[3])
    if y.shape != want:
        raise errors.ConfigError(f"model {p.name} returned probabilities of shape {y.shape}, "
                                 f"expected {want}")
    return y.astype(np.float32, copy=False)
