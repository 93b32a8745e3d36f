"""The U-Net in PyTorch (the same architecture as :mod:`pggeolearn.training.models_mx`) and the
PyTorch side of training. torch is imported only here and in :mod:`pggeolearn.torch`."""

from __future__ import annotations

import inspect
import io
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pggeolearn import errors
from pggeolearn.torch import make_loader
from pggeolearn.training import common as C
from pggeolearn.training import metrics as M
from pggeolearn.training.common import Architecture
from pggeolearn.training.group import Group, average_buffers

FRAMEWORK = "torch"


class ConvBlock(nn.Sequential):
    """Two (3x3 conv, BatchNorm, ReLU)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResBlock(nn.Module):
    """Two (3x3 conv, BatchNorm) with a shortcut (identity, or 1x1 conv + BatchNorm when the
    channels change), ReLU after the sum."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))
        self.short = None if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False),
                                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x if self.short is None else self.short(x)
        return torch.relu(self.body(x) + s)


class UNet(nn.Module):
    """U-Net for semantic segmentation: ``(N, C, H, W)`` float32 -> ``(N, K, H, W)`` logits."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, depth: int = 3,
                 stem_stride: int = 2, block: str = "plain", head: str = "refine"):
        super().__init__()
        cfg = Architecture(in_channels=in_channels, num_classes=num_classes, width=width,
                           depth=depth, stem_stride=stem_stride, block=block, head=head)
        cfg.validate()
        self.cfg = cfg
        w = cfg.channels
        cin = in_channels
        Block = ResBlock if block == "residual" else ConvBlock  # noqa: N806
        if stem_stride > 1:
            layers: list[nn.Module] = []
            for _ in range(stem_stride.bit_length() - 1):  # one stride-2 conv per halving
                layers += [nn.Conv2d(cin, w[0], 3, stride=2, padding=1, bias=False),
                           nn.BatchNorm2d(w[0]), nn.ReLU(inplace=True)]
                cin = w[0]
            self.stem = nn.Sequential(*layers)
        self.enc = nn.ModuleList()
        for c in w:
            self.enc.append(Block(cin, c))
            cin = c
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for c in reversed(w[:-1]):
            self.up.append(nn.ConvTranspose2d(cin, c, 2, stride=2))
            self.dec.append(Block(2 * c, c))
            cin = c
        if stem_stride > 1 and head == "refine":
            self.head_up = nn.ConvTranspose2d(cin, w[0], stem_stride, stride=stem_stride)
            self.refine = nn.Sequential(nn.Conv2d(w[0] + in_channels, w[0], 3, padding=1, bias=False),
                                        nn.BatchNorm2d(w[0]), nn.ReLU(inplace=True))
        self.classify = nn.Conv2d(w[0], num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = x
        if self.cfg.stem_stride > 1:
            x = self.stem(x)
        skips = []
        for i, block in enumerate(self.enc):
            if i:
                x = nn.functional.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for up, block, skip in zip(self.up, self.dec, reversed(skips[:-1]), strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        if self.cfg.stem_stride > 1 and self.cfg.head == "refine":
            x = self.refine(torch.cat([self.head_up(x), inputs], dim=1))
        x = self.classify(x)
        if self.cfg.stem_stride > 1 and self.cfg.head == "bilinear":  # logits back to full size
            x = nn.functional.interpolate(x, size=inputs.shape[-2:], mode="bilinear", align_corners=False)
        return x


def build(cfg: Architecture) -> UNet:
    """A new U-Net (seed first: ``torch.manual_seed``)."""
    return UNet(cfg.in_channels, cfg.num_classes, cfg.width, cfg.depth, cfg.stem_stride, cfg.block, cfg.head)


def weights_to_bytes(net: nn.Module) -> bytes:
    """The state dict (BatchNorm running statistics included) as ``torch.save`` bytes."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, buf)
    return buf.getvalue()


def weights_from_bytes(net: nn.Module, blob: bytes) -> None:
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise errors.ConfigError(f"stored torch weights do not fit this U-Net: {first}") from exc


def device_of(device: str) -> torch.device:
    """The torch device for a device string (one GPU: the first one named, or cuda:0)."""
    kind, ids = C.parse_device(device)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "cpu" or (kind == "auto" and n == 0):
        return torch.device("cpu")
    if n == 0:
        raise errors.ConfigError("a GPU was asked for, but torch sees none (torch.cuda.is_available() "
                                 "is False; use --device cpu)")
    i = ids[0] if ids else 0
    if i >= n:
        raise errors.ConfigError(f"GPU {i} was asked for, but torch sees {n} GPU(s)")
    return torch.device(f"cuda:{i}")


def map_error(exc: BaseException, batch_size: int) -> errors.PggeolearnError | None:
    """A torch out-of-memory error -> one clear line; anything else -> None."""
    oom = getattr(torch, "OutOfMemoryError", ())
    if (oom and isinstance(exc, oom)) or (isinstance(exc, RuntimeError | MemoryError) and C.is_oom(exc)):
        return C.oom_error(batch_size)
    return None


