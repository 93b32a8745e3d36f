"""GeoStream: chips from PostGIS into numpy training batches at the speed of the wire.

A :class:`GeoStream` iterates one split of a dataset's chip store (``pggeolearn.chips``), or
computes tiles on the fly from the recipe (:meth:`GeoStream.live`), and yields batches: dicts
with the fixed keys ``image`` ``(N, C, H, W)`` (the chips' own dtype: uint8, uint16, int16,
float32, ..., or float32 when normalized), ``label`` ``(N, H, W)`` (uint8 class ids), ``valid``
``(N, H, W)`` (bool, False on NODATA pixels: :func:`pggeolearn.wkb.valid_mask`), ``tile_id``
``(N,)``, ``transform`` ``(N, 6)`` (GDAL geotransforms), ``srid`` ``(N,)`` and
``pad`` (how many trailing samples repeat earlier ones to fill the last batch).

How it is fast and safe:

* **Binary transport only.** ``COPY (SELECT tile_id, ST_AsBinary(image), ST_AsBinary(label)
  ...) TO STDOUT (FORMAT BINARY)`` (default) whose messages are parsed in place, or a binary
  server-side cursor fetched by bytes. Raster WKB is decoded with :mod:`pggeolearn.wkb`
  (zero-copy views) straight into a batch array allocated once per batch.
* **Order is the client's.** The epoch's order is a seeded permutation of the split's tile
  ids (fetched once, ``ORDER BY tile_id``); chips are fetched in that order by joining
  ``unnest(ids) WITH ORDINALITY``. Scan order is never relied upon.
* **One sharding rule** (:func:`epoch_batches`): the epoch's ordered list is dealt to
  ``world = num_parts * num_workers`` shards by ``position % world == shard`` with
  ``shard = part_index * num_workers + worker_id``, so every chip is delivered exactly once
  per epoch across all shards. MXNet's ``num_parts/part_index`` and PyTorch's rank/world size
  times DataLoader workers both map onto it.
* **Sampling queries** (``sampling=``): SQL returning ``(tile_id, weight)`` over the chip store
  (a filter such as ``WHERE nodata_frac < .05``, class balance from ``class_counts``, hard
  examples from a scores table) turns each epoch into ``len(split)`` weighted draws with
  replacement, seeded by (seed, epoch); shards still take disjoint positions of it.
* **Prefetch** runs in one background thread with a bounded queue (memory does not grow with
  the dataset); its exceptions are re-raised in the consumer. ``close()``, ``with``, garbage
  collection and KeyboardInterrupt stop it and close its connections.
* **Faults.** A lost connection (``pg_terminate_backend``, server restart) is resumed from the
  next undelivered chip of the epoch order: no duplicate, no drop. ``statement_timeout``
  (QueryCanceled) is never retried: :class:`~pggeolearn.errors.QueryTimeout`. A NULL or
  wrong-size chip is a :class:`~pggeolearn.errors.ChipError` naming the tile.

Only numpy and psycopg are imported here; the framework adapters live in
:mod:`pggeolearn.mxnet` and :mod:`pggeolearn.torch`.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import struct
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from pggeolearn import errors, retry, wkb
from pggeolearn.db import usersql
from pggeolearn.db.connect import connect
from pggeolearn.db.errors import db_errors, first_line, translate
from pggeolearn.db.usersql import DEFAULT_TIMEOUT_S
from pggeolearn.db.usersql import sandbox as read_only
from pggeolearn.resources import sql_text

__all__ = [
    "BATCH_KEYS",
    "LAST_BATCH",
    "SPLITS",
    "BatchIterator",
    "GeoStream",
    "TileInfo",
    "aug_code",
    "dihedral",
    "epoch_batches",
    "epoch_order",
    "normalize",
    "read_dsn",
    "shard_index",
    "show_batch",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "excluded")
TRAINING_SPLITS = ("train", "val", "test")  # what split="all" means
LAST_BATCH = ("pad", "discard", "rollover")
TRANSPORTS = ("copy", "cursor")
SOURCES = ("chips", "live")
BATCH_KEYS = ("image", "label", "valid", "tile_id", "transform", "srid", "pad")

Batch = dict[str, Any]


# ----------------------------------------------------------------------------------------------
# the one rule: order, shard, batch (pure functions, no database)


def shard_index(num_parts: int = 1, part_index: int = 0, num_workers: int = 1,
                worker_id: int = 0) -> tuple[int, int]:
    """``(shard, world)`` of one reader: ``part_index * num_workers + worker_id`` of
    ``num_parts * num_workers``. ``num_workers=0`` (a DataLoader in the main process) counts
    as one worker."""
    num_workers = max(1, int(num_workers))
    if num_parts < 1:
        raise errors.ConfigError(f"num_parts must be >= 1, not {num_parts}")
    if not 0 <= part_index < num_parts:
        raise errors.ConfigError(f"part_index must be in 0..{num_parts - 1}, not {part_index}")
    if not 0 <= worker_id < num_workers:
        raise errors.ConfigError(f"worker_id must be in 0..{num_workers - 1}, not {worker_id}")
    return part_index * num_workers + worker_id, num_parts * num_workers


def read_dsn(dsn: str | Sequence[str] | None, shard: int) -> str | None:
    """The server a reader streams from: ``dsn`` itself, or with several (a primary and its
    read replicas, all holding the same chips) the one at ``shard % len(dsn)``, so readers
    spread evenly over them."""
    if dsn is None or isinstance(dsn, str):
        return dsn
    dsns = list(dsn)
    if not dsns:
        raise errors.ConfigError("give at least one DSN")
    return dsns[shard % len(dsns)]


def epoch_order(ids: Sequence[int] | np.ndarray, *, seed: int = 0, epoch: int = 0,
                shuffle: bool = True, weights: np.ndarray | None = None) -> np.ndarray:
    """The epoch's order of ``ids`` (sorted tile ids): a permutation seeded by (seed, epoch),
    identical on every machine and in every worker; ``ids`` as given without shuffle.

    With ``weights`` (one per id, >= 0) the epoch is ``len(ids)`` draws with replacement, each
    id with probability proportional to its weight, seeded the same way: what a sampling query
    (hard examples, class balance) asks for. Shards still take disjoint positions of it."""
    arr = np.asarray(ids, dtype=np.int64)
    if seed < 0 or epoch < 0:
        raise errors.ConfigError("seed and epoch must be >= 0")
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != arr.shape or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise errors.ConfigError("weights must be finite, >= 0, one per id, not all 0")
        rng = np.random.default_rng([int(seed), int(epoch), 1])
        return arr[rng.choice(len(arr), size=len(arr), replace=True, p=w / w.sum())]
    if not shuffle:
        return arr.copy()
    return np.random.default_rng([int(seed), int(epoch)]).permutation(arr)


def _shard_list(ids: np.ndarray, seed: int, epoch: int, shuffle: bool, shard: int,
                world: int, weights: np.ndarray | None = None) -> np.ndarray:
    return epoch_order(ids, seed=seed, epoch=epoch, shuffle=shuffle, weights=weights)[shard::world]


def epoch_batches(ids: Sequence[int] | np.ndarray, *, epoch: int, batch_size: int, seed: int = 0,
                  shuffle: bool = True, shard: int = 0, world: int = 1,
                  last_batch: str = "pad", weights: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The batches one shard delivers in one epoch: ``(tile ids (nbatches, batch_size), pads)``.

    The shard's list is ``epoch_order(...)[shard::world]`` (``weights``: see epoch_order).
    ``last_batch``:

    * ``'pad'``: the final partial batch is filled with samples from the start of the shard's
      list; ``pads[-1]`` says how many.
    * ``'discard'``: the final partial batch is dropped.
    * ``'rollover'``: the leftover samples start the next epoch. Stateless: the shard's lists
      of epochs 0, 1, 2, ... are concatenated and epoch ``e`` delivers the full batches that
      end inside its list, so any epoch can be (re)started on its own.
    """
    if batch_size < 1:
        raise errors.ConfigError(f"batch_size must be >= 1, not {batch_size}")
    if last_batch not in LAST_BATCH:
        raise errors.ConfigError(f"last_batch must be one of {', '.join(LAST_BATCH)}, not {last_batch!r}")
    if not 0 <= shard < world:
        raise errors.ConfigError(f"shard must be in 0..{world - 1}, not {shard}")
    ids = np.asarray(ids, dtype=np.int64)
    b = int(batch_size)
    empty = np.empty((0, b), np.int64), np.zeros(0, np.int64)
    if last_batch == "rollover":
        n = len(ids[shard::world])
        if n == 0:
            return empty
        first, stop = (epoch * n) // b, ((epoch + 1) * n) // b
        if stop <= first:
            return empty
        e0, e1 = (first * b) // n, (stop * b - 1) // n
        stream = np.concatenate([_shard_list(ids, seed, e, shuffle, shard, world, weights)
                                 for e in range(e0, e1 + 1)])
        out = stream[first * b - e0 * n: stop * b - e0 * n]
        return out.reshape(-1, b), np.zeros(stop - first, np.int64)
    mine = _shard_list(ids, seed, epoch, shuffle, shard, world, weights)
    n = len(mine)
    if n == 0:
        return empty
    full, rest = divmod(n, b)
    if rest and last_batch == "pad":
        filled = np.concatenate([mine, np.resize(mine, b - rest)])
        pads = np.zeros(full + 1, np.int64)
        pads[-1] = b - rest
        return filled.reshape(-1, b), pads
    return mine[: full * b].reshape(-1, b), np.zeros(full, np.int64)


