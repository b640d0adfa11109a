"""The sampler: brings a source down to the target fps and decides what to drop.

`every` (files, synthetic clips): every frame due at the target fps is passed on; a slow
consumer slows the reader (nothing is dropped). `latest` (live cameras): a reader task keeps
pulling from the source at its own pace into a small queue where the newest frame wins, so a
slow consumer sees fresh frames and the drops are counted instead of queued.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterable, AsyncIterator

from .types import Frame

log = logging.getLogger(__name__)

POLICIES = ("latest", "every", "auto")


@dataclass
class SamplerStats:
    frames_in: int = 0  # frames the source produced
    frames_out: int = 0  # frames handed on
    skipped: int = 0  # not due at the target fps (by design)
    dropped: int = 0  # due, but overwritten by a newer frame because the consumer was behind


class Sampler:
    """Async iterator of frames at `fps` (by pts) under a drop policy."""

    def __init__(self, source: AsyncIterable[Frame], fps: float, policy: str = "auto", queue_size: int = 2):
        if fps <= 0:
            raise ValueError(f"sampler fps must be > 0, got {fps}")
        if policy not in POLICIES:
            raise ValueError(f"sampler policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if queue_size < 1:
            raise ValueError(f"sampler queue_size must be >= 1, got {queue_size}")
        self.source = source
        self.fps = float(fps)
        live = bool(getattr(source, "live", False))
        self.policy = ("latest" if live else "every") if policy == "auto" else policy
        self.queue_size = queue_size
        self.stats = SamplerStats()
        self._next_due: float | None = None
        self._index = 0

    def _due(self, frame: Frame) -> Frame | None:
        """The frame renumbered for the sampled stream if it is due, else None."""
        self.stats.frames_in += 1
        period = 1.0 / self.fps
        if self._next_due is not None and frame.pts + 1e-9 < self._next_due:
            self.stats.skipped += 1
            return None
        if self._next_due is None:
            self._next_due = frame.pts + period
        else:  # keep the grid: a late frame takes its slot, the next due time stays on schedule
            self._next_due += (max(0.0, (frame.pts - self._next_due) // period) + 1) * period
        out = Frame(index=self._index, pts=frame.pts, image=frame.image)
        self._index += 1
        return out

    def __aiter__(self) -> AsyncIterator[Frame]:
        return self._every() if self.policy == "every" else self._latest()

    async def _every(self) -> AsyncIterator[Frame]:
        async for frame in self.source:
            out = self._due(frame)
            if out is not None:
                self.stats.frames_out += 1
                yield out

    async def _latest(self) -> AsyncIterator[Frame]:
        buf: deque[Frame] = deque()
        ready = asyncio.Event()
        done = False

        async def reader() -> None:
            nonlocal done
            try:
                async for frame in self.source:
                    out = self._due(frame)
                    if out is None:
                        continue
                    if len(buf) >= self.queue_size:
                        buf.popleft()
                        self.stats.dropped += 1
                    buf.append(out)
                    ready.set()
            finally:
                done = True
                ready.set()

        task = asyncio.create_task(reader(), name="sampler-reader")
        try:
            while True:
                await ready.wait()
                ready.clear()
                while buf:
                    self.stats.frames_out += 1
                    yield buf.popleft()
                if done:
                    task.result()
                    return
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
