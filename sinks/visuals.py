"""Pictures of what the memory holds: a contact sheet and a tokens-per-second timeline (PNG).

Contact sheet: one thumbnail per group that still has tokens in memory, oldest first; the
token cells the memory kept are shown as they are, pruned cells are dimmed, and the group's
time is written under it. Timeline: tokens kept per second of stream, next to the tokens the
encoder produced for that second, so the pruner's choices over time are visible.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pruning import TokenMemory, TokenSet

BG = (24, 24, 28)
FG = (230, 230, 230)
KEPT = (90, 170, 250)
SEEN = (70, 70, 80)


def kept_mask(snap: TokenSet, group: int) -> np.ndarray:
    """[H, W] bool: which token cells of `group` the memory holds."""
    h, w = snap.grid
    mask = np.zeros((h, w), dtype=bool)
    rows = (snap.group == group).numpy()
    mask[snap.row.numpy()[rows], snap.col.numpy()[rows]] = True
    return mask


def dim_pruned(thumb: np.ndarray, mask: np.ndarray, factor: float = 0.25) -> np.ndarray:
    """The thumbnail with cells outside `mask` darkened (cells scaled to the thumbnail)."""
    th, tw = thumb.shape[:2]
    h, w = mask.shape
    ys = np.minimum(np.arange(th) * h // th, h - 1)
    xs = np.minimum(np.arange(tw) * w // tw, w - 1)
    cell = mask[ys][:, xs]
    out = thumb.astype(np.float32)
    out[~cell] *= factor
    return out.astype(np.uint8)


def contact_sheet(memory: TokenMemory, columns: int = 8) -> Image.Image:
    """One tile per held group that has a thumbnail."""
    snap = memory.snapshot()
    thumbs = memory.thumbnails()
    if not thumbs:
        img = Image.new("RGB", (320, 40), BG)
        ImageDraw.Draw(img).text((8, 12), "memory is empty", fill=FG)
        return img
    th, tw = thumbs[0][2].shape[:2]
    label_h = 14
    rows = math.ceil(len(thumbs) / columns)
    sheet = Image.new("RGB", (columns * (tw + 4) + 4, rows * (th + label_h + 4) + 4), BG)
    draw = ImageDraw.Draw(sheet)
    for i, (group, pts, thumb) in enumerate(thumbs):
        mask = kept_mask(snap, group)
        x = 4 + (i % columns) * (tw + 4)
        y = 4 + (i // columns) * (th + label_h + 4)
        tile = Image.fromarray(dim_pruned(np.asarray(thumb), mask)).resize((tw, th))
        sheet.paste(tile, (x, y))
        draw.text((x, y + th + 1), f"{pts:.1f}s {int(mask.sum())}/{mask.size}", fill=FG)
    return sheet


def timeline(memory: TokenMemory, width: int = 900, height: int = 260) -> Image.Image:
    """Bars: tokens kept per second of stream (blue) over tokens seen for groups held (grey)."""
    snap = memory.snapshot()
    img = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(img)
    if len(snap) == 0:
        draw.text((8, 8), "memory is empty", fill=FG)
        return img
    pts = snap.pts.numpy()
    seconds = np.floor(pts).astype(int)
    t0, t1 = int(seconds.min()), int(seconds.max())
    span = t1 - t0 + 1
    kept = np.bincount(seconds - t0, minlength=span)
    h, w = snap.grid
    groups_per_second = np.zeros(span)
    for g in snap.groups().tolist():
        s = int(np.floor(pts[(snap.group == g).numpy()][0])) - t0
        groups_per_second[s] += 1
    seen = groups_per_second * h * w
    left, bottom, top = 50, height - 30, 24
    peak = max(seen.max(), kept.max(), 1)
    bar_w = (width - left - 10) / span
    for s in range(span):
        x0 = left + s * bar_w
        for value, colour in ((seen[s], SEEN), (kept[s], KEPT)):
            y = bottom - (bottom - top) * value / peak
            draw.rectangle([x0, y, x0 + max(bar_w - 1, 1), bottom], fill=colour)
    draw.line([left, bottom, width - 10, bottom], fill=FG)
    draw.line([left, top, left, bottom], fill=FG)
    draw.text((4, top - 4), f"{int(peak)}", fill=FG)
    draw.text((4, bottom - 8), "0", fill=FG)
    draw.text((left, bottom + 6), f"{t0}s", fill=FG)
    draw.text((width - 60, bottom + 6), f"{t1}s", fill=FG)
    draw.text((left + 8, 4), f"tokens per second: kept (blue) of seen (grey); {len(snap)} held", fill=FG)
    return img


def write_visuals(memory: TokenMemory, out_dir: Path) -> list[Path]:
    """Write contact_sheet.png and timeline.png into `out_dir`; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "contact_sheet.png", out_dir / "timeline.png"]
    contact_sheet(memory).save(paths[0])
    timeline(memory).save(paths[1])
    return paths