def _threads() -> None:
    """Importing mxnet first leaves torch with one thread; use the cores unless told otherwise."""
    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() < (os.cpu_count() or 1):
        torch.set_num_threads(os.cpu_count() or 1)


class TorchModel:
    """A U-Net with its device, Adam optimizer and (weighted) loss, behind the framework-neutral
    interface that :func:`pggeolearn.training.loop.train_rank` drives."""

    framework = FRAMEWORK

    def __init__(self, cfg: Architecture, device: str = "cpu", *, seed: int = 0,
                 normalization: dict[str, list[float]] | None = None, train: bool = True,
                 lr: float = 1e-3, weight_decay: float = 0.0, loss: str = "ce"):
        _threads()
        self.cfg = cfg
        self.loss = loss
        self.dev = device_of(device)
        self.device = str(self.dev)
        torch.manual_seed(seed)
        np.random.seed(seed)
        if self.dev.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
            det = getattr(torch.utils, "deterministic", None)
            if det is not None:  # filling new tensors with NaN costs ~20 % and changes no result
                det.fill_uninitialized_memory = False
        # channels-last is ~2x faster for convolutions on CPU (oneDNN) and fine on GPUs
        self.net = build(cfg).to(self.dev, memory_format=torch.channels_last)
        self.normalization = normalization
        self.label_lut: np.ndarray | None = None  # class id -> channel, when ids are not 0..K-1
        self._norm: tuple[torch.Tensor, torch.Tensor] | None = None
        if normalization:
            c = cfg.in_channels
            self._norm = (torch.tensor(normalization["mean"], dtype=torch.float32, device=self.dev).view(1, c, 1, 1),
                          1.0 / torch.tensor(normalization["std"], dtype=torch.float32,
                                             device=self.dev).view(1, c, 1, 1))
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr, weight_decay=weight_decay) \
            if train else None
        self.net.train(train)
        self.group: Group = Group()
        self.ddp: nn.Module | None = None  # the net wrapped in DistributedDataParallel (--nproc)
        self.last_tile_ids: np.ndarray | None = None  # of the batch batches() yielded last

    def distribute(self, group: Group) -> None:
        """Train data-parallel in ``group`` (a :class:`TorchGroup`): DDP averages the gradients
        over the ranks in every backward; its constructor gives every rank rank 0's weights.
        BatchNorm statistics are averaged per epoch (:meth:`average_buffers`), not broadcast."""
        from torch.nn.parallel import DistributedDataParallel

        self.group = group
        ids = None
        if self.dev.type == "cuda":  # NCCL's communicator on this rank's GPU, not on GPU 0
            torch.cuda.set_device(self.dev)
            ids = [self.dev.index]
        # no buffer broadcast before each forward (torch 2.13 renamed the option)
        sync = "forward_sync_buffers" if "forward_sync_buffers" in \
            inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers"
        self.ddp = DistributedDataParallel(self.net, device_ids=ids, **{sync: False})

    def average_buffers(self) -> None:
        """BatchNorm running statistics averaged over the ranks (each saw its own batches)."""
        bufs = [b for b in self.net.buffers() if b.is_floating_point()]

        def put(b: torch.Tensor, v: np.ndarray) -> None:
            b.copy_(torch.from_numpy(v))

        average_buffers(self.group, bufs, lambda b: b.detach().cpu().double().numpy(), put)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.dev, non_blocking=True).float()
        if self._norm is not None:
            x = (x - self._norm[0]) * self._norm[1]
        return x.contiguous(memory_format=torch.channels_last)

    # -- data ------------------------------------------------------------------------------
    def batches(self, dsn: str | Sequence[str] | None, dataset: str, split: str, *, batch_size: int,
                shuffle: bool, augment: bool, seed: int, epoch: int, jitter: float = 0.0,
                **stream: Any) -> Iterator[tuple[Any, Any, int]]:
        """``(images, labels, pad)`` of one epoch through :func:`pggeolearn.torch.make_loader`
        (this rank's shard), normalized on the device, colour-jittered when ``augment`` and
        ``jitter``; ``stream``: more GeoStream options (``sampling``)."""
        rank, world = self.group.shard()
        loader = make_loader(dsn, dataset, split=split, batch_size=batch_size, epoch=epoch,
                             shuffle=shuffle, seed=seed, augment=augment, last_batch="pad",
                             normalize=False, pin_memory=self.dev.type == "cuda",
                             rank=rank, world_size=world, **stream)
        lut = None if self.label_lut is None else torch.as_tensor(self.label_lut, device=self.dev).long()
        for step, batch in enumerate(loader):
            images = self._normalize(batch["image"])
            if augment and jitter:
                gain, shift = C.jitter_params(seed, epoch, step, images.shape[0], images.shape[1], jitter)
                images = images * torch.from_numpy(gain).to(self.dev) + torch.from_numpy(shift).to(self.dev)
            label = batch["label"].to(self.dev, non_blocking=True).long()
            if lut is not None:
                label = lut[label]
            # NODATA pixels: out of the loss and the metrics
            label = label.masked_fill(~batch["valid"].to(self.dev, non_blocking=True), M.IGNORE)
            self.last_tile_ids = batch["tile_id"].numpy()
            yield images, label, int(batch["pad"])

    # -- one step ----------------------------------------------------------------------------
    def _weights(self, labels: torch.Tensor, pad: int, class_weights: np.ndarray | None) -> torch.Tensor:
        valid = (labels != M.IGNORE).float()
        if class_weights is None:
            w = valid
        else:
            cw = torch.as_tensor(class_weights, dtype=torch.float32, device=self.dev)
            w = cw[labels.clamp_max(len(cw) - 1)] * valid
        if pad:
            w[labels.shape[0] - pad:] = 0
        return w

    @staticmethod
    def _loss(logits: torch.Tensor, labels: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nll = nn.functional.cross_entropy(logits, labels, reduction="none", ignore_index=M.IGNORE)
        return (nll * w).sum(), w.sum()

    def _dice(self, logits: torch.Tensor, labels: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """1 - the soft Dice coefficient averaged over classes, over the batch's counted pixels
        (a differentiable stand-in for IoU; the class weights play no part)."""
        mask = (w > 0).unsqueeze(1).float()
        probs = torch.softmax(logits, dim=1) * mask
        onehot = nn.functional.one_hot(labels.masked_fill(w <= 0, 0), self.cfg.num_classes)
        onehot = onehot.permute(0, 3, 1, 2).float() * mask
        inter = (probs * onehot).sum(dim=(0, 2, 3))
        card = (probs + onehot).sum(dim=(0, 2, 3))
        return 1 - ((2 * inter + 1) / (card + 1)).mean()

    def sync(self) -> None:
        """Wait for the device (CUDA runs backward and the step asynchronously), so that
        compute is not counted as waiting for the next batch."""
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, pad: int, lr: float,
                   class_weights: np.ndarray | None, sync: C.StepSync | None = None) -> float:
        """One optimizer step on a batch; returns its mean (weighted) loss. With ``sync``
        (data parallel) the loss is this rank's share of the global batch's: see
        :data:`~pggeolearn.training.common.StepSync`."""
        self.net.train()
        w = self._weights(labels, pad, class_weights)
        if sync is not None:
            total, lr = sync(float(w.sum()))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        logits = (self.ddp or self.net)(images)
        s, n = self._loss(logits, labels, w)
        dice = self._dice(logits, labels, w) if self.loss == "ce+dice" else None
        if sync is None:
            loss = s / n.clamp_min(1e-12)
            objective = loss = loss if dice is None else loss + dice
        else:  # DDP averages gradients over the ranks: scaled, the shares sum to the global loss
            share = s / max(total, 1e-12)
            objective = share * self.group.world + (0 if dice is None else dice)
            loss = share + (0 if dice is None else dice / self.group.world)
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def eval_step(self, images: torch.Tensor, labels: torch.Tensor, pad: int,
                  class_weights: np.ndarray | None) -> tuple[float, float, np.ndarray, np.ndarray]:
        """``(loss sum, weight sum, predicted classes, true classes)`` of the unpadded samples."""
        self.net.eval()
        w = self._weights(labels, pad, class_weights)
        logits = self.net(images)
        s, n = self._loss(logits, labels, w)
        k = labels.shape[0] - pad
        pred = logits[:k].argmax(dim=1).to(torch.uint8).cpu().numpy()
        true = labels[:k].to(torch.uint8).cpu().numpy()
        return float(s), float(n), pred, true

    # -- state -------------------------------------------------------------------------------
    def get_weights(self) -> bytes:
        return weights_to_bytes(self.net)

    def set_weights(self, blob: bytes) -> None:
        weights_from_bytes(self.net, blob)

    def get_optimizer_state(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self.optimizer.state_dict(), buf)
        return buf.getvalue()

    def set_optimizer_state(self, blob: bytes) -> None:
        self.optimizer.load_state_dict(torch.load(io.BytesIO(blob), map_location=self.dev,
                                                  weights_only=True))

    # -- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_proba(self, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
        """Images ``(N, C, H, W)`` (any pixel type) -> float32 softmax probabilities ``(N, K, H, W)``;
        the stored normalization is applied here, other sizes are padded (reflect) and cropped."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] != self.cfg.in_channels:
            raise errors.ConfigError(
                f"expected images (N, {self.cfg.in_channels}, H, W), got shape {images.shape}")
        self.net.eval()
        n, _, h, w = images.shape
        out = np.empty((n, self.cfg.num_classes, h, w), np.float32)
        for s in range(0, n, batch_size):
            chunk = np.ascontiguousarray(C.pad_to(images[s:s + batch_size], self.cfg.multiple))
            x = self._normalize(torch.from_numpy(chunk))
            probs = torch.softmax(self.net(x), dim=1)
            out[s:s + batch_size] = probs[:, :, :h, :w].cpu().numpy()
        return out
