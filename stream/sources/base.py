"""What every frame source shares: single-pass async iteration, health, pacing, a reader thread,
and the reconnect loop of live sources.

A source is a camera-like stream: iterated once (`async for frame in source`), frames numbered
0, 1, 2, ... by the base class so `index` is monotonic whatever the subclass does (reconnects,
loops). Slow work (decoding, rendering) runs in one reader thread per source that hands results
to the event loop with `loop.call_soon_threadsafe`; a semaphore bounds how far it reads ahead.

Health (`stats`, `state`) is plain data, current whenever it is read; each state change is
logged and handed to the optional `on_state(source_name, old, new, stats_dict)` callback on the
event loop (an async callback is run as a task), in the order the changes happened.

Each kind's settings are a frozen `SourceConfig` dataclass in its own module, validated from
TOML by the registry (stream/sources/registry.py); the live kinds share `LiveConfig`.
"""
from __future__ import annotations

import abc
import asyncio
import contextlib
import inspect
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np

from ..errors import ConfigError, SourceError
from ..types import Frame
from ..validation import bounded
from .health import CONNECTING, FAILED, FINAL, NEXT_STATES, RECONNECTING, STOPPED, STREAMING, Backoff, SourceStats

log = logging.getLogger(__name__)

T = TypeVar("T")
_END = object()
StateCallback = Callable[[str, str, str, dict], Awaitable[None] | None]


class Disconnected(Exception):
    """A live connection failed or ended; the source will reconnect."""