# ----------------------------------------------------------------------------------------------
# augmentation and normalization


def aug_code(seed: int, epoch: int, tile_id: int) -> int:
    """Which of the 8 flips/rotations tile ``tile_id`` gets in ``epoch`` (0 = unchanged)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(tile_id)]).generate_state(1)[0] % 8)


def dihedral(arr: np.ndarray, code: int) -> np.ndarray:
    """A view of ``arr`` (``(..., H, W)``) rotated by ``90° * (code % 4)`` then, when
    ``code >= 4``, flipped left-right. Non-square arrays only get 180° rotations and flips."""
    rot = code % 4
    if arr.shape[-1] != arr.shape[-2]:
        rot = 2 * (rot % 2)
    out = np.rot90(arr, rot, axes=(-2, -1)) if rot else arr
    return out[..., ::-1] if code >= 4 else out


def normalize(images: np.ndarray, mean: np.ndarray | None, std: np.ndarray | None) -> np.ndarray:
    """``(images - mean) / std`` per band as float32 (``(N, C, H, W)`` or ``(C, H, W)``);
    a plain float32 cast when there is no normalization."""
    out = np.asarray(images, dtype=np.float32)
    if out is images:
        out = out.copy()
    if mean is None:
        return out
    shape = (-1, 1, 1)
    out -= np.asarray(mean, np.float32).reshape(shape)
    out /= np.asarray(std, np.float32).reshape(shape)
    return out


# ----------------------------------------------------------------------------------------------
# the stream


@dataclass(frozen=True)
class TileInfo:
    """Where a tile lies: GDAL geotransform, SRID and bounds (minx, miny, maxx, maxy)."""

    tile_id: int
    transform: tuple[float, float, float, float, float, float]
    srid: int
    bounds: tuple[float, float, float, float]


@dataclass
class _Job:
    """Everything the producer thread needs for one epoch (no reference to the stream)."""

    dsn: str | None
    dataset: str
    source: str
    transport: str
    application_name: str
    seq: np.ndarray  # tile ids in delivery order, nbatches * batch_size
    pads: np.ndarray
    batch_size: int
    image_shape: tuple[int, int, int]
    wire_dtype: np.dtype
    out_dtype: np.dtype
    mean: np.ndarray | None
    std: np.ndarray | None
    augment: bool
    seed: int
    epoch: int
    chunk_size: int
    rows_per_fetch: int
    connections: int
    timeout_s: float | None
    max_reconnects: int | None
    reconnect_window_s: float
    stats: dict[str, Any] = field(default_factory=dict)


class GeoStream:
    """Iterate a dataset's split as numpy batches; see the module docstring.

    ``for batch in stream`` runs the current epoch (``stream.epoch``) and advances it when the
    epoch was read to the end; :meth:`iter_epoch` runs any epoch without side effects. The
    connection is opened by the iterator (lazily), so a stream is cheap to keep around; the
    constructor only reads the dataset's tile ids and statistics once.

    Parameters (all but ``dsn`` and ``dataset`` keyword-only):

    * ``dsn``: one server, or a list (a primary and its read replicas): each shard reads from
      ``dsn[shard % len(dsn)]`` (:func:`read_dsn`), so parallel readers spread over them.
    * ``sampling``: SQL returning ``(tile_id, weight)``; epochs become weighted draws.

    * ``split``: ``'train'``, ``'val'``, ``'test'``, ``'excluded'`` or ``'all'`` (the first three);
      ``None`` in live mode.
    * ``batch_size``, ``shuffle``, ``seed``, ``epoch``: the epoch order is a permutation seeded
      by (seed, epoch).
    * ``num_parts``/``part_index`` (machines, ranks) and ``num_workers``/``worker_id`` (loader
      workers): the shard, see :func:`epoch_batches`.
    * ``last_batch``: ``'pad'`` (default), ``'discard'`` or ``'rollover'``.
    * ``normalize``: ``None`` = the dataset's band statistics when it has some, ``True`` = they
      are required, ``False`` = none, or ``(mean, std)`` per band. Batches stay in the chips'
      dtype (uint8) unless ``dtype='float32'``; :meth:`normalize`, ``mean`` and ``std`` let an
      adapter normalize on the device instead.
    * ``augment``: flips and 90° rotations, the same for image and label, seeded by
      (seed, epoch, tile_id).
    * ``prefetch``: batches queued ahead by the background thread.
    * ``transport``: ``'copy'`` (binary COPY, default) or ``'cursor'`` (binary server-side
      cursor, ``fetch_bytes`` per fetch). ``chunk_size``: ids per COPY statement.
    * ``connections``: parallel connections (default 1; live mode 2). More than one fetches
      groups of chips concurrently and still delivers them in order.
    * ``source``: ``'chips'`` (the chip store) or ``'live'`` (see :meth:`live`).
    * ``max_batches``: stop each epoch after that many batches.
    * ``timeout_s``: ``statement_timeout`` of the stream's queries (:class:`QueryTimeout`,
      never retried). After a lost connection the stream reconnects and resumes where it was,
      retrying with backoff for ``reconnect_window_s`` seconds (default 60, or
      ``PGGEOLEARN_RECONNECT_S``: long enough for a server restart), at most ``max_reconnects``
      attempts when given; then one :class:`~pggeolearn.errors.ConnectionLost`.
    * ``application_name``: shown in ``pg_stat_activity`` (default: unique per stream).
    """

    def __init__(
        self,
        dsn: str | Sequence[str] | None,
        dataset: str,
        *,
        split: str | None = "train",
        batch_size: int = 32,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        num_parts: int = 1,
        part_index: int = 0,
        num_workers: int = 1,
        worker_id: int = 0,
        last_batch: str = "pad",
        normalize: bool | None | tuple[Sequence[float], Sequence[float]] = None,
        augment: bool = False,
        dtype: str | np.dtype | None = None,
        prefetch: int = 2,
        transport: str = "copy",
        max_batches: int | None = None,
        source: str = "chips",
        connections: int | None = None,
        chunk_size: int = 1024,
        fetch_bytes: int = 8 << 20,
        timeout_s: float | None = None,
        max_reconnects: int | None = None,
        reconnect_window_s: float | None = None,
        application_name: str | None = None,
        sampling: str | None = None,
    ):
        if source not in SOURCES:
            raise errors.ConfigError(f"source must be one of {', '.join(SOURCES)}, not {source!r}")
        if transport not in TRANSPORTS:
            raise errors.ConfigError(
                f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
        if last_batch not in LAST_BATCH:
            raise errors.ConfigError(
                f"last_batch must be one of {', '.join(LAST_BATCH)}, not {last_batch!r}")
        if batch_size < 1:
            raise errors.ConfigError(f"batch_size must be >= 1, not {batch_size}")
        if connections is None:
            connections = 2 if source == "live" else 1
        if prefetch < 1 or connections < 1 or chunk_size < 1:
            raise errors.ConfigError("prefetch, connections and chunk_size must be >= 1")
        if max_batches is not None and max_batches < 0:
            raise errors.ConfigError("max_batches must be >= 0")
        self.shard, self.world = shard_index(num_parts, part_index, num_workers, worker_id)
        self.dsn = read_dsn(dsn, self.shard)
        self.dataset_name, self.source = dataset, source
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self.epoch = int(epoch)
        self.last_batch, self.augment, self.prefetch = last_batch, bool(augment), int(prefetch)
        self.transport, self.max_batches = transport, max_batches
        self.connections, self.chunk_size = int(connections), int(chunk_size)
        self.fetch_bytes, self.timeout_s = int(fetch_bytes), timeout_s
        self.max_reconnects = None if max_reconnects is None else int(max_reconnects)
        self.reconnect_window_s = retry.Window(reconnect_window_s).window_s
        self.application_name = (application_name or f"pggeolearn-stream-{uuid.uuid4().hex[:12]}")[:63]
        self._iterators: weakref.WeakSet[BatchIterator] = weakref.WeakSet()
        self._stats: dict[str, Any] = {"reconnects": 0, "resumed_at": [], "empty_tiles": 0}
        self._closed = False

        if source == "live":
            if split not in (None, "all"):
                raise errors.ConfigError(
                    "live mode reads the whole grid: splits exist only in the chip store "
                    "(pass split=None, or build chips first)")
            self.split = None
        else:
            if split is None or split == "all":
                self.split = "all"
            elif split in SPLITS:
                self.split = split
            else:
                raise errors.ConfigError(
                    f"unknown split {split!r}: use one of {', '.join(SPLITS)} or 'all'")
        self._setup(normalize)
        self.weights = None if sampling is None else self._sampling_weights(sampling)
        self.out_dtype = self.image_dtype if dtype is None else np.dtype(dtype)
        if self.out_dtype.kind != "f" and self.out_dtype != self.image_dtype:
            raise errors.ConfigError(
                f"dtype must be the chips' own ({self.image_dtype}) or a float type, not {self.out_dtype}")

    @classmethod
    def live(cls, dsn: str | None, dataset: str, *, connections: int = 2,
             **kwargs: Any) -> GeoStream:
        """A stream of tiles computed on the fly by ``pggeolearn.image_tile()/label_tile()``,
        without a chip store, over ``connections`` parallel READ ONLY connections. For quick
        looks at a new recipe; a tile without imagery comes out all zeros (counted in
        ``stream.empty_tiles``)."""
        kwargs.setdefault("split", None)
        return cls(dsn, dataset, source="live", connections=connections, **kwargs)

    # -- setup (one short connection) ---------------------------------------------------------
    def _setup(self, norm: Any) -> None:
        from pggeolearn import datasets

        kwargs: dict[str, Any] = {"application_name": self.application_name}
        if self.timeout_s:
            kwargs["options"] = f"-c statement_timeout={int(self.timeout_s * 1000)}"
        with retry.connect(self.dsn, window_s=self.reconnect_window_s, max_attempts=self.max_reconnects,
                           autocommit=True, **kwargs) as conn:  # a restart between epochs: wait
            ds = datasets.get(conn, self.dataset_name)
            self.dataset = ds
            r = ds.recipe
            self.classes: dict[int, str] = dict(r.classes)
            self.srid = r.srid
            if self.source == "live":
                self.ids = np.arange(ds.n_tiles, dtype=np.int64)
                probe = self._probe_live(conn, ds)
            else:
                splits = list(TRAINING_SPLITS) if self.split == "all" else [self.split]
                with db_errors("listing chips"):
                    rows = conn.execute(
                        "SELECT tile_id, recipe_hash = %s FROM pggeolearn.chips WHERE dataset = %s"
                        " AND split = ANY(%s::text[]) ORDER BY tile_id",
                        [ds.recipe_hash, ds.name, splits]).fetchall()
                self.ids = np.fromiter((t for t, _ in rows), np.int64, len(rows))
                if not len(self.ids):
                    self._not_built(conn, ds.name)
                stale = sum(1 for _, current in rows if not current)
                if stale:
                    raise errors.NotBuilt(
                        f"dataset {ds.name}: {stale} chip(s) of split {self.split} were built from "
                        f"an older recipe (run: pggeolearn chips build {ds.name})")
                with db_errors("probing chips"):
                    probe = conn.execute(sql_text("stream_probe"),
                                         {"dataset": ds.name, "splits": splits}).fetchone()
                if probe is None:
                    raise errors.ChipError(
                        f"dataset {ds.name}: every chip in split {self.split} has a NULL image")
        tile_id, bands, pixtype, width, height = probe
        if (width, height) != (r.tile_px, r.tile_px):
            raise errors.ChipError(
                f"chip {tile_id} of dataset {ds.name} is {width}x{height} px, the recipe says "
                f"{r.tile_px}x{r.tile_px}")
        self.image_shape = (int(bands), r.tile_px, r.tile_px)
        self.label_shape = (r.tile_px, r.tile_px)
        self.image_dtype = wkb.PIXEL_TYPES[pixtype].dtype
        self.mean, self.std = self._normalization(norm, ds.stats, int(bands))

    def _probe_live(self, conn: psycopg.Connection, ds: Any) -> tuple:
        centre = (ds.nrows // 2) * ds.ncols + ds.ncols // 2
        candidates = list(dict.fromkeys([centre, 0, ds.n_tiles - 1]))
        for tile in candidates:
            try:
                with read_only(conn, self.timeout_s or DEFAULT_TIMEOUT_S):
                    row = conn.execute(
                        "SELECT ST_NumBands(r), ST_BandPixelType(r, 1), ST_Width(r), ST_Height(r)"
                        " FROM (SELECT pggeolearn.image_tile(%s, %s) AS r) t WHERE r IS NOT NULL",
                        [ds.name, tile]).fetchone()
            except psycopg.Error as exc:
                raise translate(exc, f"live tile {tile} of {ds.name}") from exc
            if row is not None:
                return (tile, *row)
        raise errors.RecipeError(
            f"dataset {ds.name}: tiles {', '.join(map(str, candidates))} have no imagery; "
            "cannot tell the band count")

    @staticmethod
    def _not_built(conn: psycopg.Connection, name: str) -> None:
        counts = dict(conn.execute(
            "SELECT coalesce(split, 'none'), count(*) FROM pggeolearn.chips WHERE dataset = %s"
            " GROUP BY 1 ORDER BY 1", [name]).fetchall())
        if not counts:
            raise errors.NotBuilt(f"dataset {name} has no chips yet (run: pggeolearn chips build {name})")
        have = ", ".join(f"{k} {v}" for k, v in counts.items())
        raise errors.NotBuilt(f"dataset {name} has no chips in this split (it has: {have})")

    def _normalization(self, norm: Any, stats: dict | None,
                       bands: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        if norm is False:
            return None, None
        if norm is None or norm is True:
            band_stats = (stats or {}).get("bands")
            if not band_stats:
                if norm:
                    raise errors.ConfigError(
                        f"dataset {self.dataset_name} has no band statistics yet (build its chips), "
                        "pass normalize=(mean, std) or normalize=False")
                return None, None
            mean = [b["mean"] for b in band_stats]
            # a constant band (std 0, e.g. an all-zero or alpha band) is only centred
            std = [b["std"] if b.get("std") and math.isfinite(b["std"]) and b["std"] > 0 else 1.0
                   for b in band_stats]
        else:
            try:
                mean, std = norm
            except (TypeError, ValueError):
                raise errors.ConfigError("normalize must be True, False, None or (mean, std)") from None
        m = np.broadcast_to(np.asarray(mean, np.float32), (bands,)).copy() if np.ndim(mean) == 0 \
            else np.asarray(mean, np.float32)
        s = np.broadcast_to(np.asarray(std, np.float32), (bands,)).copy() if np.ndim(std) == 0 \
            else np.asarray(std, np.float32)
        if m.shape != (bands,) or s.shape != (bands,):
            raise errors.ConfigError(
                f"normalization needs {bands} means and stds (one per band), got {m.size} and {s.size}")
        if not np.all(s > 0):
            raise errors.ConfigError(f"normalization std must be > 0, got {s.tolist()}")
        return m, s

    # -- what a training loop asks ---------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Samples of this shard in one epoch (before padding or discarding)."""
        return len(self.ids[self.shard::self.world])

    @property
    def normalization(self) -> dict[str, list[float]] | None:
        """``{"mean": [...], "std": [...]}`` per band, or None (for the model registry)."""
        if self.mean is None:
            return None
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @property
    def reconnects(self) -> int:
        """How many times a lost connection was resumed (all epochs)."""
        return self._stats["reconnects"]

    @property
    def resumed_at(self) -> list[int]:
        """Positions in the epoch's delivery order where reading resumed after a lost connection."""
        return list(self._stats["resumed_at"])

    @property
    def empty_tiles(self) -> int:
        """Live mode: tiles delivered as zeros because they have no imagery."""
        return self._stats["empty_tiles"]

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 (or other) images -> normalized float32 with this stream's mean/std."""
        return normalize(images, self.mean, self.std)

    def _sampling_weights(self, query: str) -> np.ndarray:
        """One weight per chip of the stream's split from a user query returning
        ``(tile_id, weight)`` rows over the chip store; chips it leaves out get weight 0."""
        if self.source == "live":
            raise errors.ConfigError("a sampling query needs the chip store (not live mode)")
        if not (query or "").strip().rstrip(";").strip():
            raise errors.ConfigError("the sampling query is empty")
        q = usersql.embed("SELECT s.tile_id::bigint, s.weight::float8 FROM ({q}) AS s", q=query)
        with connect(self.dsn, autocommit=True, application_name=self.application_name) as conn:
            try:
                with read_only(conn, self.timeout_s or DEFAULT_TIMEOUT_S):
                    rows = usersql.rows(conn, q, None, [("tile_id", "bigint"), ("weight", "float8")])
            except psycopg.Error as exc:
                raise errors.ConfigError(f"sampling query fails: {first_line(exc)} (it must "
                                         "return columns tile_id and weight)") from exc
        weights = np.zeros(len(self.ids), np.float64)
        pos = {int(t): i for i, t in enumerate(self.ids)}
        for tile_id, weight in rows:
            if weight is None or not np.isfinite(weight) or weight < 0:
                raise errors.ConfigError(f"sampling query gave tile {tile_id} the weight {weight}: "
                                         "weights must be finite and >= 0")
            if tile_id in pos:
                weights[pos[tile_id]] += weight
        if weights.sum() <= 0:
            raise errors.ConfigError(f"sampling query selects no chip of split {self.split} of "
                                     f"dataset {self.dataset_name} with a weight above 0")
        return weights

    def plan(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The tile ids ``(nbatches, batch_size)`` and pads this shard delivers in ``epoch``."""
        ids, pads = epoch_batches(
            self.ids, epoch=self.epoch if epoch is None else epoch, batch_size=self.batch_size,
            seed=self.seed, shuffle=self.shuffle, shard=self.shard, world=self.world,
            last_batch=self.last_batch, weights=self.weights)
        if self.max_batches is not None:
            ids, pads = ids[: self.max_batches], pads[: self.max_batches]
        return ids, pads

    def __len__(self) -> int:
        return len(self.plan()[1])

    def tile_info(self, tile_ids: Iterable[int]) -> dict[int, TileInfo]:
        """Geotransform, SRID and bounds of tiles of this dataset's grid (no database)."""
        r, ncols = self.dataset.recipe, self.dataset.ncols
        minx, _, _, maxy = r.extent
        stride = (r.tile_px - r.overlap_px) * r.resolution
        size = r.tile_px * r.resolution
        out = {}
        for t in tile_ids:
            t = int(t)
            if not 0 <= t < self.dataset.n_tiles:
                raise errors.ConfigError(f"tile {t} is outside dataset {self.dataset_name} "
                                         f"(tiles 0..{self.dataset.n_tiles - 1})")
            row, col = divmod(t, ncols)
            x0, y0 = minx + col * stride, maxy - row * stride
            out[t] = TileInfo(t, (x0, r.resolution, 0.0, y0, 0.0, -r.resolution), r.srid,
                              (x0, y0 - size, x0 + size, y0))
        return out

    # -- iteration -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """The epoch the next ``iter(stream)`` runs (decides shuffle, augmentation, rollover)."""
        self.epoch = int(epoch)

    def __iter__(self) -> BatchIterator:
        ref = weakref.ref(self)

        def advance(done_epoch: int) -> None:
            stream = ref()
            if stream is not None and stream.epoch == done_epoch:
                stream.epoch = done_epoch + 1

        return self.iter_epoch(self.epoch, on_done=advance)

    def iter_epoch(self, epoch: int, *, on_done: Callable[[int], None] | None = None) -> BatchIterator:
        """An iterator over the batches of ``epoch`` (starts a prefetch thread on first next())."""
        if self._closed:
            raise errors.ConfigError("this GeoStream is closed")
        seq, pads = self.plan(epoch)
        row_bytes = math.prod(self.image_shape) * self.image_dtype.itemsize \
            + math.prod(self.label_shape) + 200
        job = _Job(
            dsn=self.dsn, dataset=self.dataset_name, source=self.source, transport=self.transport,
            application_name=self.application_name, seq=seq.reshape(-1), pads=pads,
            batch_size=self.batch_size, image_shape=self.image_shape,
            wire_dtype=self.image_dtype, out_dtype=self.out_dtype,
            mean=self.mean, std=self.std, augment=self.augment, seed=self.seed, epoch=int(epoch),
            chunk_size=self.chunk_size, rows_per_fetch=max(1, self.fetch_bytes // row_bytes),
            connections=self.connections, timeout_s=self.timeout_s,
            max_reconnects=self.max_reconnects, reconnect_window_s=self.reconnect_window_s,
            stats=self._stats)
        it = BatchIterator(job, self.prefetch, on_done)
        self._iterators.add(it)
        return it

    def close(self) -> None:
        """Stop every running iterator of this stream and close its connections."""
        self._closed = True
        for it in list(self._iterators):
            it.close()

    def __enter__(self) -> GeoStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = "live" if self.source == "live" else f"split={self.split}"
        return (f"GeoStream({self.dataset_name!r}, {where}, {len(self.ids)} tiles, "
                f"batch_size={self.batch_size}, shard {self.shard}/{self.world}, epoch={self.epoch})")


class BatchIterator:
    """The batches of one epoch of one shard; runs a prefetch thread; close() stops it."""

    def __init__(self, job: _Job, prefetch: int, on_done: Callable[[int], None] | None = None):
        self._job = job
        self._run = _Run(job, prefetch)
        self._on_done = on_done
        self._remaining = len(job.pads)
        self._finished = False

    def __iter__(self) -> BatchIterator:
        return self

    def __len__(self) -> int:
        return self._remaining

    @property
    def application_name(self) -> str:
        return self._job.application_name

    def __next__(self) -> Batch:
        if self._finished:
            raise StopIteration
        try:
            item = self._run.get()
        except BaseException:
            self._finished = True
            self._run.close()
            raise
        if item is _END:
            self._finished = True
            self._run.close()
            if self._on_done is not None:
                self._on_done(self._job.epoch)
            raise StopIteration
        self._remaining -= 1
        return item

    def close(self) -> None:
        """Stop prefetching and close the connections (idempotent)."""
        self._finished = True
        self._run.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: S110 - never raise from a finalizer
            pass


# ----------------------------------------------------------------------------------------------
# the producer thread

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Stopped(Exception):
    """The consumer closed the iterator; the producer unwinds quietly."""



_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_COPY_HEADER = len(_COPY_SIGNATURE) + 8  # signature, int32 flags, int32 extension length (0)


class _CopyParser:
    """Rows ``(tile_id, image, label)`` of ``COPY ... (FORMAT BINARY)`` as memoryviews into the
    received messages (no copy). PostgreSQL sends one row per message (the header rides with
    the first); rows split across messages are still handled, by joining them."""

    def __init__(self) -> None:
        self._header = True
        self._carry: bytes = b""
        self.done = False

    def rows(self, msg: memoryview) -> list[tuple[int, memoryview | None, memoryview | None]]:
        buf: memoryview = msg if not self._carry else memoryview(self._carry + bytes(msg))
        pos, end = 0, len(buf)
        if self._header:
            if end < _COPY_HEADER:
                self._carry = bytes(buf)
                return []
            if bytes(buf[: len(_COPY_SIGNATURE)]) != _COPY_SIGNATURE:
                raise errors.DatabaseError("COPY stream does not start with the binary signature")
            ext = _I32.unpack_from(buf, len(_COPY_SIGNATURE) + 4)[0]
            pos = _COPY_HEADER + ext
            self._header = False
        out = []
        while pos < end:
            row = self._row(buf, pos, end)
            if row is None:
                break
            pos, item = row
            if item is not None:
                out.append(item)
        self._carry = bytes(buf[pos:]) if pos < end else b""
        return out

    def _row(self, buf: memoryview, pos: int, end: int):
        if end - pos < 2:
            return None
        nfields = _I16.unpack_from(buf, pos)[0]
        if nfields == -1:
            self.done = True
            return pos + 2, None
        if nfields != 3:
            raise errors.DatabaseError(f"COPY row has {nfields} fields, expected 3")
        p = pos + 2
        fields: list[memoryview | None] = []
        for _ in range(3):
            if end - p < 4:
                return None
            n = _I32.unpack_from(buf, p)[0]
            p += 4
            if n < 0:
                fields.append(None)
                continue
            if end - p < n:
                return None
            fields.append(buf[p:p + n])
            p += n
        if fields[0] is None or len(fields[0]) != 4:
            raise errors.DatabaseError("COPY row without a tile id")
        return p, (_I32.unpack_from(fields[0])[0], fields[1], fields[2])


class _Run:
    """One epoch of one shard, produced by a background thread into a bounded queue."""

    def __init__(self, job: _Job, prefetch: int):
        self.job = job
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        self.pos = 0  # next position of job.seq to place into a batch
        self._batch: Batch | None = None
        self._lock = threading.Lock()
        self._conns: list[psycopg.Connection] = []
        self._closed = False
        self._connected = False
        self._thread: threading.Thread | None = None

    # -- consumer side -------------------------------------------------------------------------
    def get(self) -> Any:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, daemon=True,
                                            name=f"{self.job.application_name}-prefetch")
            self._thread.start()
        while True:
            try:
                item = self.queue.get(timeout=0.5)
            except queue.Empty:
                if not self._thread.is_alive() and self.queue.empty():
                    raise errors.DatabaseError("the stream's prefetch thread stopped unexpectedly") from None
                continue
            if isinstance(item, _Failure):
                raise item.exc
            return item

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        self.stop.set()
        self._cancel_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        while True:  # drop prefetched batches now
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break

    def _cancel_all(self) -> None:
        # under the lock: a connection must not be closed (freed) while it is being cancelled
        with self._lock:
            for c in self._conns:
                if c.closed:
                    continue
                try:
                    c.cancel_safe(timeout=2.0)
                except Exception:  # noqa: S110 - best effort: the producer closes it anyway
                    pass

    # -- producer side -------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            if self.job.source == "chips" and self.job.connections == 1:
                self._produce_chips()
            else:
                self._produce_parallel()
            self._put(_END)
        except _Stopped:
            pass
        except BaseException as exc:  # re-raised in the consumer
            try:
                self._put(_Failure(exc))
            except _Stopped:
                pass
        finally:
            with self._lock:
                for c in self._conns:
                    try:
                        c.close()
                    except Exception:  # noqa: S110
                        pass
                self._conns = []

    def _put(self, item: Any) -> None:
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _connect(self) -> psycopg.Connection:
        job = self.job
        kwargs: dict[str, Any] = {"application_name": job.application_name}
        if job.timeout_s:
            kwargs["options"] = f"-c statement_timeout={int(job.timeout_s * 1000)}"
        try:
            conn = connect(job.dsn, autocommit=True, **kwargs)
        except errors.DatabaseError as exc:
            if not self._connected:
                raise
            # reconnecting after a lost connection: the server may be restarting, try again
            raise errors.ConnectionLost(str(exc)) from exc
        self._connected = True
        with self._lock:
            self._conns.append(conn)
        if self.stop.is_set():
            raise _Stopped
        return conn

    def _discard(self, conn: psycopg.Connection | None) -> None:
        if conn is None:
            return
        with self._lock:
            if conn in self._conns:
                self._conns.remove(conn)
            try:
                conn.close()
            except Exception:  # noqa: S110
                pass

    def _retry_or_raise(self, exc: BaseException, window: retry.Window, at: int | None = None) -> None:
        """Called in an except block: return to resume, or raise the error to report."""
        if self.stop.is_set():
            raise _Stopped from None
        err = translate(exc, f"streaming dataset {self.job.dataset}") \
            if isinstance(exc, psycopg.Error) else exc
        if not isinstance(err, errors.ConnectionLost):
            if err is exc:
                raise exc
            raise err from exc
        delay = window.next_delay()
        if delay is None:
            raise errors.ConnectionLost(
                f"lost the database while streaming dataset {self.job.dataset} and could not resume "
                f"({window.describe()}): {str(err).splitlines()[0]}") from exc
        at = self.pos if at is None else at
        log.warning("%s; resuming at position %d of the epoch (attempt %d, %s)",
                    err, at, window.attempts, window.describe())
        self.job.stats["reconnects"] += 1
        self.job.stats["resumed_at"].append(at)
        if self.stop.wait(delay):
            raise _Stopped from None

    def _window(self) -> retry.Window:
        return retry.Window(self.job.reconnect_window_s, self.job.max_reconnects)

    def _produce_chips(self) -> None:
        job = self.job
        total = len(job.seq)
        window, conn = self._window(), None
        while self.pos < total:
            start = self.pos
            try:
                if conn is None:
                    conn = self._connect()
                while self.pos < total:
                    ids = job.seq[self.pos:self.pos + job.chunk_size]
                    if job.transport == "copy":
                        self._fetch_copy(conn, ids)
                    else:
                        self._fetch_cursor(conn, ids)
            except (psycopg.Error, errors.DatabaseError) as exc:
                self._discard(conn)
                conn = None
                if self.pos > start:
                    window.reset()
                self._retry_or_raise(exc, window)
        self._discard(conn)

    def _fetch_copy(self, conn: psycopg.Connection, ids: np.ndarray) -> None:
        end = self.pos + len(ids)
        stmt = sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(sql.SQL(sql_text("stream_chips")))
        params = {"ids": ids.tolist(), "dataset": self.job.dataset}
        parser = _CopyParser()
        with conn.cursor() as cur, cur.copy(stmt, params) as cp:
            for msg in cp:
                for tile_id, image, label in parser.rows(msg):
                    self._place(tile_id, image, label)
        if self.pos != end or not parser.done:
            raise errors.DatabaseError(
                f"chip COPY ended early: {self.pos - (end - len(ids))} of {len(ids)} rows")

    def _fetch_cursor(self, conn: psycopg.Connection, ids: np.ndarray) -> None:
        end = self.pos + len(ids)
        params = {"ids": ids.tolist(), "dataset": self.job.dataset}
        with conn.transaction():
            with conn.cursor(name="pggeolearn_stream", binary=True) as cur:
                cur.execute(sql_text("stream_chips"), params)
                while rows := cur.fetchmany(self.job.rows_per_fetch):
                    for tile_id, image, label in rows:
                        self._place(tile_id, image, label)
        if self.pos != end:
            raise errors.DatabaseError(
                f"chip cursor ended early: {self.pos - (end - len(ids))} of {len(ids)} rows")

    # -- several connections in parallel (live mode, or chips with connections > 1) ------------
    def _produce_parallel(self) -> None:
        """Groups of ids are fetched by ``connections`` threads, each on its own connection, and
        placed in order; a group is retried as a whole on a lost connection (it was not placed
        yet), so the order stays exact. At most 2 groups per connection are in flight."""
        job = self.job
        total = len(job.seq)
        if job.source == "live":  # tiles are computed: small groups keep every connection busy
            group = max(1, math.ceil(job.batch_size / job.connections))
        else:
            group = max(1, min(job.chunk_size, job.rows_per_fetch))
        starts = iter(range(0, total, group))
        local = threading.local()
        pending: collections.deque[Future] = collections.deque()
        name = f"{job.application_name}-fetch"
        with ThreadPoolExecutor(job.connections, thread_name_prefix=name) as pool:
            try:
                def submit() -> None:
                    s = next(starts, None)
                    if s is not None:
                        pending.append(pool.submit(self._fetch_group, local, s, job.seq[s:s + group]))

                for _ in range(2 * job.connections):
                    submit()
                while pending:
                    rows = self._wait(pending.popleft())
                    submit()
                    for tile_id, image, label in rows:
                        self._place(tile_id, image, label)
            finally:
                for fut in pending:
                    fut.cancel()
                if self.stop.is_set() or pending:
                    self._cancel_all()

    def _wait(self, fut: Future) -> list:
        # not fut.result(timeout=...): its TimeoutError would catch our QueryTimeout too
        while not futures_wait([fut], timeout=0.2).done:
            if self.stop.is_set():
                raise _Stopped
        return fut.result()

    def _fetch_group(self, local: threading.local, start: int, ids: np.ndarray) -> list:
        """Rows ``(tile_id, image, label)`` of ``ids`` on this thread's connection."""
        job = self.job
        params = {"ids": ids.tolist(), "dataset": job.dataset}
        window = self._window()
        while True:
            if self.stop.is_set():
                raise _Stopped
            conn = getattr(local, "conn", None)
            try:
                if conn is None:
                    conn = local.conn = self._connect()
                if job.source == "live":
                    with read_only(conn, job.timeout_s or DEFAULT_TIMEOUT_S), \
                            conn.cursor(binary=True) as cur:
                        return cur.execute(sql_text("stream_live"), params).fetchall()
                if job.transport == "cursor":
                    with conn.cursor(binary=True) as cur:
                        return cur.execute(sql_text("stream_chips"), params).fetchall()
                parser, rows = _CopyParser(), []
                stmt = sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(
                    sql.SQL(sql_text("stream_chips")))
                with conn.cursor() as cur, cur.copy(stmt, params) as cp:
                    for msg in cp:  # the rows keep views of the messages, not copies
                        rows += parser.rows(msg)
                        if self.stop.is_set():
                            raise _Stopped
                if len(rows) != len(ids) or not parser.done:
                    raise errors.DatabaseError(f"chip COPY ended early: {len(rows)} of {len(ids)} rows")
                return rows
            except (psycopg.Error, errors.DatabaseError) as exc:
                self._discard(conn)
                local.conn = None
                self._retry_or_raise(exc, window, start)

    # -- decoding into the batch --------------------------------------------------------------
    def _new_batch(self) -> Batch:
        job = self.job
        b = job.batch_size
        c, h, w = job.image_shape
        return {
            "image": np.empty((b, c, h, w), job.out_dtype),
            "label": np.empty((b, h, w), np.uint8),
            "valid": np.empty((b, h, w), bool),
            "tile_id": np.empty(b, np.int64),
            "transform": np.empty((b, 6), np.float64),
            "srid": np.empty(b, np.int32),
            "pad": 0,
        }

    def _place(self, tile_id: int, image: Any, label: Any) -> None:
        job = self.job
        expected = int(job.seq[self.pos])
        if tile_id != expected:
            raise errors.DatabaseError(f"chip stream out of order: got tile {tile_id}, expected {expected}")
        k, slot = divmod(self.pos, job.batch_size)
        if slot == 0:
            self._batch = self._new_batch()
        batch = self._batch
        img_view, lab_view, gt, srid, valid = self._decode(tile_id, image, label)
        if job.augment:
            code = aug_code(job.seed, job.epoch, tile_id)
            lab_view = dihedral(lab_view, code)
            valid = dihedral(valid, code)
            if img_view is not None:
                img_view = dihedral(img_view, code)
        if img_view is None:
            batch["image"][slot] = 0 if job.mean is None or job.out_dtype.kind != "f" \
                else -job.mean.reshape(-1, 1, 1)
        elif job.out_dtype.kind == "f" and job.mean is not None:
            # cast and subtract the mean in one pass; the batch is divided by std when full
            np.subtract(img_view, job.mean.reshape(-1, 1, 1), out=batch["image"][slot],
                        casting="unsafe")
        else:
            np.copyto(batch["image"][slot], img_view, casting="unsafe")
        np.copyto(batch["label"][slot], lab_view)
        batch["valid"][slot] = valid
        batch["tile_id"][slot] = tile_id
        batch["transform"][slot] = gt
        batch["srid"][slot] = srid
        self.pos += 1
        if slot == job.batch_size - 1:
            batch["pad"] = int(job.pads[k])
            if job.out_dtype.kind == "f" and job.mean is not None:
                batch["image"] *= (1.0 / job.std).astype(job.out_dtype).reshape(-1, 1, 1)
            self._batch = None
            self._put(batch)
        if self.stop.is_set():
            raise _Stopped

    def _decode(self, tile_id: int, image: Any, label: Any):
        job = self.job
        name = f"chip {tile_id} of dataset {job.dataset}"
        if label is None:
            raise errors.ChipError(f"{name} has no label (NULL or missing chip)")
        try:
            lab = wkb.decode(label)
        except errors.RasterFormatError as exc:
            raise errors.ChipError(f"{name}: label: {exc}") from None
        h, w = job.image_shape[1:]
        if lab.data.shape != (1, h, w) or lab.data.dtype != np.uint8:
            raise errors.ChipError(f"{name}: label is {lab.data.shape[0]} band(s) of "
                                   f"{'/'.join(lab.pixel_types)} {lab.width}x{lab.height}, "
                                   f"expected one 8BUI band of {w}x{h}")
        if image is None:
            if job.source == "live":
                job.stats["empty_tiles"] += 1
                return None, lab.data[0], lab.geotransform, lab.srid, np.zeros((h, w), bool)
            raise errors.ChipError(f"{name} has no image (NULL or missing chip)")
        try:
            img = wkb.decode(image)
        except errors.RasterFormatError as exc:
            raise errors.ChipError(f"{name}: image: {exc}") from None
        if img.data.shape != job.image_shape or img.data.dtype.newbyteorder("=") != job.wire_dtype:
            c = job.image_shape[0]
            raise errors.ChipError(
                f"{name}: image is {img.bands} band(s) of {'/'.join(img.pixel_types) or '-'} "
                f"{img.width}x{img.height}, expected {c} band(s) of {job.wire_dtype} {w}x{h}")
        return img.data, lab.data[0], img.geotransform, img.srid, img.valid()


# ----------------------------------------------------------------------------------------------
# show-batch: one batch as a picture


MIN_CELL_PX = 128
GAP_PX = 4


def class_colour(class_id: int) -> tuple[int, int, int]:
    """The overlay colour of a class id (1-based; 0 is background and not drawn): the one
    QGIS styles use too (:mod:`pggeolearn.palette`)."""
    from pggeolearn.palette import class_colour as colour

    return colour(class_id)


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` -> ``(H, W, 3)`` uint8: the first three bands (or grey), stretched to
    2-98 % when the pixels are not uint8."""
    bands = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    if bands.dtype != np.uint8:
        out = np.empty(bands.shape, np.uint8)
        for i, b in enumerate(bands.astype(np.float64)):
            lo, hi = np.percentile(b, (2, 98))
            out[i] = np.clip((b - lo) / max(hi - lo, 1e-12) * 255, 0, 255)
        bands = out
    return np.ascontiguousarray(np.moveaxis(bands, 0, -1))


@dataclass
class ShowBatchResult:
    path: Path
    size: tuple[int, int]
    tiles: list[int]
    classes: dict[int, str]

    def __str__(self) -> str:
        legend = ", ".join(f"{k}={v} rgb{class_colour(k)}" for k, v in self.classes.items())
        return (f"wrote {self.path} ({self.size[0]}x{self.size[1]} px, tiles "
                f"{', '.join(map(str, self.tiles))}); overlay colours: {legend}")


def show_batch(dsn: str | None, dataset: str, *, out: str | Path, split: str = "train", n: int = 8,
               augment: bool = False, seed: int = 0, epoch: int = 0, alpha: float = 0.45,
               columns: int = 4) -> ShowBatchResult:
    """Write one batch of ``dataset``/``split`` as a PNG: each chip (augmented if asked) with
    its label drawn over it in translucent class colours, in a grid of ``columns``."""
    from PIL import Image

    if n < 1:
        raise errors.ConfigError("n must be >= 1")
    with GeoStream(dsn, dataset, split=split, batch_size=n, seed=seed, epoch=epoch,
                   augment=augment, normalize=False, prefetch=1, max_batches=1) as stream:
        batch = next(iter(stream), None)
        classes = stream.classes
    if batch is None:
        raise errors.NotBuilt(f"dataset {dataset} has no chips in split {split}")
    shown = n - batch["pad"]
    _, h, w = batch["image"].shape[1:]
    scale = max(1, math.ceil(MIN_CELL_PX / max(h, w)))
    cols = min(columns, shown)
    rows = math.ceil(shown / cols)
    size = (cols * w * scale + (cols + 1) * GAP_PX, rows * h * scale + (rows + 1) * GAP_PX)
    canvas = np.full((size[1], size[0], 3), 32, np.uint8)
    lut = np.zeros((256, 3), np.float32)
    for k in range(1, 256):
        lut[k] = class_colour(k)
    for i in range(shown):
        rgb = _to_rgb(batch["image"][i]).astype(np.float32)
        lab = batch["label"][i]
        mask = (lab > 0)[..., None]
        cell = np.where(mask, (1 - alpha) * rgb + alpha * lut[lab], rgb).astype(np.uint8)
        cell = cell.repeat(scale, axis=0).repeat(scale, axis=1)
        r, c = divmod(i, cols)
        y0 = GAP_PX + r * (h * scale + GAP_PX)
        x0 = GAP_PX + c * (w * scale + GAP_PX)
        canvas[y0:y0 + h * scale, x0:x0 + w * scale] = cell
    path = Path(out)
    if path.parent and not path.parent.exists():
        raise errors.ConfigError(f"folder {path.parent} does not exist")
    Image.fromarray(canvas, "RGB").save(path, format="PNG")
    return ShowBatchResult(path, size, [int(t) for t in batch["tile_id"][:shown]], classes)
