"""Line plots as PNG with PIL only (no matplotlib dependency): one line per series, optional
min-max whiskers, a legend. Enough for recall-vs-budget and RSS-over-time."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
           (23, 190, 207), (140, 86, 75), (127, 127, 127), (188, 189, 34), (227, 119, 194)]
DASHED = {"uniform", "recent", "dtd", "random"}


@dataclass(frozen=True)
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    lo: Sequence[float] | None = None
    hi: Sequence[float] | None = None


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo or 1.0
    step = 10 ** math.floor(math.log10(span / n))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if span / (step * m) <= n)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def line_plot(path: Path, series: Sequence[Series], title: str, xlabel: str, ylabel: str,
              ylim: tuple[float, float] | None = None, xticks: Sequence[float] | None = None,
              log_x: bool = False, size: tuple[int, int] = (900, 560)) -> Path:
    """Write a PNG line plot; baselines (DASHED labels) are drawn dashed."""
    w, h = size
    left, right, top, bottom = 80, 190, 64, 60
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs = [x for s in series for x in s.x]
    ys = [v for s in series for v in [*s.y, *(s.lo or []), *(s.hi or [])] if not math.isnan(v)]
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    x0, x1 = fx(min(xs)), fx(max(xs))
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = ylim if ylim else (min(ys, default=0.0), max(ys, default=1.0))
    if y1 == y0:
        y1 = y0 + 1.0

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (fx(x) - x0) / (x1 - x0) * (w - left - right),
                h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    f, small = _font(14), _font(12)
    d.text((left, 15), title, fill="black", font=_font(16))
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for ty in _ticks(y0, y1):
        _, py = px(min(xs), ty)
        d.line([left, py, w - right, py], fill=(230, 230, 230))
        d.text((left - 8, py), f"{ty:g}", fill="black", font=small, anchor="rm")
    for tx in xticks or _ticks(min(xs), max(xs)):
        pxx, _ = px(tx, y0)
        d.line([pxx, top, pxx, h - bottom], fill=(240, 240, 240))
        d.text((pxx, h - bottom + 6), f"{tx:g}", fill="black", font=small, anchor="ma")
    d.text(((left + w - right) / 2, h - 22), xlabel, fill="black", font=f, anchor="ma")
    d.text((left - 40, top - 6), ylabel, fill="black", font=f, anchor="ld")
    for i, s in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        pts = [px(x, y) for x, y in zip(s.x, s.y) if not math.isnan(y)]
        if s.lo is not None and s.hi is not None:
            for x, lo, hi in zip(s.x, s.lo, s.hi):
                if not (math.isnan(lo) or math.isnan(hi)):
                    (ax, ay), (_, by) = px(x, lo), px(x, hi)
                    d.line([ax, ay, ax, by], fill=colour, width=1)
        _polyline(d, pts, colour, dashed=s.label in DASHED)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
        ly = top + 10 + i * 20
        _polyline(d, [(w - right + 12, ly), (w - right + 40, ly)], colour, dashed=s.label in DASHED)
        d.text((w - right + 46, ly), s.label, fill="black", font=small, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _polyline(d: ImageDraw.ImageDraw, pts: Sequence[tuple[float, float]], colour, dashed: bool) -> None:
    for a, b in zip(pts, pts[1:]):
        if not dashed:
            d.line([a, b], fill=colour, width=2)
            continue
        length = math.dist(a, b)
        steps = max(1, int(length // 8))
        for k in range(0, steps, 2):
            t0, t1 = k / steps, min(1.0, (k + 1) / steps)
            d.line([(a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0),
                    (a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1)], fill=colour, width=2)
