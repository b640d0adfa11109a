"""Baseline pruners every seed pruner is compared with (PRUNERS.md, "Baselines")."""
from __future__ import annotations

import torch

from .base import GroupScore, Pruner, TokenSet
from .types import FrameTokens


class Recent(Pruner):
    """A sliding window: the newest groups that fit. Scores are the group index, so eviction
    (highest score kept) drops the oldest tokens first."""

    name = "recent"

    def score(self, group: FrameTokens) -> GroupScore:
        h, w = group.grid
        return GroupScore(score=torch.full((h * w,), float(group.index)))

    def evict(self, store: TokenSet, capacity: int) -> torch.Tensor:
        return torch.arange(max(0, len(store) - capacity), len(store))
