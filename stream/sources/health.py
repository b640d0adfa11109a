"""Stream health as data: the states a source moves through, its counters, and reconnect backoff.

States: `connecting` until the first frame; `streaming` while frames flow; `reconnecting` once a
stream that was flowing is lost (a live source keeps trying; a first connection that fails
stays `connecting`); `stopped` when closed or the stream ended; `failed` when the source gave
up (the reason is in `last_error`). `stopped` and `failed` are final: later transitions are
ignored, so a reader thread racing a `close()` cannot revive a source.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

CONNECTING = "connecting"
STREAMING = "streaming"
RECONNECTING = "reconnecting"
STOPPED = "stopped"
FAILED = "failed"
STATES = (CONNECTING, STREAMING, RECONNECTING, STOPPED, FAILED)
FINAL = (STOPPED, FAILED)

NEXT_STATES: dict[str, tuple[str, ...]] = {
    CONNECTING: (STREAMING, STOPPED, FAILED),
    STREAMING: (RECONNECTING, STOPPED, FAILED),
    RECONNECTING: (STREAMING, STOPPED, FAILED),
    STOPPED: (),
    FAILED: (),
}


@dataclass
class SourceStats:
    """Counters of one source, written by its reader and read by anyone (plain ints and floats).

    `errors` counts every outside-world error survived (damaged packets, lost or refused
    connections); `decode_errors` the damaged packets among them; `reconnects` the connection
    attempts after the first, counted as each one starts. `position_s` is the pts of the newest
    frame. `stream_start_pts` is the pts of the first frame since the latest (re)connection:
    groups from that pts on have no predecessor in the stream.
    """

    state: str = CONNECTING
    frames: int = 0
    errors: int = 0
    decode_errors: int = 0
    reconnects: int = 0
    size_changes: int = 0
    last_error: str | None = None
    last_frame_at: float | None = None  # time.monotonic() of the newest frame handed out
    size: tuple[int, int] | None = None  # (width, height) of the newest frame
    position_s: float | None = None
    stream_start_pts: float | None = None

    def last_frame_age_s(self, now: float | None = None) -> float | None:
        if self.last_frame_at is None:
            return None
        return (time.monotonic() if now is None else now) - self.last_frame_at

    def as_dict(self) -> dict:
        """A JSON-ready copy for status records and state events."""
        age = self.last_frame_age_s()
        return {
            "state": self.state,
            "frames": self.frames,
            "errors": self.errors,
            "decode_errors": self.decode_errors,
            "reconnects": self.reconnects,
            "size_changes": self.size_changes,
            "last_error": self.last_error,
            "last_frame_age_s": None if age is None else round(age, 3),
            "size": None if self.size is None else list(self.size),
            "position_s": self.position_s,
            "stream_start_pts": self.stream_start_pts,
        }


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter: attempt n (from 1) waits
    `min(max_s, initial_s * factor**(n-1))` less a random fraction up to `jitter` of it, so
    cameras dropped together do not all knock again at the same instant."""

    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (0 < self.initial_s <= self.max_s):
            raise ValueError(f"backoff needs 0 < initial_s <= max_s, got {self.initial_s}, {self.max_s}")
        if not self.factor >= 1:
            raise ValueError(f"backoff factor must be >= 1, got {self.factor}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), got {self.jitter}")

    def ceiling(self, attempt: int) -> float:
        """The delay before attempt `attempt` (>= 1) without jitter."""
        if attempt < 1:
            raise ValueError(f"attempt counts from 1, got {attempt}")
        delay = self.initial_s
        for _ in range(attempt - 1):
            delay *= self.factor
            if delay >= self.max_s:
                return self.max_s
        return min(delay, self.max_s)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The delay before attempt `attempt`, in ((1 - jitter) * ceiling, ceiling]."""
        draw = (rng or random).random()
        return self.ceiling(attempt) * (1.0 - self.jitter * draw)
