"""GeoStream: a sampler (which chips, in which order), a transport (how the bytes arrive) and
transforms (augmentation, normalization, dtype), run by a prefetch thread.

See the package docstring (:mod:`pggeolearn.stream`) for what a stream yields and how.
"""

from __future__ import annotations

import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pggeolearn import errors, retry, wkb
from pggeolearn.stream.batch import BatchAssembler, ChipFormat
from pggeolearn.stream.prefetch import BatchIterator, Prefetch
from pggeolearn.stream.sampler import (
    LAST_BATCH,
    SPLITS,
    Sampler,
    chip_ids,
    sampling_weights,
    shard_index,
    split_names,
)
from pggeolearn.stream.transforms import Transforms, normalize, output_dtype, resolve_normalization
from pggeolearn.stream.transport import (
    SOURCES,
    TRANSPORTS,
    Reader,
    Transport,
    probe_chips,
    probe_live,
    read_dsn,
)

__all__ = ["GeoStream", "TileInfo"]


@dataclass(frozen=True)
class TileInfo:
    """Where a tile lies: GDAL geotransform, SRID and bounds (minx, miny, maxx, maxy)."""

    tile_id: int
    transform: tuple[float, float, float, float, float, float]
    srid: int
    bounds: tuple[float, float, float, float]


