"""PyTorch adapter: :class:`GeoDataset` (an ``IterableDataset`` over GeoStream) and :func:`make_loader`.

Sharding follows the one rule of :func:`pggeolearn.stream.epoch_batches`: the distributed rank
and world size (from ``torch.distributed`` when it is initialized, or given) times the
DataLoader's worker id and worker count make the shard, so every chip is delivered exactly
once per epoch over all ranks and workers. The dataset holds no connection: it is pickled into
the workers and each worker opens its own when it starts iterating.

Batches come pre-batched (``DataLoader(batch_size=None)``, the fast way) as dicts of tensors:
``image`` ``(N, C, H, W)`` in the chips' dtype, ``label`` uint8 ``(N, H, W)``, ``valid`` bool
``(N, H, W)`` (False on NODATA pixels), ``tile_id``, ``transform``,
``srid`` and ``pad``. Normalize on the device with :meth:`GeoDataset.normalize`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pggeolearn import errors
from pggeolearn.stream import GeoStream

__all__ = ["GeoDataset", "GeoLoader", "make_loader"]


class GeoDataset(IterableDataset):
    """Batches (or single samples with ``per_sample=True``) of a dataset split as tensors.

    ``epoch`` is the epoch the next iteration runs; each ``iter()`` advances it, and
    :class:`GeoLoader` keeps it right across DataLoader worker restarts. Keyword arguments not
    named here go to :class:`~pggeolearn.stream.GeoStream` (``shuffle``, ``seed``,
    ``last_batch``, ``augment``, ``transport``, ``prefetch``, ...).
    """

    def __init__(self, dsn: str | None, dataset: str, *, split: str | None = "train",
                 batch_size: int = 32, per_sample: bool = False, rank: int | None = None,
                 world_size: int | None = None, epoch: int = 0,
                 normalize: bool | None | tuple[Sequence[float], Sequence[float]] = None,
                 **stream_kwargs: Any):
        super().__init__()
        if (rank is None) != (world_size is None):
            raise errors.ConfigError("give both rank and world_size, or neither")
        self.dsn, self.dataset, self.split = dsn, dataset, split
        self.batch_size, self.per_sample = int(batch_size), bool(per_sample)
        self.rank, self.world_size = rank, world_size
        self.epoch = int(epoch)
        self.normalize_arg = normalize
        self.stream_kwargs = stream_kwargs
        self._norm: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._norm_np: tuple[np.ndarray | None, np.ndarray | None] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shard(self) -> tuple[int, int, int, int]:
        """``(rank, world_size, worker_id, num_workers)`` of the calling process."""
        if self.rank is not None:
            rank, world = int(self.rank), int(self.world_size)
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world = 0, 1
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank, world, wid, nworkers

    def stream(self, epoch: int | None = None) -> GeoStream:
        """The GeoStream of the calling process's shard (opens a short connection)."""
        rank, world, wid, nworkers = self.shard()
        kwargs = dict(self.stream_kwargs)
        if self.per_sample:
            kwargs["last_batch"] = "pad"  # padded samples are skipped: every sample once
        return GeoStream(self.dsn, self.dataset, split=self.split, batch_size=self.batch_size,
                         epoch=self.epoch if epoch is None else epoch, num_parts=world,
                         part_index=rank, num_workers=nworkers, worker_id=wid,
                         normalize=self.normalize_arg, **kwargs)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch
        self.epoch += 1
        stream = self.stream(epoch)
        it = stream.iter_epoch(epoch)
        try:
            for batch in it:
                tensors = {
                    "image": torch.from_numpy(batch["image"]),
                    "label": torch.from_numpy(batch["label"]),
                    "valid": torch.from_numpy(batch["valid"]),
                    "tile_id": torch.from_numpy(batch["tile_id"]),
                    "transform": torch.from_numpy(batch["transform"]),
                    "srid": torch.from_numpy(batch["srid"]),
                }
                if not self.per_sample:
                    tensors["pad"] = int(batch["pad"])
                    yield tensors
                    continue
                for i in range(self.batch_size - int(batch["pad"])):
                    yield {k: v[i] for k, v in tensors.items()}
        finally:
            it.close()
            stream.close()

    # -- normalization on the device -------------------------------------------------------
    def _stats(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        if self._norm_np is None:
            s = GeoStream(self.dsn, self.dataset, split=self.split, normalize=self.normalize_arg,
                          **{k: v for k, v in self.stream_kwargs.items()
                             if k in ("source", "timeout_s")})
            self._norm_np = (s.mean, s.std)
        return self._norm_np

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float32 ``(x - mean) / std`` per band, computed where ``images`` are
        (e.g. on the GPU); a plain float cast when the dataset has no normalization."""
        key = str(images.device)
        if key not in self._norm:
            mean, std = self._stats()
            if mean is None:
                self._norm[key] = None
            else:
                shape = (1, -1, 1, 1) if images.dim() == 4 else (-1, 1, 1)
                self._norm[key] = (torch.as_tensor(mean, device=images.device).reshape(shape),
                                   torch.as_tensor(1.0 / std, device=images.device).reshape(shape))
        x = images.float()
        norm = self._norm[key]
        return x if norm is None else (x - norm[0]) * norm[1]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_norm"] = {}  # tensors on a device stay in their process
        return state


class GeoLoader(DataLoader):
    """A DataLoader that tells its :class:`GeoDataset` which epoch each ``iter()`` runs, so a
    new shuffle reaches the workers even though they get a fresh copy of the dataset."""

    def __init__(self, dataset: GeoDataset, **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self._next_epoch = dataset.epoch

    def __iter__(self):
        self.dataset.set_epoch(self._next_epoch)
        self._next_epoch += 1
        return super().__iter__()

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = int(epoch)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return self.dataset.normalize(images)


def make_loader(dsn: str | None, dataset: str, split: str | None = "train", batch_size: int = 32,
                num_workers: int = 0, pin_memory: bool = False, *, per_sample: bool = False,
                rank: int | None = None, world_size: int | None = None, epoch: int = 0,
                prefetch_factor: int | None = None, persistent_workers: bool = False,
                **stream_kwargs: Any) -> GeoLoader:
    """A DataLoader over ``dataset``/``split``: pre-batched (``batch_size`` chips per item,
    collated in the stream) unless ``per_sample``, sharded over ranks and workers."""
    ds = GeoDataset(dsn, dataset, split=split, batch_size=batch_size, per_sample=per_sample,
                    rank=rank, world_size=world_size, epoch=epoch, **stream_kwargs)
    kwargs: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers:
        kwargs["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    kwargs["batch_size"] = batch_size if per_sample else None
    return GeoLoader(ds, **kwargs)
