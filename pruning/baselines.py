"""Baseline pruners every seed pruner is compared with (docs/PRUNERS.md, "Baselines"):
`uniform` and `recent` keep whole groups by time, `dtd` drops static tokens as TimeChat-Online's
differential token drop does, `random` keeps a uniform sample."""
from __future__ import annotations

from typing import ClassVar

import torch

from .base import GroupScore, ParamRange, Pruner, TokenSet, check_params
from .similarity import normalize
from .types import FrameTokens

_ORIGIN_LEVEL = 63


class Recent(Pruner):
    """A sliding window: the newest groups that fit. Scores are the group index, so eviction
    (highest score kept) drops the oldest tokens first."""

    name = "recent"
    paper = "baseline: a sliding window of the newest groups"

    def score(self, group: FrameTokens) -> GroupScore:
        h, w = group.grid
        return GroupScore(score=torch.full((h * w,), float(group.index)))

    def evict(self, store: TokenSet, capacity: int) -> torch.Tensor:
        return torch.arange(max(0, len(store) - capacity), len(store))


class Uniform(Pruner):
    """Whole groups at an even stride over the history, counted from the first group seen.

    A group enters the store only if its offset is a multiple of the stride; when the store
    is over capacity the stride doubles, which drops every other group held. Groups already in
    the recent window when the stride doubles keep their ingest decision and are thinned at the
    next eviction. If even one group exceeds capacity, its first `capacity` tokens are kept.
    The score is the stride level of the group (trailing zero bits of its offset), so a query
    budget smaller than the store still spreads evenly: coarsest stride first.
    """

    name = "uniform"
    paper = "baseline: whole groups at an even stride"

    def __init__(self) -> None:
        self._origin: int | None = None
        self._stride = 1

    def score(self, group: FrameTokens) -> GroupScore:
        h, w = group.grid
        if self._origin is None:
            self._origin = group.index
        offset = group.index - self._origin
        level = (offset & -offset).bit_length() - 1 if offset > 0 else _ORIGIN_LEVEL
        keep = torch.full((h * w,), offset % self._stride == 0)
        return GroupScore(score=torch.full((h * w,), float(level)), keep=keep)

    def evict(self, store: TokenSet, capacity: int) -> torch.Tensor:
        offset = store.group - (self._origin or 0)
        while True:
            on = offset % self._stride == 0
            if int(on.sum()) <= capacity or torch.unique(store.group[on]).numel() <= 1:
                break
            self._stride *= 2
        return torch.nonzero(on).flatten()[:capacity]


class DTD(Pruner):
    """TimeChat-Online's differential token drop: a token whose cosine to the same position in
    the previous group exceeds `threshold` is dropped when it leaves the recent window; the
    first group (and the first after `reset()` or a change of grid) is kept whole. Scores are
    the group index, so eviction over capacity drops the oldest tokens first."""

    name = "dtd"
    paper = "baseline: TimeChat-Online's differential token drop"
    param_ranges: ClassVar[dict[str, ParamRange]] = {"threshold": (-1.0, 1.0)}

    def __init__(self, *, threshold: float = 0.5):
        check_params(DTD, threshold=threshold)
        self.threshold = float(threshold)
        self._prev: torch.Tensor | None = None

    def reset(self) -> None:
        self._prev = None

    def score(self, group: FrameTokens) -> GroupScore:
        h, w = group.grid
        cur = normalize(group.tokens.reshape(h * w, -1))  # kept normalised: one pass per group
        if self._prev is None or self._prev.shape != cur.shape:
            keep = torch.ones(h * w, dtype=torch.bool)
        else:
            keep = (cur * self._prev).sum(-1) <= self.threshold
        self._prev = cur
        return GroupScore(score=torch.full((h * w,), float(group.index)), keep=keep)

    def evict(self, store: TokenSet, capacity: int) -> torch.Tensor:
        return torch.arange(max(0, len(store) - capacity), len(store))


class Random(Pruner):
    """Reservoir sampling over tokens: each token draws a uniform key from a seeded generator
    and the store keeps the largest keys, a uniform sample of every token that reached it.
    Query ranking by key draws a uniform sample of the store too."""

    name = "random"
    paper = "baseline: a uniform random sample of tokens"
    param_ranges: ClassVar[dict[str, ParamRange]] = {"seed": (-(2**63), 2**64 - 1)}  # what torch's manual_seed takes

    def __init__(self, *, seed: int = 0):
        check_params(Random, seed=seed)
        self.seed = int(seed)
        self._gen = torch.Generator().manual_seed(self.seed)

    def score(self, group: FrameTokens) -> GroupScore:
        h, w = group.grid
        return GroupScore(score=torch.rand(h * w, generator=self._gen))
