"""The U-Net in MXNet Gluon (a hybridized ``HybridBlock``) and the MXNet side of training.

mxnet is imported only through :mod:`pggeolearn.mxnet` (it carries the numpy compatibility
shim). The architecture matches :mod:`pggeolearn.training.models_torch` layer for layer:

* an optional stride-2 **stem** (``stem_stride=2``) computes the encoder at half resolution,
  which makes a CPU epoch ~3x cheaper; a full-resolution **refinement** step (the upsampled
  features concatenated with the input) keeps the label grid and sharp edges;
* ``depth`` encoder levels of two 3x3 conv + BatchNorm + ReLU, channels ``width * 2**level``,
  2x2 max pooling between levels; the decoder mirrors them with 2x2 transposed convolutions and
  skip connections; a 1x1 convolution gives ``num_classes`` logits per pixel.

Input height and width must be multiples of ``2 ** (depth + stem_stride - 1)``
(:meth:`Architecture.multiple`); :class:`MxModel` pads other sizes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from pggeolearn import errors
from pggeolearn.mxnet import GeoIter, mx
from pggeolearn.training import common as C
from pggeolearn.training import metrics as M
from pggeolearn.training.common import Architecture
from pggeolearn.training.group import Group, average_buffers

gluon = mx.gluon
nn = mx.gluon.nn
autograd = mx.autograd

FRAMEWORK = "mxnet"


# ----------------------------------------------------------------------------------------------
# the network


class ConvBlock(gluon.HybridBlock):
    """Two (3x3 conv, BatchNorm, ReLU)."""

    def __init__(self, cin: int, cout: int, **kwargs: Any):
        super().__init__(**kwargs)
        with self.name_scope():
            self.body = nn.HybridSequential()
            for c in (cin, cout):
                self.body.add(nn.Conv2D(cout, 3, padding=1, use_bias=False, in_channels=c),
                              nn.BatchNorm(in_channels=cout), nn.Activation("relu"))

    def hybrid_forward(self, F, x):  # noqa: N803 - Gluon's signature
        return self.body(x)


class ResBlock(gluon.HybridBlock):
    """Two (3x3 conv, BatchNorm) with a shortcut (identity, or 1x1 conv + BatchNorm when the
    channels change), ReLU after the sum."""

    def __init__(self, cin: int, cout: int, **kwargs: Any):
        super().__init__(**kwargs)
        with self.name_scope():
            self.body = nn.HybridSequential()
            self.body.add(nn.Conv2D(cout, 3, padding=1, use_bias=False, in_channels=cin),
                          nn.BatchNorm(in_channels=cout), nn.Activation("relu"),
                          nn.Conv2D(cout, 3, padding=1, use_bias=False, in_channels=cout),
                          nn.BatchNorm(in_channels=cout))
            self.short = None
            if cin != cout:
                self.short = nn.HybridSequential()
                self.short.add(nn.Conv2D(cout, 1, use_bias=False, in_channels=cin),
                               nn.BatchNorm(in_channels=cout))

    def hybrid_forward(self, F, x):  # noqa: N803
        s = x if self.short is None else self.short(x)
        return F.relu(self.body(x) + s)


class UNet(gluon.HybridBlock):
    """U-Net for semantic segmentation: ``(N, C, H, W)`` float32 -> ``(N, K, H, W)`` logits.
    Every layer states its input channels, so the parameters exist right after
    ``initialize()`` (no deferred initialization)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, depth: int = 3,
                 stem_stride: int = 2, block: str = "plain", head: str = "refine", **kwargs: Any):
        super().__init__(**kwargs)
        cfg = Architecture(in_channels=in_channels, num_classes=num_classes, width=width,
                           depth=depth, stem_stride=stem_stride, block=block, head=head)
        cfg.validate()
        self.cfg = cfg
        w = cfg.channels
        cin = in_channels
        Block = ResBlock if block == "residual" else ConvBlock  # noqa: N806
        with self.name_scope():
            if stem_stride > 1:
                self.stem = nn.HybridSequential()
                for _ in range(stem_stride.bit_length() - 1):  # one stride-2 conv per halving
                    self.stem.add(nn.Conv2D(w[0], 3, strides=2, padding=1, use_bias=False, in_channels=cin),
                                  nn.BatchNorm(in_channels=w[0]), nn.Activation("relu"))
                    cin = w[0]
            self.enc = nn.HybridSequential()
            for c in w:
                self.enc.add(Block(cin, c))
                cin = c
            self.up = nn.HybridSequential()
            self.dec = nn.HybridSequential()
            for c in reversed(w[:-1]):
                self.up.add(nn.Conv2DTranspose(c, 2, strides=2, in_channels=cin))
                self.dec.add(Block(2 * c, c))
                cin = c
            if stem_stride > 1 and head == "refine":
                self.head_up = nn.Conv2DTranspose(w[0], stem_stride, strides=stem_stride, in_channels=cin)
                self.refine = nn.HybridSequential()
                self.refine.add(nn.Conv2D(w[0], 3, padding=1, use_bias=False, in_channels=w[0] + in_channels),
                                nn.BatchNorm(in_channels=w[0]), nn.Activation("relu"))
            self.classify = nn.Conv2D(num_classes, 1, in_channels=w[0])

    def hybrid_forward(self, F, x):  # noqa: N803
        inputs = x
        if self.cfg.stem_stride > 1:
            x = self.stem(x)
        skips = []
        for i, block in enumerate(self.enc):
            if i:
                x = F.Pooling(x, kernel=(2, 2), stride=(2, 2), pool_type="max")
            x = block(x)
            skips.append(x)
        for up, block, skip in zip(self.up, self.dec, reversed(skips[:-1]), strict=True):
            x = block(F.concat(up(x), skip, dim=1))
        if self.cfg.stem_stride > 1 and self.cfg.head == "refine":
            x = self.refine(F.concat(self.head_up(x), inputs, dim=1))
        x = self.classify(x)
        if self.cfg.stem_stride > 1 and self.cfg.head == "bilinear":  # logits back to full size
            x = F.contrib.BilinearResize2D(x, inputs, mode="like", align_corners=False)
        return x


