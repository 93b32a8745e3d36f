"""Which chips a stream delivers, and in which order: the sampler.

The one rule (pure functions, no database): the epoch's order is a permutation of the split's
sorted tile ids seeded by (seed, epoch) (:func:`epoch_order`), or with sampling weights
``len(ids)`` weighted draws with replacement; it is dealt to ``world`` shards by
``position % world == shard`` (:func:`shard_index`) and cut into batches (:func:`epoch_batches`).
:class:`Sampler` holds one reader's share of that rule; :func:`chip_ids` lists a split's chips
and :func:`sampling_weights` runs a sampling query, both once per stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg

from pggeolearn import errors
from pggeolearn.db import usersql
from pggeolearn.db.connect import connect
from pggeolearn.db.errors import db_errors, first_line
from pggeolearn.db.usersql import DEFAULT_TIMEOUT_S
from pggeolearn.db.usersql import sandbox as read_only

__all__ = [
    "LAST_BATCH",
    "SPLITS",
    "TRAINING_SPLITS",
    "Sampler",
    "chip_ids",
    "epoch_batches",
    "epoch_order",
    "sampling_weights",
    "shard_index",
    "split_names",
]

SPLITS = ("train", "val", "test", "excluded")
TRAINING_SPLITS = ("train", "val", "test")  # what split="all" means
LAST_BATCH = ("pad", "discard", "rollover")


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


@dataclass(frozen=True, eq=False)
class Sampler:
    """One reader's share of a split: the sorted tile ``ids``, cut into batches of
    ``batch_size`` per epoch by :func:`epoch_batches` for shard ``shard`` of ``world``;
    ``weights`` (one per id) make epochs weighted draws; ``max_batches`` stops each epoch early."""

    ids: np.ndarray
    batch_size: int = 32
    shuffle: bool = True
    seed: int = 0
    shard: int = 0
    world: int = 1
    last_batch: str = "pad"
    weights: np.ndarray | None = None
    max_batches: int | None = None

    @property
    def num_samples(self) -> int:
        """Samples of this shard in one epoch (before padding or discarding)."""
        return len(self.ids[self.shard::self.world])

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The tile ids ``(nbatches, batch_size)`` and pads this shard delivers in ``epoch``."""
        ids, pads = epoch_batches(
            self.ids, epoch=epoch, batch_size=self.batch_size, seed=self.seed,
            shuffle=self.shuffle, shard=self.shard, world=self.world,
            last_batch=self.last_batch, weights=self.weights)
        if self.max_batches is not None:
            ids, pads = ids[: self.max_batches], pads[: self.max_batches]
        return ids, pads


# ----------------------------------------------------------------------------------------------
# what the database says (once per stream)


def split_names(split: str) -> list[str]:
    """The chip store's splits that ``split`` reads (``'all'``: the three training splits)."""
    return list(TRAINING_SPLITS) if split == "all" else [split]


def chip_ids(conn: psycopg.Connection, ds: Any, split: str) -> np.ndarray:
    """The sorted tile ids of dataset ``ds``'s chips in ``split`` (NotBuilt when there are
    none, or when some were built from an older recipe)."""
    with db_errors("listing chips"):
        rows = conn.execute(
            "SELECT tile_id, recipe_hash = %s FROM pggeolearn.chips WHERE dataset = %s"
            " AND split = ANY(%s::text[]) ORDER BY tile_id",
            [ds.recipe_hash, ds.name, split_names(split)]).fetchall()
    ids = np.fromiter((t for t, _ in rows), np.int64, len(rows))
    if not len(ids):
        _not_built(conn, ds.name)
    stale = sum(1 for _, current in rows if not current)
    if stale:
        raise errors.NotBuilt(
            f"dataset {ds.name}: {stale} chip(s) of split {split} were built from "
            f"an older recipe (run: pggeolearn chips build {ds.name})")
    return ids


def _not_built(conn: psycopg.Connection, name: str) -> None:
    counts = dict(conn.execute(
        "SELECT coalesce(split, 'none'), count(*) FROM pggeolearn.chips WHERE dataset = %s"
        " GROUP BY 1 ORDER BY 1", [name]).fetchall())
    if not counts:
        raise errors.NotBuilt(f"dataset {name} has no chips yet (run: pggeolearn chips build {name})")
    have = ", ".join(f"{k} {v}" for k, v in counts.items())
    raise errors.NotBuilt(f"dataset {name} has no chips in this split (it has: {have})")


def sampling_weights(query: str, ids: np.ndarray, *, dsn: str | None, application_name: str,
                     timeout_s: float | None, split: str | None, dataset: str) -> np.ndarray:
    """One weight per chip of ``ids`` from a user query returning ``(tile_id, weight)`` rows
    over the chip store (run READ ONLY); chips it leaves out get weight 0."""
    if not (query or "").strip().rstrip(";").strip():
        raise errors.ConfigError("the sampling query is empty")
    q = usersql.embed("SELECT s.tile_id::bigint, s.weight::float8 FROM ({q}) AS s", q=query)
    with connect(dsn, autocommit=True, application_name=application_name) as conn:
        try:
            with read_only(conn, timeout_s or DEFAULT_TIMEOUT_S):
                rows = usersql.rows(conn, q, None, [("tile_id", "bigint"), ("weight", "float8")])
        except psycopg.Error as exc:
            raise errors.ConfigError(f"sampling query fails: {first_line(exc)} (it must "
                                     "return columns tile_id and weight)") from exc
    weights = np.zeros(len(ids), np.float64)
    pos = {int(t): i for i, t in enumerate(ids)}
    for tile_id, weight in rows:
        if weight is None or not np.isfinite(weight) or weight < 0:
            raise errors.ConfigError(f"sampling query gave tile {tile_id} the weight {weight}: "
                                     "weights must be finite and >= 0")
        if tile_id in pos:
            weights[pos[tile_id]] += weight
    if weights.sum() <= 0:
        raise errors.ConfigError(f"sampling query selects no chip of split {split} of "
                                 f"dataset {dataset} with a weight above 0")
    return weights
