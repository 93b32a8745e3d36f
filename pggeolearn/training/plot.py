"""Training curves as a PNG drawn with matplotlib (the ``plot`` extra): two panels side by side,
loss per epoch (train, val) and IoU per epoch (val mIoU, per-class IoU in the class colours,
the baselines' mIoU dashed), the best epoch marked with a vertical line.

matplotlib is imported only when a plot is drawn (``pggeolearn --help`` and training without
``--plot`` never load it) and renders with the Agg canvas: no display, no pyplot state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pggeolearn import errors, palette

SIZE = (1120, 428)  # pixels: two panels of 560 x 428
DPI = 100
COLOURS = palette.LINE_RGB  # loss: train, val; per-class IoU lines take the class colours
AXIS = (40, 40, 40)  # the mIoU line
BASELINE = (120, 120, 120)
INSTALL_HINT = "pip install 'pggeolearn[plot]'"


def require_matplotlib() -> None:
    """Fail with one line when matplotlib (the ``plot`` extra) is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise errors.MissingDependency(
            f"--plot draws with matplotlib, which is not installed: {INSTALL_HINT}") from exc


def _rgb(c: tuple[int, int, int]) -> tuple[float, float, float]:
    return (c[0] / 255, c[1] / 255, c[2] / 255)


def _series(values: Sequence[Any]) -> list[float]:
    """Floats for matplotlib, NaN (a gap in the line) where a value is missing."""
    return [float(v) if v is not None and math.isfinite(float(v)) else math.nan for v in values]


def _loss_limits(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if math.isfinite(v)] or [0.0, 1.0]
    # a wild first epoch (BatchNorm statistics still settling) must not flatten the rest
    lo, hi = min(vals), min(max(vals), 4 * sorted(vals)[len(vals) // 2])
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    return max(0.0, lo - pad), hi + pad


def plot_history(history: Sequence[dict[str, Any]], out: str | Path, *, classes: dict[int, str],
                 baselines: dict[str, Any] | None = None, title: str = "",
                 best_epoch: int | None = None) -> Path:
    """Write the curves of ``history`` (the per-epoch records of
    :func:`pggeolearn.training.train`) to ``out`` (PNG, :data:`SIZE` pixels); returns the path."""
    path = Path(out)
    if not path.parent.is_dir():
        raise errors.ConfigError(f"folder {path.parent} does not exist")
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = list(range(1, len(history) + 1))
    fig = Figure(figsize=(SIZE[0] / DPI, SIZE[1] / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    loss_ax, iou_ax = fig.subplots(1, 2)
    if title:
        fig.suptitle(title, fontsize=10)

    train_loss = _series([h.get("train_loss") for h in history])
    val_loss = _series([h["val"].get("loss") for h in history])
    loss_ax.plot(epochs, train_loss, "o-", color=_rgb(COLOURS[0]), lw=2, ms=4, label="train")
    loss_ax.plot(epochs, val_loss, "o-", color=_rgb(COLOURS[1]), lw=2, ms=4, label="val")
    loss_ax.set_ylim(*_loss_limits(train_loss + val_loss))
    loss_ax.set(title="loss (pixel cross entropy)", xlabel="epoch", ylabel="loss")

    for name, b in (baselines or {}).items():
        miou = b.miou if hasattr(b, "miou") else b.get("miou")
        extra = b.extra if hasattr(b, "extra") else {}
        if extra.get("same_as") or miou is None:
            continue
        iou_ax.axhline(float(miou), color=_rgb(BASELINE), lw=1, ls="--", label=f"{name} mIoU")
    iou_ax.plot(epochs, _series([h["val"].get("miou") for h in history]), "o-",
                color=_rgb(AXIS), lw=3, ms=4, label="mIoU", zorder=3)
    for i, k in enumerate(sorted(classes)):
        colour = palette.BACKGROUND_PNG if k == 0 else palette.class_colour(k)
        ious = [h["val"]["iou"][i] if i < len(h["val"]["iou"]) else None for h in history]
        iou_ax.plot(epochs, _series(ious), "o-", color=_rgb(colour), lw=2, ms=4,
                    label=f"IoU {classes[k]}")
    iou_ax.set_ylim(0.0, 1.0)
    iou_ax.set(title="IoU on the val split", xlabel="epoch", ylabel="IoU")

    for ax, where in ((loss_ax, "upper right"), (iou_ax, "lower right")):
        if best_epoch:
            ax.axvline(best_epoch, color=_rgb(BASELINE), lw=1, ls=":")
        ax.set_xlim(0.75, max(len(epochs), 2) + 0.25)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
        ax.grid(True, color="0.9")
        ax.legend(loc=where, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=DPI)
    return path
