"""The rolling encoder: frame groups -> visual tokens -> the token memory, off the event loop.

Frames are grouped by the model's temporal patch (Qwen: 2 frames). Each group is prepared
(resized, normalised) on this camera's worker thread and goes through the vision tower by way of
the model's shared queue (stream/encode_scheduler.py), batched with the other cameras' groups;
`memory.add` then runs back on this camera's thread, so one camera's pruning never holds up
another's encoding. A family's per-token side features (Qwen3-VL's deepstack) go into the memory
with their group (`FrameTokens.extras`). While a batch is out, new groups wait in a short list;
the next call takes all of them, so falling behind costs bigger batches, not a growing queue.
Past `max_pending` the oldest waiting group is dropped and counted (live), or the frame reader
waits (files); a live group that waited past the camera's latency bound for the tower is
dropped there and counted the same way.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterable, Callable

from pruning import FrameTokens, TokenMemory

from .encode_scheduler import DROPPED, EncodeScheduler
from .types import Frame
from .vlm.base import VideoLM

log = logging.getLogger(__name__)


@dataclass
class EncoderStats:
    groups_encoded: int = 0
    groups_dropped: int = 0  # behind: past `max_pending`, or past the latency bound at the tower
    groups_failed: int = 0  # lost to an encode, prune or on_group error (ingest restarts)
    batches: int = 0
    encode_ms: float = 0.0  # per group, last batch
    prune_ms: float = 0.0  # per group, last batch
    backlog: int = 0  # groups waiting now
    max_backlog: int = 0
    encode_ms_total: float = 0.0
    prune_ms_total: float = 0.0
    newest_pts: float = -1.0  # pts of the newest group added to the memory
    latency_ms: float = 0.0  # from a group complete to it in memory, last group


class RollingEncoder:
    """Consumes sampled frames, keeps `memory` fed with encoded groups."""

    def __init__(self, vlm: VideoLM, memory: TokenMemory, max_batch: int = 8, max_pending: int = 16,
                 drop_when_behind: bool = True, on_group: Callable[[FrameTokens, list[Frame]], None] | None = None,
                 scheduler: EncodeScheduler | None = None, max_latency_s: float = 5.0, name: str = "camera"):
        self.vlm = vlm
        self._own_scheduler = scheduler is None  # alone on its model: it has the tower to itself
        self.scheduler = EncodeScheduler(vlm, max_batch) if scheduler is None else scheduler
        self.client = self.scheduler.client(name, max_latency_s if drop_when_behind else None)
        self.memory = memory
        self.group_size = vlm.group_size
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.drop_when_behind = drop_when_behind
        self.on_group = on_group  # called on the worker thread with each group and its frames once in memory
        self.reset_at_pts: float | None = None  # a reconnect: reset the pruner at the first group from here
        self.stats = EncoderStats()
        self._pending: deque[tuple[list[Frame], float]] = deque()  # a group and when it was complete
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")
        self._next_group = 0

    async def run(self, frames: AsyncIterable[Frame]) -> None:
        """Group frames and encode until the frame stream ends; then drain what waits. An error
        ends the call; calling it again (a restart) keeps the groups still waiting and the
        counters, and loses only the group being collected."""
        wake = asyncio.Event()
        space = asyncio.Event()
        space.set()
        finished = False

        async def collect() -> None:
            nonlocal finished
            group: list[Frame] = []
            try:
                async for frame in frames:
                    group.append(frame)
                    if len(group) == self.group_size:
                        await self._enqueue(group, space)
                        group = []
                        wake.set()
                if group:
                    await self._enqueue(group, space)
            finally:
                finished = True
                wake.set()

        collector = asyncio.create_task(collect(), name="encoder-collect")
        try:
            while True:
                await wake.wait()
                wake.clear()
                while self._pending:
                    batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
                    self.stats.backlog = len(self._pending)
                    space.set()
                    loop = asyncio.get_running_loop()
                    await loop.run_in_executor(self._executor, self._encode_batch, batch)
                if finished:
                    collector.result()
                    return
        finally:
            if not collector.done():
                collector.cancel()
                await asyncio.gather(collector, return_exceptions=True)

    async def _enqueue(self, group: list[Frame], space: asyncio.Event) -> None:
        if len(self._pending) >= self.max_pending:
            if self.drop_when_behind:
                self._pending.popleft()
                self.stats.groups_dropped += 1
            else:
                space.clear()
                while len(self._pending) >= self.max_pending:
                    await space.wait()
                    space.clear()
        self._pending.append((group, time.monotonic()))
        self.stats.backlog = len(self._pending)
        self.stats.max_backlog = max(self.stats.max_backlog, self.stats.backlog)

    def _encode_batch(self, batch: list[tuple[list[Frame], float]]) -> None:
        """Worker thread: encode a batch of groups and add them to the memory in order. Counters
        move per group, so a failure part-way (a pruner or `on_group` raising) leaves them true
        to the memory; the groups of the batch not yet added are lost and counted as failed."""
        s = self.stats
        done = pruned = 0  # groups of the batch dealt with (dropped or added), and added
        try:
            t0 = time.perf_counter()
            grids = self.scheduler.encode(self.client, [[f.image for f in g] for g, _ in batch], [t for _, t in batch])
            s.encode_ms = (time.perf_counter() - t0) * 1e3 / len(batch)
            s.batches += 1
            prune_ms = 0.0
            for (frames, ready), encoded in zip(batch, grids):
                if encoded is DROPPED:
                    done += 1
                    s.groups_dropped += 1
                    continue
                grid, extras = encoded if isinstance(encoded, tuple) else (encoded, {})
                reset_at = self.reset_at_pts
                if reset_at is not None and frames[0].pts >= reset_at:
                    self.memory.reset_stream()
                    self.reset_at_pts = None
                tokens = FrameTokens(index=self._next_group, pts=frames[0].pts, tokens=grid, extras=extras)
                res = self.memory.add(tokens)
                self._next_group += 1
                done += 1
                pruned += 1
                prune_ms += res.prune_ms
                s.groups_encoded += 1
                s.encode_ms_total += s.encode_ms
                s.prune_ms_total += res.prune_ms
                s.prune_ms = prune_ms / pruned
                s.newest_pts = frames[0].pts
                s.latency_ms = (time.monotonic() - ready) * 1e3
                if self.on_group is not None:
                    self.on_group(tokens, frames)
        except Exception:
            s.groups_failed += len(batch) - done
            raise

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._own_scheduler:
            self.scheduler.close()
