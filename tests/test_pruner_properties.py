"""Properties every registered pruner must have, through TokenMemory: causality, the memory
bound, determinism, no NaN on degenerate input, and well-formed query rankings.

Runs over every name in `pruning.PRUNERS`; a pruner whose module is not written yet is skipped
(only that: any other import error fails at collection)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pruning import PRUNERS, TokenMemory, TokenSet, get_pruner
from pruning.base import GroupScore
from pruning.types import FrameTokens

KINDS = ["random", "equal", "zeros", "static", "some_zero", "alternating", "tiny"]


def available(name: str) -> bool:
    module = PRUNERS[name].split(":")[0]
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name == module:
            return False
        raise
    return True


NAMES = [pytest.param(n, marks=pytest.mark.skipif(not available(n), reason=f"{PRUNERS[n]} not written yet"))
         for n in PRUNERS]


@dataclass
class Stream:
    video: torch.Tensor  # [T, H, W, D]
    index: list[int]
    capacity: int
    recent: int
    extras: bool

    def frames(self) -> list[FrameTokens]:
        out = []
        for k in range(self.video.shape[0]):
            extras = {"deep": self.video[k].unsqueeze(0).repeat(2, 1, 1, 1) * 0.5} if self.extras else {}
            out.append(FrameTokens(self.index[k], 0.5 * self.index[k], self.video[k], extras))
        return out


def make_video(kind: str, t: int, h: int, w: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, w, d, generator=g)
    if kind == "equal":
        return x[0, 0, 0].expand(t, h, w, d).clone()
    if kind == "zeros":
        return torch.zeros(t, h, w, d)
    if kind == "static":
        return x[:1].expand(t, h, w, d).clone()
    if kind == "some_zero":
        return x * (torch.rand(t, h, w, 1, generator=g) > 0.4)
    if kind == "alternating":
        return x[:2].repeat(t, 1, 1, 1)[:t].clone()
    if kind == "tiny":
        return x * 1e-8
    return x


@st.composite
def streams(draw, max_groups: int = 12) -> Stream:
    h, w = draw(st.integers(2, 4)), draw(st.integers(2, 4))
    d, t = draw(st.integers(4, 16)), draw(st.integers(1, max_groups))
    video = make_video(draw(st.sampled_from(KINDS)), t, h, w, d, draw(st.integers(0, 2**16)))
    start = draw(st.integers(0, 5))
    steps = draw(st.lists(st.integers(1, 2), min_size=t, max_size=t))
    index = [start + sum(steps[:k]) for k in range(t)]
    capacity = draw(st.sampled_from([0, 1, h * w // 2, h * w, 2 * h * w + 1, 4 * h * w, t * h * w]))
    return Stream(video, index, capacity, draw(st.integers(0, 3)), draw(st.booleans()))


@dataclass
class Run:
    pruner: object
    mem: TokenMemory
    scores: list[GroupScore]
    snaps: list[TokenSet]


def run(name: str, stream: Stream, frames: list[FrameTokens] | None = None) -> Run:
    """Feed a fresh pruner through TokenMemory, recording each GroupScore and snapshot."""
    pruner = get_pruner(name)
    scores: list[GroupScore] = []
    score = pruner.score

    def recording(group: FrameTokens) -> GroupScore:
        scores.append(score(group))
        return scores[-1]

    pruner.score = recording
    mem = TokenMemory(capacity=stream.capacity, pruner=pruner, recent_groups=stream.recent)
    _, h, w, _ = stream.video.shape
    snaps = []
    for frame in frames or stream.frames():
        mem.add(frame)
        assert len(mem) <= stream.capacity + stream.recent * h * w
        snaps.append(mem.snapshot())
    return Run(pruner, mem, scores, snaps)


def finite(x: torch.Tensor) -> bool:
    return not x.is_floating_point() or not bool(torch.isnan(x).any())


def assert_no_nan(snap: TokenSet) -> None:
    for field in (snap.tokens, snap.pts, snap.score):
        assert finite(field)
    for v in [*snap.meta.values(), *snap.extras.values()]:
        assert finite(v)


def same_score(a: GroupScore, b: GroupScore) -> bool:
    def eq(x, y):
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))

    return (eq(a.score, b.score) and eq(a.keep, b.keep) and eq(a.merge_into, b.merge_into)
            and a.meta.keys() == b.meta.keys() and all(torch.equal(a.meta[k], b.meta[k]) for k in a.meta))


def same_snapshot(a: TokenSet, b: TokenSet) -> bool:
    cols = ("tokens", "group", "pts", "row", "col", "score", "recent")
    return (all(torch.equal(getattr(a, c), getattr(b, c)) for c in cols) and a.grid == b.grid
            and a.meta.keys() == b.meta.keys() and all(torch.equal(a.meta[k], b.meta[k]) for k in a.meta)
            and a.extras.keys() == b.extras.keys() and all(torch.equal(a.extras[k], b.extras[k]) for k in a.extras))


def queries(d: int, seed: int) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    return [None, torch.randn(3, d, generator=g), torch.zeros(2, d), torch.randn(1, d, generator=g)]


def check_ranking(pruner, snap: TokenSet, d: int, seed: int) -> None:
    n = len(snap)
    for query in queries(d, seed):
        if n:
            assert finite(pruner.query_score(snap, query))
        for budget in sorted({0, 1, n // 2, n, n + 3}):
            idx = pruner.rank_for_query(snap, query, budget)
            assert idx.dtype == torch.long and idx.ndim == 1
            assert idx.numel() == min(budget, n)
            assert torch.equal(idx, torch.unique(idx))  # ascending and unique
            assert idx.numel() == 0 or (int(idx[0]) >= 0 and int(idx[-1]) < n)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=15, deadline=None)
@given(stream=streams())
def test_bound_no_nan_and_well_formed_rankings(name, stream):
    r = run(name, stream)
    for s in r.scores:
        assert finite(s.score) and s.score.shape == (stream.video.shape[1] * stream.video.shape[2],)
        assert all(finite(v) for v in s.meta.values())
    for snap in r.snaps:
        assert_no_nan(snap)
    check_ranking(r.pruner, r.snaps[-1], stream.video.shape[-1], len(r.snaps))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=12, deadline=None)
@given(stream=streams(), cut=st.integers(0, 11), seed=st.integers(0, 2**16))
def test_causal_scores_and_memory_do_not_depend_on_later_groups(name, stream, cut, seed):
    t = stream.video.shape[0]
    cut = min(cut, t - 1)
    other = stream.video.clone()
    other[cut + 1 :] = torch.randn(other[cut + 1 :].shape, generator=torch.Generator().manual_seed(seed))
    a = run(name, stream)
    b = run(name, Stream(other, stream.index, stream.capacity, stream.recent, stream.extras))
    for k in range(cut + 1):
        assert same_score(a.scores[k], b.scores[k]), k
        assert same_snapshot(a.snaps[k], b.snaps[k]), k


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=12, deadline=None)
@given(stream=streams())
def test_same_input_gives_the_same_memory(name, stream):
    a, b = run(name, stream), run(name, stream)
    assert all(same_score(x, y) for x, y in zip(a.scores, b.scores))
    assert same_snapshot(a.snaps[-1], b.snaps[-1])
    query = queries(stream.video.shape[-1], 0)[1]
    for budget in (1, len(a.snaps[-1]) // 2):
        assert torch.equal(a.pruner.rank_for_query(a.snaps[-1], query, budget),
                           b.pruner.rank_for_query(b.snaps[-1], query, budget))


DEGENERATE = [
    ("equal", 6, 8, 2),
    ("zeros", 6, 8, 2),
    ("zeros", 6, 0, 0),
    ("tiny", 5, 4, 1),
    ("static", 8, 3, 1),
    ("random", 1, 8, 2),  # a single group
    ("equal", 1, 0, 0),
    ("random", 6, 0, 2),  # capacity 0
    ("random", 6, 200, 2),  # capacity above everything
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind,t,capacity,recent", DEGENERATE)
def test_degenerate_streams(name, kind, t, capacity, recent):
    stream = Stream(make_video(kind, t, 3, 4, 8, seed=1), list(range(t)), capacity, recent, extras=False)
    r = run(name, stream)
    for s in r.scores:
        assert finite(s.score)
    for snap in r.snaps:
        assert_no_nan(snap)
    check_ranking(r.pruner, r.snaps[-1], 8, seed=2)
    r.mem.reset_stream()  # a reconnect: the next group has no predecessor
    r.mem.add(FrameTokens(t + 5, float(t + 5), stream.video[-1]))
    assert len(r.mem) <= capacity + recent * 12
    assert_no_nan(r.mem.snapshot())
    check_ranking(r.pruner, r.mem.snapshot(), 8, seed=3)
