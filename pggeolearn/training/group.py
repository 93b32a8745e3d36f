"""The processes one training runs in: :class:`Group` (one process) and the data-parallel
groups of ``train --nproc`` (:class:`TorchGroup`: ``torch.distributed``, gloo on CPU and NCCL
for CUDA tensors; :class:`MxGroup`: an MXNet ``dist_sync`` kvstore).

A group knows its ``rank`` and ``world`` and sums small float64 arrays over all ranks
(:meth:`Group.allreduce`): what the loop uses to agree on the learning rate, the step's loss
denominator, a stop request and the validation confusion matrix. The gradients themselves are
averaged by the framework (DDP, or the kvstore behind the Gluon trainer).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np


class Group:
    """One process: rank 0 of 1; :meth:`allreduce` returns its input."""

    rank, world = 0, 1

    @property
    def lead(self) -> bool:
        """Rank 0 writes the run, the checkpoints, the model and the outputs."""
        return self.rank == 0

    def allreduce(self, values: np.ndarray, *, counts: bool = False) -> np.ndarray:
        """The element-wise sum of ``values`` over all ranks (float64); ``counts``: the values
        are integers in 0..2**48 and their sum must be exact (every rank passes the same)."""
        return np.asarray(values, np.float64)

    def shard(self) -> tuple[int, int]:
        """``(part_index, num_parts)`` of this rank's share of every split."""
        return self.rank, self.world

    def close(self) -> None:
        """Leave the group."""


class TorchGroup(Group):
    """A ``torch.distributed`` process group over TCP on ``addr:port`` (``None``: from the
    environment torchrun sets, ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``):
    gloo (CPU tensors, and the small sums here), plus NCCL for CUDA tensors when ``cuda``.
    Collectives give up after ``timeout_s`` (a rank that died or hangs fails the others
    instead of hanging them)."""

    def __init__(self, rank: int, world: int, addr: str | None, port: int | None, *, cuda: bool,
                 timeout_s: float):
        import torch.distributed as dist

        self.dist, self.rank, self.world = dist, rank, world
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo",
                                init_method="env://" if addr is None else f"tcp://{addr}:{port}",
                                rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))

    def allreduce(self, values: np.ndarray, *, counts: bool = False) -> np.ndarray:
        import torch

        t = torch.as_tensor(np.asarray(values, np.float64)).clone()
        self.dist.all_reduce(t)  # SUM, on the CPU (gloo)
        return t.numpy()

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


class MxGroup(Group):
    """A worker of an MXNet ``dist_sync`` kvstore (scheduler and server started by the
    launcher through the ``DMLC_*`` environment): the rank is the kvstore's. Gradients go
    through keys ``0..n-1`` (:meth:`share_weights`, :meth:`sum_grads`), the small sums through
    keys of their own far above them.

    The Gluon trainer is not given the kvstore: in mxnet 1.9.1 its lazy first-step broadcast
    (init + pull of the weights) and its first gradient push on the same key are not ordered
    on the worker (the push rebinds the key's buffer to the gradient), so a rank's weight pull
    could be answered after both ranks' gradients had replaced the weights on the server, and
    that rank stepped from different weights (measured: 2 of 10 runs of the 2-rank test under
    load). :meth:`share_weights` waits for its pulls before any gradient is pushed."""

    KEY0 = 1 << 20

    def __init__(self) -> None:
        from pggeolearn.mxnet import mx

        self.mx = mx
        self.kv = mx.kv.create("dist_sync")
        self.rank, self.world = self.kv.rank, self.kv.num_workers
        self._keys: dict[tuple[int, ...], int] = {}

    def allreduce(self, values: np.ndarray, *, counts: bool = False) -> np.ndarray:
        """The kvstore's server sums in float32 (measured: 2**40 + 1 pushed twice pulls as
        2**41), so ``counts`` go as four base-4096 digits, each summed exactly."""
        a = np.asarray(values, np.float64)
        if counts:
            n = a.astype(np.int64)
            digits = np.stack([(n >> (12 * i)) & 0xFFF for i in range(4)]).astype(np.float64)
            s = self._sum(digits).astype(np.int64)
            return sum(s[i] << (12 * i) for i in range(4)).astype(np.float64)
        return self._sum(a)

    def share_weights(self, params: list[Any]) -> None:
        """Every rank takes rank 0's values of ``params`` (Gluon Parameters; the kvstore keeps
        the value only the first worker gives to ``init``), then waits for them."""
        keys = list(range(len(params)))
        self.kv.init(keys, [p.list_data()[0] for p in params])
        for key, p in zip(keys, params, strict=True):
            self.kv.pull(key, out=p.list_data())
        self.mx.nd.waitall()  # no gradient push on these keys before every pull is answered

    def sum_grads(self, params: list[Any]) -> None:
        """Each gradient of ``params`` (the same list as :meth:`share_weights`'s) replaced by
        its sum over every context and rank."""
        for key, p in enumerate(params):
            grads = p.list_grad()
            self.kv.pushpull(key, grads, out=grads, priority=-key)

    def _sum(self, a: np.ndarray) -> np.ndarray:
        key = self._keys.get(a.shape)
        if key is None:  # every rank reaches the same shapes in the same order
            key = self._keys[a.shape] = self.KEY0 + len(self._keys)
            self.kv.init(key, self.mx.nd.zeros(a.shape))
        out = self.mx.nd.array(a)
        self.kv.push(key, out)
        self.kv.pull(key, out=out)  # no optimizer on the server: the pull is the sum
        return out.asnumpy()

    def close(self) -> None:
        self.kv = None  # the kvstore says goodbye to the scheduler when it is freed


def average_buffers(group: Group, arrays: list[Any], to_numpy, from_numpy) -> None:
    """Average float arrays (BatchNorm running statistics, which no gradient carries) over the
    ranks in one sum, so every rank ends an epoch with the same model."""
    if group.world == 1 or not arrays:
        return
    flat = [np.asarray(to_numpy(a), np.float64) for a in arrays]
    total = group.allreduce(np.concatenate([f.ravel() for f in flat])) / group.world
    at = 0
    for a, f in zip(arrays, flat, strict=True):
        from_numpy(a, total[at: at + f.size].reshape(f.shape))
        at += f.size
