"""MXNet adapter: :class:`GeoIter`, an ``mx.io.DataIter`` over a :class:`~pggeolearn.stream.GeoStream`.

The only module of pggeolearn that imports mxnet. MXNet 1.9.1 still uses the numpy aliases
``np.bool``, ``np.int``, ``np.float``, ``np.complex``, ``np.object`` and ``np.str`` that numpy
1.24 removed, so they are put back (as the builtins they always were) before ``import mxnet``,
and the FutureWarnings that import raises are silenced. MXNet runs its operators on half the
CPUs it sees (it assumes two hyperthreads per core: on a 2-core machine, one thread, and 1.5x
longer epochs), so unless ``OMP_NUM_THREADS`` or ``MXNET_OMP_MAX_THREADS`` says otherwise it is
given all the CPUs this process may use, as torch uses them.

Batches leave the stream as uint8 and are normalized on the device (``ctx``): a quarter of the
bytes to copy, and the float work where it is cheap.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

_NUMPY_ALIASES = {"bool": bool, "int": int, "float": float, "complex": complex,
                  "object": object, "str": str}


def _restore_numpy_aliases() -> None:
    for name, value in _NUMPY_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, value)


def _use_all_cpus() -> None:
    if "OMP_NUM_THREADS" not in os.environ and "MXNET_OMP_MAX_THREADS" not in os.environ:
        os.environ["MXNET_OMP_MAX_THREADS"] = str(len(os.sched_getaffinity(0)))


with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    _restore_numpy_aliases()
    _use_all_cpus()
    import mxnet as mx

from pggeolearn import errors  # noqa: E402
from pggeolearn.stream import BatchIterator, GeoStream  # noqa: E402

__all__ = ["GeoIter", "mx"]


class GeoIter(mx.io.DataIter):
    """Batches of a dataset split as ``mx.io.DataBatch`` (``data``: float32 ``(N, C, H, W)``
    normalized on ``ctx``; ``label``: ``(N, H, W)`` class ids as ``label_dtype``; ``pad``;
    ``index``: the tile ids; ``valid``: ``(N, H, W)`` float32 on ``ctx``, 0 on NODATA pixels,
    to leave them out of losses and metrics; an attribute, not a second label, so
    ``Module.fit`` binds the one label it knows).

    Works with ``mx.mod.Module.fit`` and Gluon loops. ``reset()`` moves to the next epoch (new
    shuffle and augmentation) once the current one has started; ``num_parts``/``part_index``
    shard the data between machines exactly once per epoch (see :func:`pggeolearn.stream.epoch_batches`).
    Keyword arguments not named here go to :class:`~pggeolearn.stream.GeoStream`.
    """

    def __init__(
        self,
        dsn: str | None = None,
        dataset: str | None = None,
        *,
        split: str | None = "train",
        batch_size: int = 32,
        ctx: Any = None,
        data_name: str = "data",
        label_name: str = "softmax_label",
        label_dtype: str = "float32",
        num_parts: int = 1,
        part_index: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        last_batch: str = "pad",
        normalize: bool | None | tuple[Sequence[float], Sequence[float]] = None,
        augment: bool = False,
        max_iter: int | None = None,
        stream: GeoStream | None = None,
        **stream_kwargs: Any,
    ):
        ctx = ctx if ctx is not None else mx.cpu()
        if stream is None:
            if dataset is None:
                raise errors.ConfigError("GeoIter needs a dataset name (or a GeoStream)")
            if ctx.device_type == "cpu":  # the CPU normalizes anyway: do it in the prefetch thread
                stream_kwargs.setdefault("dtype", "float32")
            stream = GeoStream(dsn, dataset, split=split, batch_size=batch_size, shuffle=shuffle,
                               seed=seed, epoch=epoch, num_parts=num_parts, part_index=part_index,
                               last_batch=last_batch, normalize=normalize, augment=augment,
                               max_batches=max_iter, **stream_kwargs)
        super().__init__(stream.batch_size)
        self.stream = stream
        self.ctx = ctx
        self.data_name, self.label_name, self.label_dtype = data_name, label_name, label_dtype
        self.epoch = stream.epoch
        c, h, w = stream.image_shape
        b = stream.batch_size
        self._provide_data = [mx.io.DataDesc(data_name, (b, c, h, w), np.float32, layout="NCHW")]
        self._provide_label = [mx.io.DataDesc(label_name, (b, h, w), np.dtype(label_dtype),
                                              layout="NHW")]
        self._it: BatchIterator | None = None
        self._started = False

    # -- construction from a recipe given inline ----------------------------------------------
    @classmethod
    def from_sql(
        cls,
        dsn: str | None,
        *,
        extent: tuple[float, float, float, float],
        srid: int,
        resolution: float,
        image_sql: str,
        label_sql: str,
        classes: dict[int, str] | str,
        tile_px: int = 256,
        overlap_px: int = 0,
        all_touched: bool = False,
        name: str | None = None,
        batch_size: int = 8,
        max_iter: int | None = None,
        materialize: bool = False,
        connections: int = 2,
        **kwargs: Any,
    ) -> GeoIter:
        """A GeoIter over an ad-hoc recipe, in the spirit of the original design.

        The recipe is stored through :func:`pggeolearn.datasets.create` unless a dataset with
        the same recipe hash exists (then that one is reused). Tiles are computed live over
        ``connections`` READ ONLY connections; with ``materialize=True`` the chips are built
        first (:func:`pggeolearn.chips.build`) and the ``split`` (default ``'train'``) is read
        from the chip store.
        """
        from pggeolearn import datasets
        from pggeolearn.db import connect

        recipe = datasets.Recipe(
            name=name or "adhoc", srid=int(srid), resolution=float(resolution), image_sql=image_sql,
            label_sql=label_sql, classes=datasets.parse_classes(classes), tile_px=int(tile_px),
            overlap_px=overlap_px, extent=tuple(float(v) for v in extent),
            all_touched=all_touched)
        recipe.validate()
        digest = recipe.digest()
        with connect(dsn, autocommit=True) as conn:
            found = conn.execute(
                "SELECT name FROM pggeolearn.datasets WHERE recipe_hash = %s"
                " AND (%s::text IS NULL OR name = %s) ORDER BY name LIMIT 1",
                [digest, name, name]).fetchone()
            if found:
                dataset = found[0]
            else:
                recipe.name = name or f"adhoc-{digest}"
                dataset = datasets.create(conn, recipe).name
        if materialize:
            from pggeolearn import chips

            chips.build(dsn, dataset, progress=False)
            kwargs.setdefault("split", "train")
            return cls(dsn, dataset, batch_size=batch_size, max_iter=max_iter, **kwargs)
        kwargs.setdefault("split", None)
        return cls(dsn, dataset, batch_size=batch_size, max_iter=max_iter, source="live",
                   connections=connections, **kwargs)

    # -- DataIter ------------------------------------------------------------------------------
    @property
    def provide_data(self) -> list:
        return self._provide_data

    @property
    def provide_label(self) -> list:
        return self._provide_label

    def reset(self) -> None:
        """Start the next epoch (or restart the current one if nothing was read yet)."""
        if self._it is not None:
            self._it.close()
            self._it = None
        if self._started:
            self.epoch += 1
            self._started = False

    def next(self) -> mx.io.DataBatch:
        if self._it is None:
            self._it = self.stream.iter_epoch(self.epoch)
        batch = next(self._it)  # StopIteration ends the epoch, as DataIter expects
        self._started = True
        label = np.ascontiguousarray(batch["label"], dtype=self.label_dtype)
        out = mx.io.DataBatch(
            data=[self.to_data(batch["image"])],
            label=[mx.nd.from_numpy(label, zero_copy=True).as_in_context(self.ctx)],
            pad=int(batch["pad"]),
            index=batch["tile_id"],
            provide_data=self._provide_data,
            provide_label=self._provide_label,
        )
        out.valid = mx.nd.array(batch["valid"].astype(np.float32), ctx=self.ctx, dtype="float32")
        return out

    def to_data(self, images: np.ndarray) -> mx.nd.NDArray:
        """A batch of the stream -> float32 NDArray on ``ctx``, normalized.

        Float batches (CPU: the prefetch thread normalized them) are wrapped without a copy.
        Integer batches are copied to ``ctx`` as they are (a quarter of the bytes of float32)
        and cast and normalized there, in one fused operator.
        """
        s = self.stream
        if images.dtype.kind == "f":  # already normalized by the stream
            f32 = np.ascontiguousarray(images, dtype=np.float32)
            return mx.nd.from_numpy(f32, zero_copy=True).as_in_context(self.ctx)
        x = mx.nd.from_numpy(np.ascontiguousarray(images), zero_copy=True)
        x = x.as_in_context(self.ctx).astype("float32")
        if s.mean is None:
            return x
        return mx.nd.image.normalize(x, mean=tuple(s.mean.tolist()), std=tuple(s.std.tolist()))

    def close(self) -> None:
        """Stop prefetching and close the connections."""
        if self._it is not None:
            self._it.close()
            self._it = None
        self.stream.close()

    def __enter__(self) -> GeoIter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
