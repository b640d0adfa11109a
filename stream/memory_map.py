"""The torch-free view of a memory for sinks and front doors: `TokenMemory.layout()` as numpy."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .camera_api import MemoryMap

if TYPE_CHECKING:
    from pruning import TokenMemory


def memory_map(memory: TokenMemory) -> MemoryMap:
    """Where the memory's held tokens come from, copied under its lock; no token vectors."""
    lay = memory.layout()
    return MemoryMap(
        group=lay.group.numpy(), pts=lay.pts.numpy(), row=lay.row.numpy(), col=lay.col.numpy(),
        grid=lay.grid, tokens_seen=lay.tokens_seen, groups_seen=lay.groups_seen,
    )
