"""Pictures of what a camera's memory holds at the end of a run: a contact sheet and a
tokens-per-second timeline (PNG), drawn by a sink from the bus and the camera's `MemoryMap`.

Contact sheet: one thumbnail per group that still has tokens in memory, oldest first; the
token cells the memory kept are shown as they are, pruned cells are dimmed, and the group's
time is written under it. Timeline: tokens kept per second of stream, next to the tokens the
encoder produced for that second, so the pruner's choices over time are visible.

The memory holds no pictures: `GroupAdded` events carry each group's thumbnail, and
`Thumbnails` keeps those whose group the memory still holds (checked against the map every so
often), so what it keeps stays bounded however long the stream runs; the visuals sink and the
HTTP service each keep theirs. Nothing here imports torch.
"""
from __future__ import annotations

import asyncio
import io
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from stream.bus import Sink
from stream.camera_api import MemoryMap
from stream.events import Event, GroupAdded

log = logging.getLogger(__name__)

BG = (24, 24, 28)
FG = (230, 230, 230)
KEPT = (90, 170, 250)
SEEN = (70, 70, 80)

Thumbnail = tuple[int, float, np.ndarray]  # (group, pts, H x W x 3 uint8 RGB)


def kept_mask(memory: MemoryMap, group: int) -> np.ndarray:
    """[H, W] bool: which token cells of `group` the memory holds."""
    h, w = memory.grid
    mask = np.zeros((h, w), dtype=bool)
    rows = memory.group == group
    mask[memory.row[rows], memory.col[rows]] = True
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


def contact_sheet(memory: MemoryMap, thumbnails: Sequence[Thumbnail], columns: int = 8) -> Image.Image:
    """One tile per held group that has a thumbnail, in the order given; others are skipped."""
    held = set(np.unique(memory.group).tolist())
    thumbs = [t for t in thumbnails if t[0] in held]
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
        mask = kept_mask(memory, group)
        x = 4 + (i % columns) * (tw + 4)
        y = 4 + (i // columns) * (th + label_h + 4)
        tile = Image.fromarray(dim_pruned(np.asarray(thumb), mask)).resize((tw, th))
        sheet.paste(tile, (x, y))
        draw.text((x, y + th + 1), f"{pts:.1f}s {int(mask.sum())}/{mask.size}", fill=FG)
    return sheet


def timeline(memory: MemoryMap, width: int = 900, height: int = 260) -> Image.Image:
    """Bars: tokens kept per second of stream (blue) over tokens seen for groups held (grey)."""
    img = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(img)
    n = int(memory.group.size)
    if n == 0:
        draw.text((8, 8), "memory is empty", fill=FG)
        return img
    seconds = np.floor(memory.pts).astype(int)
    t0, t1 = int(seconds.min()), int(seconds.max())
    span = t1 - t0 + 1
    kept = np.bincount(seconds - t0, minlength=span)
    h, w = memory.grid
    _, first = np.unique(memory.group, return_index=True)  # a group's second is that of its first token
    seen = np.bincount(seconds[first] - t0, minlength=span) * h * w
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
    draw.text((left + 8, 4), f"tokens per second: kept (blue) of seen (grey); {n} held", fill=FG)
    return img


def png(image: Image.Image) -> bytes:
    """The picture as PNG bytes (for serving it rather than writing it)."""
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def write_visuals(memory: MemoryMap, thumbnails: Sequence[Thumbnail], out_dir: Path) -> list[Path]:
    """Write contact_sheet.png and timeline.png into `out_dir`; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "contact_sheet.png", out_dir / "timeline.png"]
    contact_sheet(memory, thumbnails).save(paths[0])
    timeline(memory).save(paths[1])
    return paths


class Thumbnails:
    """One camera's thumbnails of the groups its memory still holds, bounded.

    Every `refresh_every` thumbnails, or when more than `max_thumbnails` are kept, it asks
    `memory_map` (off the event loop: it waits for the memory's lock) which groups are still
    held and forgets the others; past the bound the oldest go first, as the memory's own
    eviction tends to.
    """

    def __init__(self, memory_map: Callable[[], MemoryMap], max_thumbnails: int = 256, refresh_every: int = 32):
        if max_thumbnails < 1 or refresh_every < 1:
            raise ValueError(f"max_thumbnails and refresh_every must be >= 1, got {max_thumbnails}, {refresh_every}")
        self.memory_map = memory_map
        self.max_thumbnails = int(max_thumbnails)
        self.refresh_every = int(refresh_every)
        self._thumbs: OrderedDict[int, tuple[float, np.ndarray]] = OrderedDict()
        self._since_refresh = 0

    def __len__(self) -> int:
        return len(self._thumbs)

    def kept(self) -> list[Thumbnail]:
        """(group, pts, thumbnail) kept now, oldest first."""
        return [(g, pts, img) for g, (pts, img) in self._thumbs.items()]

    async def add(self, event: GroupAdded) -> None:
        """Keep the event's thumbnail (if it has one), forgetting groups no longer held."""
        if event.thumbnail is None:
            return
        self._thumbs[event.group] = (event.pts, np.asarray(event.thumbnail))
        self._since_refresh += 1
        if len(self._thumbs) > self.max_thumbnails or self._since_refresh >= self.refresh_every:
            await self._drop_unheld()
            while len(self._thumbs) > self.max_thumbnails:
                self._thumbs.popitem(last=False)

    async def _drop_unheld(self) -> None:
        # Only groups whose event came before the map was asked for: a newer one may not be in it.
        known = list(self._thumbs)
        self._since_refresh = 0
        memory = await asyncio.to_thread(self.memory_map)
        held = set(np.unique(memory.group).tolist())
        for g in known:
            if g not in held:
                self._thumbs.pop(g, None)


class VisualsSink(Sink):
    """Keeps one camera's thumbnails of held groups (`Thumbnails`); draws the pictures when the
    run ends. `close()` (every stop, Ctrl-C and SIGTERM included) writes the PNGs into
    `out_dir`; `written` lists them.
    """

    name = "visuals"

    def __init__(self, camera: str, out_dir: Path, memory_map: Callable[[], MemoryMap],
                 max_thumbnails: int = 256, refresh_every: int = 32):
        self.camera = camera
        self.out_dir = Path(out_dir)
        self.memory_map = memory_map
        self.written: list[Path] = []
        self._kept = Thumbnails(memory_map, max_thumbnails, refresh_every)
        self._closed = False

    def thumbnails(self) -> list[Thumbnail]:
        """(group, pts, thumbnail) kept now, oldest first."""
        return self._kept.kept()

    async def handle(self, event: Event) -> None:
        if self._closed or not isinstance(event, GroupAdded) or event.camera != self.camera:
            return
        await self._kept.add(event)

    async def close(self) -> None:
        """Write the pictures once; the thread finishes them even if this await is cancelled."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._write)

    def _write(self) -> None:
        paths = write_visuals(self.memory_map(), self.thumbnails(), self.out_dir)
        self.written = paths
        for path in paths:
            log.info("%s: wrote %s", self.camera, path)
