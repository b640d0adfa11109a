"""What every frame source shares: single-pass async iteration, counters, pacing, a reader thread.

A source is a camera-like stream: iterated once (`async for frame in source`), frames numbered
0, 1, 2, ... by the base class so `index` is monotonic whatever the subclass does (reconnects,
loops). Slow work (decoding, rendering) runs in one reader thread per source that hands results
to the event loop with `loop.call_soon_threadsafe`; a semaphore bounds how far it reads ahead.
"""
from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from ..types import Frame

log = logging.getLogger(__name__)

T = TypeVar("T")
_END = object()


class SourceError(RuntimeError):
    """A source cannot produce frames at all (unreadable container, no video stream)."""


@dataclass
class SourceStats:
    """Plain counters; live sources extend this with health state."""

    frames: int = 0
    errors: int = 0
    last_error: str | None = None


class Source(abc.ABC):
    """An async iterator of `Frame`. `live` tells the sampler to keep only the newest frame."""

    def __init__(self, name: str, live: bool = False):
        self.name = name
        self.live = live
        self.stats = SourceStats()
        self._stop = threading.Event()
        self._started = False

    @abc.abstractmethod
    def _produce(self) -> AsyncIterator[tuple[float, np.ndarray]]:
        """(pts seconds, H x W x 3 uint8 RGB image) pairs until the stream ends or `closed`."""

    def __aiter__(self) -> AsyncIterator[Frame]:
        if self._started:
            raise RuntimeError(f"source {self.name!r} is a single stream and was already iterated")
        self._started = True
        return self._frames()

    async def _frames(self) -> AsyncIterator[Frame]:
        try:
            async with contextlib.aclosing(self._produce()) as items:
                async for pts, image in items:
                    if self.closed:
                        return
                    frame = Frame(self.stats.frames, pts, image)
                    self.stats.frames += 1
                    yield frame
        finally:
            self.close()

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        """Stop producing; safe to call from any thread, any number of times."""
        self._stop.set()

    def record_error(self, message: str) -> None:
        """Count and log an outside-world error the source survived."""
        self.stats.errors += 1
        self.stats.last_error = message
        log.warning("%s: %s", self.name, message)

    async def __aenter__(self) -> Source:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Pacer:
    """Holds items back so media time advances at `speed` x wall clock from the first item.

    Late items go out at once and the schedule is not shifted, so the average rate holds.
    """

    def __init__(self, speed: float = 1.0):
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.speed = speed
        self._origin: tuple[float, float] | None = None

    async def wait(self, pts: float) -> None:
        now = time.monotonic()
        if self._origin is None:
            self._origin = (now, pts)
            return
        wall0, pts0 = self._origin
        delay = wall0 + (pts - pts0) / self.speed - now
        if delay > 0:
            await asyncio.sleep(delay)


async def iterate_in_thread(
    make: Callable[[], Generator[T, None, None]], stop: threading.Event, name: str, ahead: int = 4
) -> AsyncIterator[T]:
    """Run the generator `make()` in its own thread, at most `ahead` items before the consumer.

    The generator is created, advanced and closed in that thread (so e.g. a PyAV container never
    changes threads). Its exceptions are re-raised here. Setting `stop` (or leaving the loop)
    ends the thread after the item it is producing.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
    slots = threading.Semaphore(ahead)

    def post(kind: str, value: object) -> bool:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:
            return False
        return True

    def run() -> None:
        try:
            with contextlib.closing(make()) as items:
                while not stop.is_set():
                    if not slots.acquire(timeout=0.05):
                        continue
                    item = next(items, _END)
                    if item is _END or not post("item", item):
                        break
        except BaseException as exc:  # handed to the consumer, which re-raises it
            post("error", exc)
        finally:
            post("end", None)

    thread = threading.Thread(target=run, name=f"source:{name}", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = await queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise value  # type: ignore[misc]
            slots.release()
            yield value  # type: ignore[misc]
    finally:
        stop.set()

