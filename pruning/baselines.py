"""Baseline pruners every seed pruner is compared with (docs/PRUNERS.md, "Baselines"):
`uniform` and `recent` keep whole groups by time, `dtd` drops static tokens as TimeChat-Online's
differential token drop does, `random` keeps a uniform sample."""
from __future__ import annotations

import itertools
from collections import deque
from typing import ClassVar

import torch

from .base import GroupScore, ParamRange, Pruner, TokenSet, check_params
from .host_sync import to_device
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

    Everything it decides from lives on the host, so the memory reads nothing back for it: a
    group on the stride enters with no keep-mask, one off it keeps none and says so (`kept`),
    and eviction works from a host-side list of the groups the store holds (level and rows,
    in store order). Whole groups of sizes known at ingest enter and leave, and the memory moves
    them into the store in the order they were scored, so the list is the groups admitted, up
    to the store's length; the device checks it against the store's group column.
    """

    name = "uniform"
    paper = "baseline: whole groups at an even stride"

    def __init__(self) -> None:
        self._origin: int | None = None
        self._level = 0  # the stride is 2 ** level
        self._admitted: deque[tuple[int, int, int]] = deque()  # (group, level, rows), not yet in the store
        self._held: list[tuple[int, int, int]] = []  # the same for the groups the store holds, in its order

    def score(self, group: FrameTokens) -> GroupScore:
        h, w = group.grid
        if self._origin is None:
            self._origin = group.index
        offset = group.index - self._origin
        level = (offset & -offset).bit_length() - 1 if offset > 0 else _ORIGIN_LEVEL
        score = torch.full((h * w,), float(level))
        if offset % (1 << self._level) == 0:
            self._admitted.append((group.index, level, h * w))
            return GroupScore(score=score)
        return GroupScore(score=score, keep=torch.zeros(h * w, dtype=torch.bool), kept=0)

    def evict(self, store: TokenSet, capacity: int) -> torch.Tensor:
        """The least stride from the current one at which the groups on it fit, or only one is
        left; the store keeps their rows (at most `capacity`)."""
        held = self._holding(store)
        level = self._level
        while level < _ORIGIN_LEVEL:
            on = [g for g in held if g[1] >= level]
            if sum(g[2] for g in on) <= capacity or len(on) <= 1:
                break
            level += 1
        self._level = level
        keep, self._held, start = [], [], 0
        for group, lv, n in held:
            take = min(n, capacity - len(keep)) if lv >= level else 0
            if take:
                keep += range(start, start + take)
                self._held.append((group, lv, take))
            start += n
        return to_device(_host(keep), store.group.device)

    def _holding(self, store: TokenSet) -> list[tuple[int, int, int]]:
        """The groups the store holds: those held after the last eviction, then the admitted
        ones that have reached it since (as many as its length says)."""
        n = sum(g[2] for g in self._held)
        while n < len(store) and self._admitted:
            self._held.append(self._admitted.popleft())
            n += self._held[-1][2]
        if n != len(store):
            raise RuntimeError(f"uniform: the store holds {len(store)} rows, the groups it admitted {n}")
        if self._held:
            device = store.group.device
            starts = to_device(_host(itertools.accumulate((g[2] for g in self._held[:-1]), initial=0)), device)
            ids = to_device(_host(g[0] for g in self._held), device)
            torch._assert_async((store.group.index_select(0, starts) == ids).all(),
                                "uniform: the store's groups are not the ones it admitted")
        return self._held


def _host(values) -> torch.Tensor:
    """Python ints as a long tensor on the host, outside any device context (the memory's)."""
    return torch.tensor(list(values), dtype=torch.long, device="cpu")


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
