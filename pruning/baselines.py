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

    The stride lives on the host, so the memory reads nothing back for a group: one on it enters
    with no keep-mask, one off it keeps none, and says so (`kept`). Eviction reads back once, a
    pair: the new stride and how many rows it keeps depend on the groups the store holds, which
    only the device knows.
    """

    name = "uniform"
    paper = "baseline: whole groups at an even stride"

    def __init__(self) -> None:
        self._origin: int | None = None
        self._level = 0  # the stride is 2 ** level

    def score(self, group: FrameTokens) -> GroupScore:
        h, w = group.grid
        if self._origin is None:
            self._origin = group.index
        offset = group.index - self._origin
        level = (offset & -offset).bit_length() - 1 if offset > 0 else _ORIGIN_LEVEL
        score = torch.full((h * w,), float(level))
        if offset % (1 << self._level) == 0:
            return GroupScore(score=score)
        return GroupScore(score=score, keep=torch.zeros(h * w, dtype=torch.bool), kept=0)

    def evict(self, store: TokenSet, capacity: int) -> torch.Tensor:
        """The least stride from the current one at which the groups on it fit, or only one is
        left, found for every stride at once: each row's level (the trailing zero bits of its
        offset; it is on stride 2^L when its level is at least L) and, per level, the rows at
        or above it and the least and greatest group among them."""
        levels = _ORIGIN_LEVEL + 1
        offset = store.group - (self._origin or 0)
        level = torch.where(offset == 0, _ORIGIN_LEVEL, torch.frexp((offset & -offset).double()).exponent.long() - 1)
        rows = torch.zeros(levels, dtype=torch.long).index_add_(0, level, torch.ones_like(level))
        top = torch.full((levels,), -(1 << 62)).scatter_reduce(0, level, store.group, "amax")
        low = torch.full((levels,), 1 << 62).scatter_reduce(0, level, store.group, "amin")
        rows = rows.flip(0).cumsum(0).flip(0)
        top = top.flip(0).cummax(0).values.flip(0)
        low = low.flip(0).cummin(0).values.flip(0)
        steps = torch.arange(levels)
        fits = ((rows <= capacity) | (top <= low)) & (steps >= self._level)
        new_level = torch.where(fits, steps, levels).amin()
        kept = torch.where(steps == new_level, rows, 0).sum().clamp_max(capacity)
        self._level, count = torch.stack([new_level, kept]).tolist()
        return torch.nonzero_static(level >= self._level, size=count).flatten()


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
