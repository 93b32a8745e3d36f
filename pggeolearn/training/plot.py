"""Training curves as a PNG drawn with Pillow (no matplotlib): two panels side by side,
loss per epoch (train, val) and IoU per epoch (val mIoU, per-class IoU, the baselines' mIoU
dashed), the best epoch marked with a vertical line."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from pggeolearn import errors, palette

PANEL = (560, 400)
MARGIN = (64, 24, 20, 52)  # left, top, right, bottom (inside a panel)
BG, AXIS, GRID, TEXT = (255, 255, 255), (40, 40, 40), (225, 225, 225), (20, 20, 20)
COLOURS = palette.LINE_RGB  # loss: train, val; per-class IoU lines take the class colours
BASELINE = (120, 120, 120)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    ticks, t = [], start
    while t <= hi + 1e-12:
        ticks.append(round(t, 10))
        t += step
    return ticks


class _Panel:
    """One chart: x = epochs, y = values; maps data to pixels inside ``box``."""

    def __init__(self, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], x_max: int,
                 y_lo: float, y_hi: float, title: str, y_label: str):
        self.d, self.box = draw, box
        self.x_max = max(x_max, 2)
        if y_hi - y_lo < 1e-9:
            y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
        self.y_lo, self.y_hi = y_lo, y_hi
        self.font = ImageFont.load_default()
        self._frame(title, y_label)

    def xy(self, x: float, y: float) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        px = x0 + (x - 1) / (self.x_max - 1) * (x1 - x0)
        py = y1 - (y - self.y_lo) / (self.y_hi - self.y_lo) * (y1 - y0)
        return px, min(max(py, y0), y1)  # values off the scale sit on its edge

    def _frame(self, title: str, y_label: str) -> None:
        x0, y0, x1, y1 = self.box
        d = self.d
        for t in _nice_ticks(self.y_lo, self.y_hi):
            _, py = self.xy(1, t)
            d.line([(x0, py), (x1, py)], fill=GRID)
            label = f"{t:g}"
            w = d.textlength(label, font=self.font)
            d.text((x0 - 6 - w, py - 6), label, fill=TEXT, font=self.font)
        step = max(1, math.ceil(self.x_max / 10))
        for e in range(1, self.x_max + 1, step):
            px, _ = self.xy(e, self.y_lo)
            d.line([(px, y1), (px, y1 + 4)], fill=AXIS)
            label = str(e)
            d.text((px - d.textlength(label, font=self.font) / 2, y1 + 6), label, fill=TEXT, font=self.font)
        d.rectangle([x0, y0, x1, y1], outline=AXIS)
        d.text((x0, y0 - 18), title, fill=TEXT, font=self.font)
        d.text(((x0 + x1) / 2 - 16, y1 + 22), "epoch", fill=TEXT, font=self.font)
        d.text((x0 - 58, y0 - 18), y_label, fill=TEXT, font=self.font)

    def line(self, ys: Sequence[float | None], colour: tuple[int, int, int], width: int = 2,
             dashed: bool = False) -> None:
        pts = [self.xy(i + 1, y) for i, y in enumerate(ys) if y is not None and math.isfinite(y)]
        if dashed:
            x0, _, x1, _ = self.box
            y = pts[0][1] if pts else None
            if y is None:
                return
            x = x0
            while x < x1:
                self.d.line([(x, y), (min(x + 8, x1), y)], fill=colour, width=width)
                x += 14
            return
        if len(pts) > 1:
            self.d.line(pts, fill=colour, width=width, joint="curve")
        for px, py in pts:
            self.d.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=colour)

    def vline(self, x: float, colour: tuple[int, int, int]) -> None:
        px, _ = self.xy(x, self.y_lo)
        _, y0, _, y1 = self.box
        for y in range(int(y0), int(y1), 8):
            self.d.line([(px, y), (px, min(y + 4, y1))], fill=colour)

    def legend(self, items: list[tuple[str, tuple[int, int, int]]], corner: str = "top") -> None:
        x0, y0, x1, y1 = self.box
        y = y0 + 6 if corner == "top" else y1 - 8 - 14 * len(items)
        widest = max((self.d.textlength(n, font=self.font) for n, _ in items), default=0)
        x = x1 - widest - 30
        self.d.rectangle([x - 6, y - 4, x1 - 4, y + 14 * len(items)], fill=(255, 255, 255), outline=GRID)
        for name, colour in items:
            self.d.line([(x, y + 6), (x + 16, y + 6)], fill=colour, width=3)
            self.d.text((x + 20, y), name, fill=TEXT, font=self.font)
            y += 14


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def plot_history(history: Sequence[dict[str, Any]], out: str | Path, *, classes: dict[int, str],
                 baselines: dict[str, Any] | None = None, title: str = "",
                 best_epoch: int | None = None) -> Path:
    """Write the curves of ``history`` (the per-epoch records of
    :func:`pggeolearn.training.train`) to ``out`` (PNG); returns the path."""
    path = Path(out)
    if not path.parent.is_dir():
        raise errors.ConfigError(f"folder {path.parent} does not exist")
    n = len(history)
    img = Image.new("RGB", (PANEL[0] * 2, PANEL[1] + 28), BG)
    d = ImageDraw.Draw(img)
    d.text((MARGIN[0], 6), title, fill=TEXT, font=ImageFont.load_default())

    train_loss = [h.get("train_loss") for h in history]
    val_loss = [h["val"].get("loss") for h in history]
    vals = _finite(train_loss + val_loss) or [0.0, 1.0]
    # a wild first epoch (BatchNorm statistics still settling) must not flatten the rest
    lo, hi = min(vals), min(max(vals), 4 * sorted(vals)[len(vals) // 2])
    pad = 0.05 * (hi - lo or 1)
    left = (MARGIN[0], 28 + MARGIN[1], PANEL[0] - MARGIN[2], 28 + PANEL[1] - MARGIN[3])
    p = _Panel(d, left, n, max(0.0, lo - pad), hi + pad, "loss (pixel cross entropy)", "loss")
    if best_epoch:
        p.vline(best_epoch, BASELINE)
    p.line(train_loss, COLOURS[0])
    p.line(val_loss, COLOURS[1])
    p.legend([("train", COLOURS[0]), ("val", COLOURS[1])])

    right = (PANEL[0] + MARGIN[0], left[1], 2 * PANEL[0] - MARGIN[2], left[3])
    q = _Panel(d, right, n, 0.0, 1.0, "IoU on the val split", "IoU")
    if best_epoch:
        q.vline(best_epoch, BASELINE)
    items = []
    for name, b in (baselines or {}).items():
        miou = b.miou if hasattr(b, "miou") else b.get("miou")
        extra = b.extra if hasattr(b, "extra") else {}
        if extra.get("same_as"):
            continue
        q.line([miou] * max(n, 1), BASELINE, width=1, dashed=True)
        items.append((f"{name} mIoU", BASELINE))
    q.line([h["val"].get("miou") for h in history], AXIS, width=3)
    items.insert(0, ("mIoU", AXIS))
    for i, k in enumerate(sorted(classes)):
        colour = palette.BACKGROUND_PNG if k == 0 else palette.class_colour(k)
        q.line([h["val"]["iou"][i] if i < len(h["val"]["iou"]) else None for h in history], colour, width=1)
        items.append((f"IoU {classes[k]}", colour))
    q.legend(items, corner="bottom")
    img.save(path, format="PNG")
    return path