class StopFlag(threading.Event):
    """A threading.Event that also calls back when set, so a consumer waiting on the event
    loop can leave at once instead of after the reader's current (maybe blocked) read."""

    def __init__(self) -> None:
        super().__init__()
        self._callbacks: list[Callable[[], None]] = []
        self._callbacks_lock = threading.Lock()

    def set(self) -> None:
        super().set()
        with self._callbacks_lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback()

    def on_set(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (in the setting thread) when set; returns the function that unregisters it."""
        with self._callbacks_lock:
            self._callbacks.append(callback)

        def remove() -> None:
            with self._callbacks_lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return remove


@dataclass(frozen=True)
class SourceConfig:
    """One source's settings; each kind subclasses it with its own fields and `kind` choice."""

    kind: str = ""

    def check(self) -> None:
        """Rules across fields; a violation is a `ConfigError` whose path is the field's name."""


@dataclass(frozen=True)
class LiveConfig(SourceConfig):
    """The connection settings every `LiveSource` kind shares."""

    open_timeout_s: float = bounded(5.0, 0.1, 600)
    stall_timeout_s: float = bounded(5.0, 0.1, 3600)  # no frame this long = lost
    max_reconnects: int = bounded(-1, -1, 10**9)  # failed attempts in a row; -1 = forever
    reconnect_initial_s: float = bounded(0.5, 0.01, 3600)  # first backoff delay
    reconnect_max_s: float = bounded(30.0, 0.01, 86400)  # backoff cap

    def check(self) -> None:
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ConfigError("must be >= reconnect_initial_s", "reconnect_max_s")

    def connection(self) -> dict[str, Any]:
        """These settings as `LiveSource` keyword arguments."""
        return {
            "open_timeout_s": self.open_timeout_s,
            "stall_timeout_s": self.stall_timeout_s,
            "max_reconnects": None if self.max_reconnects < 0 else self.max_reconnects,
            "backoff": Backoff(self.reconnect_initial_s, self.reconnect_max_s),
        }


class Source(abc.ABC):
    """An async iterator of `Frame`. `live` tells the sampler to keep only the newest frame.

    A kind the registry builds names its settings class in `config_class` and builds itself
    from them in `from_config`.
    """

    config_class: ClassVar[type[SourceConfig]]

    def __init__(self, name: str, live: bool = False, on_state: StateCallback | None = None):
        self.name = name
        self.live = live
        self.on_state = on_state
        self.stats = SourceStats()
        self._stop = StopFlag()
        self._started = False
        self._state_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()

    @abc.abstractmethod
    def _produce(self) -> AsyncIterator[tuple[float, np.ndarray]]:
        """(pts seconds, H x W x 3 uint8 RGB image) pairs until the stream ends or `closed`."""

    @classmethod
    def from_config(cls, cfg: Any, name: str) -> Source:
        """The source `cfg` (a `config_class` instance) describes, called `name`."""
        raise NotImplementedError(f"{cls.__name__} has no config")

    @property
    def state(self) -> str:
        return self.stats.state

    def health(self) -> dict:
        """Counters and state as a JSON-ready dict (subclasses add what they know)."""
        return self.stats.as_dict()

    def __aiter__(self) -> AsyncIterator[Frame]:
        if self._started:
            raise RuntimeError(f"source {self.name!r} is a single stream and was already iterated")
        self._started = True
        return self._frames()

    async def _frames(self) -> AsyncIterator[Frame]:
        self._loop = asyncio.get_running_loop()
        try:
            async with contextlib.aclosing(self._produce()) as items:
                async for pts, image in items:
                    if self.closed:
                        return
                    self._count(pts, image)
                    frame = Frame(self.stats.frames, pts, image)
                    self.stats.frames += 1
                    yield frame
        except Exception as exc:
            self.stats.last_error = str(exc)
            self._set_state(FAILED)
            raise
        finally:
            self.close()

    def _count(self, pts: float, image: np.ndarray) -> None:
        s = self.stats
        s.last_frame_at = time.monotonic()
        s.position_s = pts
        size = (image.shape[1], image.shape[0])
        if s.size is not None and size != s.size:
            s.size_changes += 1
            log.info("%s: frame size changed from %dx%d to %dx%d", self.name, *s.size, *size)
        s.size = size
        if s.state == CONNECTING:  # live sources announce streaming themselves, before the frame
            s.stream_start_pts = pts
            self._set_state(STREAMING)

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        """Stop producing; safe to call from any thread, any number of times."""
        self._stop.set()
        self._set_state(STOPPED)

    def record_error(self, message: str) -> None:
        """Count and log an outside-world error the source survived."""
        self.stats.errors += 1
        self.stats.last_error = message
        log.warning("%s: %s", self.name, message)

    def record_decode_error(self, message: str) -> None:
        """Count a damaged packet (skipped, or decoded as FFmpeg does by default)."""
        self.stats.decode_errors += 1
        self.record_error(message)

    def _set_state(self, new: str) -> None:
        """Move to `new` (from any thread) and dispatch the event; final states absorb."""
        with self._state_lock:
            old = self.stats.state
            if old == new or old in FINAL:
                return
            if new not in NEXT_STATES[old]:
                raise RuntimeError(f"source {self.name!r}: no transition from {old} to {new}")
            self.stats.state = new
            snapshot = self.health()
        log.info("%s: %s -> %s", self.name, old, new)
        if self.on_state is None:
            return
        loop = self._loop
        if loop is None:
            with contextlib.suppress(RuntimeError):
                loop = asyncio.get_running_loop()
        if loop is None:
            self._dispatch(old, new, snapshot)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            loop.call_soon_threadsafe(self._dispatch, old, new, snapshot)

    def _dispatch(self, old: str, new: str, snapshot: dict) -> None:
        if self.on_state is None:
            return
        result: Any = self.on_state(self.name, old, new, snapshot)
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def __aenter__(self) -> Source:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class LiveSource(Source):
    """A camera: connect, stream, and on any end or error reconnect with backoff, forever or
    until `max_reconnects` attempts in a row brought no frame (then `failed`, SourceError).

    pts is wall-clock seconds since iteration started, strictly increasing across reconnects.
    A connection that yields no frame for `stall_timeout_s` counts as lost; subclasses also set
    their I/O timeouts from it, because a frozen peer blocks inside a read where no check runs.
    """

    def __init__(
        self,
        name: str,
        stall_timeout_s: float = 5.0,
        max_reconnects: int | None = None,
        backoff: Backoff | None = None,
        on_state: StateCallback | None = None,
    ):
        if not stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be > 0, got {stall_timeout_s}")
        if max_reconnects is not None and max_reconnects < 0:
            raise ValueError(f"max_reconnects must be >= 0 or None (forever), got {max_reconnects}")
        super().__init__(name, live=True, on_state=on_state)
        self.stall_timeout_s = stall_timeout_s
        self.max_reconnects = max_reconnects
        self.backoff = backoff or Backoff()

    @abc.abstractmethod
    def _connect(self) -> Generator[np.ndarray | None, None, None]:
        """One connection, run in the reader thread: open, then yield an RGB image per frame or
        None when something arrived without a frame (the first None means connected). Raise
        `Disconnected` on outside-world failures; return when the stream ends."""

    async def _produce(self) -> AsyncIterator[tuple[float, np.ndarray]]:
        async for item in iterate_in_thread(self._connections, self._stop, self.name):
            yield item

    def _connections(self) -> Generator[tuple[float, np.ndarray], None, None]:
        """The reader thread: connections one after another, frames stamped with wall-clock pts."""
        start = time.monotonic()
        last_pts = -math.inf
        failures = 0  # connection attempts in a row that brought no frame
        while not self.closed:
            got = 0
            try:
                with contextlib.closing(self._connect()) as images:
                    alive: float | None = None  # last frame, or the moment of connecting
                    for image in images:
                        now = time.monotonic()
                        if image is None:
                            if alive is None:
                                alive = now
                            elif now - alive > self.stall_timeout_s:
                                raise Disconnected(f"stalled: no frame for {now - alive:.1f} s")
                            continue
                        pts = max(now - start, last_pts + 1e-6)
                        last_pts = pts
                        got += 1
                        if got == 1:  # stamped here too, so the `streaming` event shows the outage over
                            self.stats.stream_start_pts = pts
                            self.stats.last_frame_at, self.stats.position_s = now, pts
                            self._set_state(STREAMING)
                        yield pts, image
                        alive = time.monotonic()  # time spent waiting for the consumer is no stall
                        if self.closed:
                            return
                reason = "the stream ended"
            except Disconnected as exc:
                reason = str(exc)
            if self.closed:
                return
            failures = 1 if got else failures + 1
            self.record_error(reason)
            if self.stats.state == STREAMING:
                self._set_state(RECONNECTING)
            if self.max_reconnects is not None and failures > self.max_reconnects:
                raise SourceError(
                    f"{self.name}: gave up after {failures} connection attempt(s) in a row without a frame"
                    f" (max_reconnects={self.max_reconnects}); last error: {reason}"
                )
            delay = self.backoff.delay(failures)
            log.info("%s: reconnecting in %.2f s (attempt %d)", self.name, delay, failures)
            if self._stop.wait(delay):
                return
            self.stats.reconnects += 1


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
    make: Callable[[], Generator[T, None, None]], stop: StopFlag, name: str, ahead: int = 4
) -> AsyncIterator[T]:
    """Run the generator `make()` in its own thread, at most `ahead` items before the consumer.

    The generator is created, advanced and closed in that thread (so e.g. a PyAV container never
    changes threads). Its exceptions are re-raised here. Setting `stop` ends the iteration here
    at once and the thread after the item it is producing (a read blocked on a frozen peer
    returns at its timeout); so does leaving the loop.
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
    unregister = stop.on_set(lambda: post("end", None))
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
        unregister()
        stop.set()