class GeoStream:
    """Iterate a dataset's split as numpy batches; see the package docstring.

    ``for batch in stream`` runs the current epoch (``stream.epoch``) and advances it when the
    epoch was read to the end; :meth:`iter_epoch` runs any epoch without side effects. The
    connection is opened by the iterator (lazily), so a stream is cheap to keep around; the
    constructor only reads the dataset's tile ids and statistics once.

    A stream is composed of a :class:`~pggeolearn.stream.sampler.Sampler` (``stream.sampler``:
    which chips, in which order), a :class:`~pggeolearn.stream.transport.Transport`
    (``stream.wire``: how the bytes arrive) and :class:`~pggeolearn.stream.transforms.Transforms`
    (``stream.transforms``); the keyword arguments below fill them in.

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
        shard, world = shard_index(num_parts, part_index, num_workers, worker_id)
        self.wire = Transport(
            dsn=read_dsn(dsn, shard), kind=transport, source=source, connections=int(connections),
            chunk_size=int(chunk_size), fetch_bytes=int(fetch_bytes), timeout_s=timeout_s,
            max_reconnects=None if max_reconnects is None else int(max_reconnects),
            reconnect_window_s=retry.Window(reconnect_window_s).window_s,
            application_name=(application_name or f"pggeolearn-stream-{uuid.uuid4().hex[:12]}")[:63])
        self.dataset_name = dataset
        self.epoch = int(epoch)
        self.prefetch = int(prefetch)
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
        ids, bands = self._setup()
        mean, std = resolve_normalization(normalize, self.dataset.stats, bands, self.dataset_name)
        weights = None
        if sampling is not None:
            if source == "live":
                raise errors.ConfigError("a sampling query needs the chip store (not live mode)")
            weights = sampling_weights(
                sampling, ids, dsn=self.dsn, application_name=self.application_name,
                timeout_s=timeout_s, split=self.split, dataset=self.dataset_name)
        self.sampler = Sampler(ids, batch_size=int(batch_size), shuffle=bool(shuffle), seed=int(seed),
                               shard=shard, world=world, last_batch=last_batch, weights=weights,
                               max_batches=max_batches)
        self.transforms = Transforms(output_dtype(dtype, self.image_dtype), mean, std,
                                     augment=bool(augment), seed=int(seed))

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
    def _setup(self) -> tuple[np.ndarray, int]:
        """Read the dataset, its tile ids and the chips' format; ``(ids, bands)``."""
        from pggeolearn import datasets

        wire = self.wire
        with retry.connect(wire.dsn, window_s=wire.reconnect_window_s, max_attempts=wire.max_reconnects,
                           autocommit=True, **wire.connect_kwargs()) as conn:  # a restart between epochs: wait
            ds = datasets.get(conn, self.dataset_name)
            self.dataset = ds
            self.dataset_name = ds.name  # "NAME@N" of the current version is NAME in the store
            r = ds.recipe
            self.classes: dict[int, str] = dict(r.classes)
            self.srid = r.srid
            if self.source == "live":
                ids = np.arange(ds.n_tiles, dtype=np.int64)
                probe = probe_live(conn, ds, wire.timeout_s)
            else:
                ids = chip_ids(conn, ds, self.split)
                probe = probe_chips(conn, ds, split_names(self.split), self.split)
        tile_id, bands, pixtype, width, height = probe
        if (width, height) != (r.tile_px, r.tile_px):
            raise errors.ChipError(
                f"chip {tile_id} of dataset {ds.name} is {width}x{height} px, the recipe says "
                f"{r.tile_px}x{r.tile_px}")
        self.chip = ChipFormat((int(bands), r.tile_px, r.tile_px), wkb.PIXEL_TYPES[pixtype].dtype)
        return ids, int(bands)

    # -- the options, as attributes ----------------------------------------------------------------
    dsn = property(lambda self: self.wire.dsn, doc="The server this stream reads from.")
    source = property(lambda self: self.wire.source, doc="'chips' or 'live'.")
    transport = property(lambda self: self.wire.kind, doc="'copy' or 'cursor'.")
    connections = property(lambda self: self.wire.connections)
    chunk_size = property(lambda self: self.wire.chunk_size)
    fetch_bytes = property(lambda self: self.wire.fetch_bytes)
    timeout_s = property(lambda self: self.wire.timeout_s)
    max_reconnects = property(lambda self: self.wire.max_reconnects)
    reconnect_window_s = property(lambda self: self.wire.reconnect_window_s)
    application_name = property(lambda self: self.wire.application_name)
    ids = property(lambda self: self.sampler.ids, doc="The split's tile ids, sorted.")
    weights = property(lambda self: self.sampler.weights, doc="Sampling weights, one per id, or None.")
    batch_size = property(lambda self: self.sampler.batch_size)
    shuffle = property(lambda self: self.sampler.shuffle)
    seed = property(lambda self: self.sampler.seed)
    shard = property(lambda self: self.sampler.shard)
    world = property(lambda self: self.sampler.world)
    last_batch = property(lambda self: self.sampler.last_batch)
    max_batches = property(lambda self: self.sampler.max_batches)
    image_shape = property(lambda self: self.chip.image_shape, doc="``(C, H, W)`` of every chip.")
    label_shape = property(lambda self: self.chip.label_shape, doc="``(H, W)``.")
    image_dtype = property(lambda self: self.chip.dtype, doc="The chips' pixel dtype.")
    out_dtype = property(lambda self: self.transforms.out_dtype, doc="The batches' image dtype.")
    mean = property(lambda self: self.transforms.mean, doc="Per-band mean (float32) or None.")
    std = property(lambda self: self.transforms.std, doc="Per-band std (float32) or None.")
    augment = property(lambda self: self.transforms.augment)

    # -- what a training loop asks ---------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Samples of this shard in one epoch (before padding or discarding)."""
        return self.sampler.num_samples

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

    def plan(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The tile ids ``(nbatches, batch_size)`` and pads this shard delivers in ``epoch``."""
        return self.sampler.plan(self.epoch if epoch is None else epoch)

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
        it = _epoch_iterator(self.wire, self.sampler, self.chip, self.transforms, self.dataset_name,
                             self._stats, seq.reshape(-1), pads, int(epoch), self.prefetch, on_done)
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


def _epoch_iterator(wire: Transport, sampler: Sampler, chip: ChipFormat, transforms: Transforms,
                    dataset: str, stats: dict[str, Any], seq: np.ndarray, pads: np.ndarray,
                    epoch: int, prefetch: int, on_done: Callable[[int], None] | None) -> BatchIterator:
    """One epoch's pipeline: Reader (rows in order) -> BatchAssembler (decode, transform) ->
    Prefetch (thread, bounded queue). Nothing here refers to the GeoStream, so an iterator
    does not keep its stream alive."""
    stop = threading.Event()
    reader = Reader(wire, dataset, seq, batch_size=sampler.batch_size,
                    rows_per_fetch=wire.rows_per_fetch(chip.row_bytes), stop=stop, stats=stats)

    def produce(put: Callable[[Any], None]) -> None:
        assembler = BatchAssembler(batch_size=sampler.batch_size, pads=pads, chip=chip,
                                   transforms=transforms, epoch=epoch, dataset=dataset,
                                   live=wire.source == "live", stats=stats, emit=put)
        reader.run(assembler.place)

    run = Prefetch(produce, size=prefetch, name=f"{wire.application_name}-prefetch", stop=stop,
                   cancel=reader.cancel, cleanup=reader.close)
    return BatchIterator(run, batches=len(pads), epoch=epoch, application_name=wire.application_name,
                         on_done=on_done)
