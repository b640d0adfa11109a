"""Scene changes: a group whose mean token has cosine < `threshold` to the previous group's mean
(MoPrune's boundary rule, "MoPrune", Sec. 3.3), whatever pruner the memory uses."""
from __future__ import annotations

import torch

from pruning.similarity import cos


class SceneDetector:
    def __init__(self, threshold: float = 0.8):
        self.threshold = threshold
        self._prev: torch.Tensor | None = None

    def update(self, tokens: torch.Tensor) -> bool:
        """True when this group starts a new scene (never for the first group)."""
        mean = tokens.reshape(-1, tokens.shape[-1]).float().mean(0)
        changed = self._prev is not None and float(cos(mean, self._prev)) < self.threshold
        self._prev = mean
        return changed

    def reset(self) -> None:
        self._prev = None
