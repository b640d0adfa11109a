"""What front doors and sinks may use of a camera: the one door for questions, its live status,
its watches, its newest frame and a torch-free map of what its memory holds."""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Protocol

import numpy as np

from .events import Answer, Question, Status
from .watches import Watches


@dataclass(frozen=True)
class MemoryMap:
    """Where the memory's tokens come from, as numpy: one entry per held token, sorted by
    (group, row, col); `grid` is the (H, W) token grid of a group."""

    group: np.ndarray  # int64 [n]
    pts: np.ndarray  # float64 [n]
    row: np.ndarray  # int64 [n]
    col: np.ndarray  # int64 [n]
    grid: tuple[int, int]
    tokens_seen: int
    groups_seen: int


class CameraService(Protocol):
    name: str
    model: str  # the model answering (a hub id or a path), for front doors that show it
    watches: Watches

    async def ask(self, question: Question, on_text: Callable[[str], None] | None = None) -> Answer:
        """Answer from the memory as it is now; raises RequestError when it will not."""
        ...

    def status(self) -> Status: ...

    def latest_jpeg(self) -> bytes | None: ...

    def memory_map(self) -> MemoryMap: ...
