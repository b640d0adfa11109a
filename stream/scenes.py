"""Scene changes: a group whose mean token has cosine < `threshold` to the previous group's mean
(MoPrune's boundary rule, "MoPrune", Sec. 3.3), whatever pruner the memory uses.

The cosine is computed where the tokens are (the model's device) and read back late
(`pruning.host_sync.HostCopy`), so the camera's thread never waits for the GPU per group: a group's
verdict is reported by the first `update` that finds it arrived, in group order. On the CPU that
is the group's own `update`; on a GPU usually the next group's.
"""
from __future__ import annotations

from collections import deque

import torch

from pruning.host_sync import HostCopy
from pruning.similarity import cos
from pruning.types import FrameTokens


class SceneDetector:
    def __init__(self, threshold: float = 0.8):
        self.threshold = threshold
        self._prev: torch.Tensor | None = None
        self._pending: deque[tuple[int, float, HostCopy]] = deque()

    def update(self, group: FrameTokens) -> list[tuple[int, float]]:
        """Take a new group; return (index, pts) of each group now known to start a new scene
        (never the first group), oldest first."""
        tokens = group.tokens
        mean = tokens.reshape(-1, tokens.shape[-1]).float().mean(0)
        if self._prev is not None:
            self._pending.append((group.index, group.pts, HostCopy(cos(mean, self._prev) < self.threshold)))
        self._prev = mean
        changed = []
        while self._pending and self._pending[0][2].ready():
            index, pts, cut = self._pending.popleft()
            if cut.tolist():
                changed.append((index, pts))
        return changed