def build(cfg: Architecture, ctx: Sequence[Any] | None = None, hybridize: bool = True) -> UNet:
    """A new U-Net, Xavier-initialized on ``ctx`` (seed first: ``mx.random.seed``)."""
    net = UNet(cfg.in_channels, cfg.num_classes, cfg.width, cfg.depth, cfg.stem_stride, cfg.block, cfg.head)
    net.initialize(mx.init.Xavier(magnitude=2.0), ctx=list(ctx or [mx.cpu()]))
    if hybridize:
        net.hybridize(static_alloc=True, static_shape=True)
    return net


def weights_to_bytes(net: gluon.Block) -> bytes:
    """The parameters (BatchNorm running statistics included) as the bytes of
    ``net.save_parameters`` (structural names, so any new U-Net of the same shape loads them)."""
    with tempfile.TemporaryDirectory(prefix="pggeolearn-") as tmp:
        path = os.path.join(tmp, "weights.params")
        net.save_parameters(path)
        with open(path, "rb") as f:
            return f.read()


def weights_from_bytes(net: gluon.Block, blob: bytes, ctx: Sequence[Any]) -> None:
    """Load bytes from :func:`weights_to_bytes` into ``net`` on ``ctx``."""
    with tempfile.TemporaryDirectory(prefix="pggeolearn-") as tmp:
        path = os.path.join(tmp, "weights.params")
        with open(path, "wb") as f:
            f.write(blob)
        try:
            net.load_parameters(path, ctx=list(ctx))
        except (mx.base.MXNetError, AssertionError, AttributeError) as exc:
            raise errors.ConfigError(f"stored MXNet weights do not fit this U-Net: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------
# devices and errors


def num_gpus() -> int:
    try:
        return mx.context.num_gpus()
    except mx.base.MXNetError:
        return 0


def contexts(device: str) -> list[Any]:
    """MXNet contexts for a device string (see :func:`pggeolearn.training.common.parse_device`)."""
    kind, ids = C.parse_device(device)
    n = num_gpus()
    if kind == "cpu" or (kind == "auto" and n == 0):
        return [mx.cpu()]
    if kind == "auto" or ids is None:
        if n == 0:
            raise errors.ConfigError("a GPU was asked for, but MXNet sees none "
                                     "(is this the CUDA build of mxnet? use --device cpu)")
        return [mx.gpu(i) for i in range(n)]
    missing = [i for i in ids if i >= n]
    if missing:
        raise errors.ConfigError(f"GPU {missing[0]} was asked for, but MXNet sees "
                                 f"{n} GPU(s){' (use --device cpu)' if n == 0 else ''}")
    return [mx.gpu(i) for i in ids]


def map_error(exc: BaseException, batch_size: int) -> errors.PggeolearnError | None:
    """An MXNet out-of-memory error -> one clear line; anything else -> None."""
    if isinstance(exc, mx.base.MXNetError | MemoryError) and C.is_oom(exc):
        return C.oom_error(batch_size)
    return None


# ----------------------------------------------------------------------------------------------
# the MXNet side of the training loop


class MxModel:
    """A U-Net with its contexts, Adam trainer and (weighted) loss, behind the framework-neutral
    interface that :func:`pggeolearn.training.loop.train_rank` drives."""

    framework = FRAMEWORK

    def __init__(self, cfg: Architecture, device: str = "cpu", *, seed: int = 0,
                 normalization: dict[str, list[float]] | None = None, train: bool = True,
                 lr: float = 1e-3, weight_decay: float = 0.0, loss: str = "ce",
                 ctx: Sequence[Any] | None = None):
        self.cfg = cfg
        self.loss = loss
        self.ctx = list(ctx) if ctx else contexts(device)  # ctx: explicit contexts (tests)
        self.device = ",".join(str(c) for c in self.ctx)
        mx.random.seed(seed)  # the same stream on every context
        np.random.seed(seed)
        self.net = build(cfg, self.ctx)
        self.normalization = normalization
        self.label_lut: np.ndarray | None = None  # class id -> channel, when ids are not 0..K-1
        self._norm: dict[str, tuple[Any, Any]] = {}
        self.trainer = None
        self.group: Group = Group()
        self.last_tile_ids: np.ndarray | None = None  # of the batch batches() yielded last
        self._adam = {"learning_rate": lr, "wd": weight_decay}
        if train:
            # updates on the devices (not in a kvstore): the optimizer state can be saved
            self.trainer = gluon.Trainer(self.net.collect_params(), "adam", dict(self._adam),
                                         update_on_kvstore=False)

    def distribute(self, group: Group) -> None:
        """Train data-parallel in ``group`` (an :class:`MxGroup`): every rank starts from rank
        0's weights, each step's gradients are summed over all ranks through the ``dist_sync``
        kvstore, and each rank updates its own copy (the same sums, so the same steps)."""
        self.group = group
        self._synced = [p for p in self.net.collect_params().values() if p.grad_req != "null"]
        group.share_weights(self._synced)
        # no kvstore: the update is local, on gradients sum_grads has already summed
        self.trainer = gluon.Trainer(self.net.collect_params(), "adam", dict(self._adam),
                                     kvstore=None, update_on_kvstore=False)

    def average_buffers(self) -> None:
        """BatchNorm running statistics (no gradient carries them) averaged over the ranks,
        on every context."""
        aux = [p for p in self.net.collect_params().values() if p.grad_req == "null"]

        def put(p: Any, v: np.ndarray) -> None:
            p.set_data(mx.nd.array(v, dtype=p.dtype))

        average_buffers(self.group, aux, lambda p: p.data(self.ctx[0]).asnumpy(), put)

    # -- data ------------------------------------------------------------------------------
    def batches(self, dsn: str | Sequence[str] | None, dataset: str, split: str, *, batch_size: int,
                shuffle: bool, augment: bool, seed: int, epoch: int, jitter: float = 0.0,
                **stream: Any) -> Iterator[tuple[Any, Any, int]]:
        """``(images, labels, pad)`` of one epoch through :class:`~pggeolearn.mxnet.GeoIter`
        (this rank's shard), normalized on the first context, colour-jittered when ``augment``
        and ``jitter``; ``stream``: more GeoStream options (``sampling``)."""
        rank, world = self.group.shard()
        it = GeoIter(dsn, dataset, split=split, batch_size=batch_size, ctx=self.ctx[0],
                     shuffle=shuffle, seed=seed, epoch=epoch, last_batch="pad",
                     augment=augment, normalize=self._norm_arg(), label_dtype="float32",
                     num_parts=world, part_index=rank, **stream)
        lut = None if self.label_lut is None else mx.nd.array(self.label_lut, ctx=self.ctx[0])
        try:
            for step, batch in enumerate(it):
                images = batch.data[0]
                if augment and jitter:
                    gain, shift = C.jitter_params(seed, epoch, step, images.shape[0], images.shape[1], jitter)
                    images = mx.nd.broadcast_add(mx.nd.broadcast_mul(images, mx.nd.array(gain, ctx=images.context)),
                                                 mx.nd.array(shift, ctx=images.context))
                label = batch.label[0] if lut is None else mx.nd.take(lut, batch.label[0])
                # NODATA pixels: out of the loss and the metrics
                label = mx.nd.where(batch.valid > 0, label, mx.nd.full(label.shape, M.IGNORE,
                                                                      ctx=label.context))
                self.last_tile_ids = np.asarray(batch.index)
                yield images, label, int(batch.pad)
        finally:
            it.close()

    def _norm_arg(self) -> Any:
        n = self.normalization
        return False if not n else (n["mean"], n["std"])

    # -- one step ----------------------------------------------------------------------------
    def _split(self, x: Any) -> list[Any]:
        if len(self.ctx) == 1:
            return [x]
        return gluon.utils.split_and_load(x, self.ctx, even_split=False)

    def _loss(self, logits: Any, label: Any, weight_map: Any) -> tuple[Any, Any]:
        """Sum of the pixel-weighted cross entropy and sum of weights, on one context."""
        nd = mx.nd
        logp = nd.log_softmax(logits, axis=1)
        nll = -nd.pick(logp, label, axis=1)
        return nd.sum(nll * weight_map), nd.sum(weight_map)

    def _dice(self, logits: Any, label: Any, weight_map: Any) -> Any:
        """1 - the soft Dice coefficient averaged over classes, over the batch's counted pixels
        (a differentiable stand-in for IoU; the class weights play no part)."""
        nd = mx.nd
        k = self.cfg.num_classes
        mask = (weight_map > 0).expand_dims(1)
        probs = nd.softmax(logits, axis=1) * mask
        onehot = nd.one_hot(nd.where(weight_map > 0, label, nd.zeros_like(label)), k)
        onehot = nd.transpose(onehot, axes=(0, 3, 1, 2)) * mask
        inter = nd.sum(probs * onehot, axis=(0, 2, 3))
        card = nd.sum(probs + onehot, axis=(0, 2, 3))
        return 1 - nd.mean((2 * inter + 1) / (card + 1))

    def _weights(self, label: Any, pad: int, class_weights: np.ndarray | None) -> Any:
        nd = mx.nd
        valid = label != M.IGNORE
        if class_weights is None:
            w = valid
        else:
            cw = nd.array(class_weights, ctx=label.context)
            w = nd.take(cw, label, mode="clip") * valid
        if pad:
            n = label.shape[0]
            keep = np.ones((n, 1, 1), np.float32)
            keep[n - pad:] = 0
            w = nd.broadcast_mul(w, nd.array(keep, ctx=label.context))
        return w

    def sync(self) -> None:
        """Wait for the engine: backward and the optimizer step run asynchronously after
        train_step returns, and would otherwise be counted as waiting for the next batch."""
        mx.nd.waitall()

    def train_step(self, images: Any, labels: Any, pad: int, lr: float,
                   class_weights: np.ndarray | None, sync: C.StepSync | None = None) -> float:
        """One optimizer step on a batch; returns its mean (weighted) loss. With ``sync``
        (data parallel) the loss is this rank's share of the global batch's: see
        :data:`~pggeolearn.training.common.StepSync`."""
        weights = self._weights(labels, pad, class_weights)
        total_w = None
        if sync is not None:  # the kvstore sums the ranks' gradients: shares of the global loss
            total_w, lr = sync(float(mx.nd.sum(weights).asscalar()))
        self.trainer.set_learning_rate(lr)
        xs, ys, ws = self._split(images), self._split(labels), self._split(weights)
        with autograd.record():
            logits = [self.net(x) for x in xs]
            parts = [self._loss(z, y, w) for z, y, w in zip(logits, ys, ws, strict=True)]
            if total_w is None and len(parts) > 1:
                total_w = sum(float(p[1].asscalar()) for p in parts)
            if total_w is None:
                losses = [p[0] / mx.nd.maximum(p[1], 1e-12) for p in parts]
            else:
                losses = [p[0] / max(total_w, 1e-12) for p in parts]
            if self.loss == "ce+dice":
                k = len(xs) * self.group.world
                losses = [loss + self._dice(z, y, w) / k
                          for loss, z, y, w in zip(losses, logits, ys, ws, strict=True)]
        autograd.backward(losses)
        if sync is not None:
            self.group.sum_grads(self._synced)
        self.trainer.step(1)
        return float(sum(loss.asscalar() for loss in losses))

    def eval_step(self, images: Any, labels: Any, pad: int,
                  class_weights: np.ndarray | None) -> tuple[float, float, np.ndarray, np.ndarray]:
        """``(loss sum, weight sum, predicted classes, true classes)`` of the unpadded samples."""
        weights = self._weights(labels, pad, class_weights)
        loss_sum, w_sum, preds = 0.0, 0.0, []
        for x, y, w in zip(self._split(images), self._split(labels), self._split(weights), strict=True):
            logits = self.net(x)
            s, n = self._loss(logits, y, w)
            loss_sum += float(s.asscalar())
            w_sum += float(n.asscalar())
            preds.append(mx.nd.argmax(logits, axis=1).asnumpy().astype(np.uint8))
        n = labels.shape[0] - pad
        pred = np.concatenate(preds)[:n]
        true = labels.asnumpy()[:n].astype(np.uint8)
        return loss_sum, w_sum, pred, true

    # -- state -------------------------------------------------------------------------------
    def get_weights(self) -> bytes:
        return weights_to_bytes(self.net)

    def set_weights(self, blob: bytes) -> None:
        weights_from_bytes(self.net, blob, self.ctx)

    def get_optimizer_state(self) -> bytes:
        """Adam's moments and update counts (``Trainer.save_states`` pickles the optimizer)."""
        with tempfile.TemporaryDirectory(prefix="pggeolearn-") as tmp:
            path = os.path.join(tmp, "trainer.states")
            self.trainer.save_states(path)
            with open(path, "rb") as f:
                return f.read()

    def set_optimizer_state(self, blob: bytes) -> None:
        with tempfile.TemporaryDirectory(prefix="pggeolearn-") as tmp:
            path = os.path.join(tmp, "trainer.states")
            with open(path, "wb") as f:
                f.write(blob)
            self.trainer.load_states(path)

    # -- inference -------------------------------------------------------------------------------
    def predict_proba(self, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
        """Images ``(N, C, H, W)`` (any pixel type) -> float32 softmax probabilities ``(N, K, H, W)``;
        the stored normalization is applied here, other sizes are padded (reflect) and cropped."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] != self.cfg.in_channels:
            raise errors.ConfigError(
                f"expected images (N, {self.cfg.in_channels}, H, W), got shape {images.shape}")
        n, _, h, w = images.shape
        out = np.empty((n, self.cfg.num_classes, h, w), np.float32)
        ctx = self.ctx[0]
        mean, inv = self._norm_on(ctx)
        for s in range(0, n, batch_size):
            chunk = C.pad_to(images[s:s + batch_size], self.cfg.multiple)
            if chunk.dtype != np.uint8:  # MXNet has no uint16/int16 arrays
                chunk = chunk.astype(np.float32)
            x = mx.nd.array(chunk, ctx=ctx, dtype=chunk.dtype).astype("float32")
            if mean is not None:
                x = mx.nd.broadcast_mul(mx.nd.broadcast_sub(x, mean), inv)
            xs = self._split(x) if len(self.ctx) > 1 else [x]
            probs = [mx.nd.softmax(self.net(p), axis=1).asnumpy() for p in xs]
            out[s:s + batch_size] = np.concatenate(probs)[:, :, :h, :w]
        return out

    def _norm_on(self, ctx: Any) -> tuple[Any, Any]:
        n = self.normalization
        if not n:
            return None, None
        key = str(ctx)
        if key not in self._norm:
            c = self.cfg.in_channels
            mean = np.asarray(n["mean"], np.float32).reshape(1, c, 1, 1)
            inv = 1.0 / np.asarray(n["std"], np.float32).reshape(1, c, 1, 1)
            self._norm[key] = (mx.nd.array(mean, ctx=ctx), mx.nd.array(inv, ctx=ctx))
        return self._norm[key]
