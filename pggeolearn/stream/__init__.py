"""GeoStream: chips from PostGIS into numpy training batches at the speed of the wire.

A :class:`GeoStream` iterates one split of a dataset's chip store (``pggeolearn.chips``), or
computes tiles on the fly from the recipe (:meth:`GeoStream.live`), and yields batches: dicts
with the fixed keys ``image`` ``(N, C, H, W)`` (the chips' own dtype: uint8, uint16, int16,
float32, ..., or float32 when normalized), ``label`` ``(N, H, W)`` (uint8 class ids), ``valid``
``(N, H, W)`` (bool, False on NODATA pixels: :func:`pggeolearn.wkb.valid_mask`), ``tile_id``
``(N,)``, ``transform`` ``(N, 6)`` (GDAL geotransforms), ``srid`` ``(N,)`` and
``pad`` (how many trailing samples repeat earlier ones to fill the last batch).

A stream is composed of one part per concern, one module each:

* :mod:`~pggeolearn.stream.sampler`: **which chips, in which order.** The epoch's order is a
  seeded permutation of the split's tile ids (fetched once, ``ORDER BY tile_id``), identical in
  every process. **One sharding rule** (:func:`epoch_batches`): the epoch's ordered list is
  dealt to ``world = num_parts * num_workers`` shards by ``position % world == shard`` with
  ``shard = part_index * num_workers + worker_id``, so every chip is delivered exactly once
  per epoch across all shards. MXNet's ``num_parts/part_index`` and PyTorch's rank/world size
  times DataLoader workers both map onto it. **Sampling queries** (``sampling=``): SQL
  returning ``(tile_id, weight)`` over the chip store (a filter such as
  ``WHERE nodata_frac < .05``, class balance from ``class_counts``, hard examples from a scores
  table) turn each epoch into ``len(split)`` weighted draws with replacement, seeded by
  (seed, epoch); shards still take disjoint positions of it.
* :mod:`~pggeolearn.stream.transport`: **how the bytes arrive.** Binary transport only:
  ``COPY (SELECT tile_id, ST_AsBinary(image), ST_AsBinary(label) ...) TO STDOUT (FORMAT BINARY)``
  (default) whose rows psycopg parses (``Copy.set_types`` + ``Copy.rows``), or a binary
  server-side cursor fetched by bytes; chips are fetched in the epoch's order by joining
  ``unnest(ids) WITH ORDINALITY`` (scan order is never relied upon); read replicas; parallel
  connections (from a ``psycopg_pool`` pool). **Faults:** a lost
  connection (``pg_terminate_backend``, server restart) is resumed from the next undelivered
  chip of the epoch order: no duplicate, no drop. ``statement_timeout`` (QueryCanceled) is
  never retried: :class:`~pggeolearn.errors.QueryTimeout`.
* :mod:`~pggeolearn.stream.batch`: raster WKB is decoded with :mod:`pggeolearn.wkb`
  (zero-copy views) straight into a batch array allocated once per batch. A NULL or
  wrong-size chip is a :class:`~pggeolearn.errors.ChipError` naming the tile.
* :mod:`~pggeolearn.stream.transforms`: flips/rotations seeded by (seed, epoch, tile_id),
  normalization with the dataset's band statistics, the output dtype.
* :mod:`~pggeolearn.stream.prefetch`: one background thread with a bounded queue (memory does
  not grow with the dataset); its exceptions are re-raised in the consumer. ``close()``,
  ``with``, garbage collection and KeyboardInterrupt stop it and close its connections.
* :mod:`~pggeolearn.stream.core`: :class:`GeoStream`, which puts them together.

Only numpy and psycopg are imported here; the framework adapters live in
:mod:`pggeolearn.mxnet` and :mod:`pggeolearn.torch`, the batch picture (``show-batch``) in
:mod:`pggeolearn.pictures`.
"""

from __future__ import annotations

from pggeolearn.stream.batch import BATCH_KEYS, Batch, BatchAssembler, ChipFormat
from pggeolearn.stream.core import GeoStream, TileInfo
from pggeolearn.stream.prefetch import BatchIterator, Prefetch
from pggeolearn.stream.sampler import (
    LAST_BATCH,
    SPLITS,
    TRAINING_SPLITS,
    Sampler,
    epoch_batches,
    epoch_order,
    shard_index,
)
from pggeolearn.stream.transforms import Transforms, aug_code, dihedral, normalize
from pggeolearn.stream.transport import SOURCES, TRANSPORTS, Reader, Transport, read_dsn

__all__ = [
    "BATCH_KEYS",
    "LAST_BATCH",
    "SOURCES",
    "SPLITS",
    "TRAINING_SPLITS",
    "TRANSPORTS",
    "Batch",
    "BatchAssembler",
    "BatchIterator",
    "ChipFormat",
    "GeoStream",
    "Prefetch",
    "Reader",
    "Sampler",
    "TileInfo",
    "Transforms",
    "Transport",
    "aug_code",
    "dihedral",
    "epoch_batches",
    "epoch_order",
    "normalize",
    "read_dsn",
    "shard_index",
]
