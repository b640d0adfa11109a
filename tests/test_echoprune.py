"""EchoPrune (docs/PRUNERS.md, "EchoPrune"; the paper's Sec. 3, Eq. 4-12 and Alg. 1): known
answers, each equation against a slow transcription, budget edges, and the streaming pruner
against the offline function."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pruning import TokenMemory, TokenSet, get_pruner
from pruning.echoprune import (
    EchoPrune,
    corr_echo,
    echoprune_scores,
    echoprune_select,
    prepare,
    window_cos,
)
from pruning.types import FrameTokens

log = logging.getLogger(__name__)


# ---- slow transcriptions of docs/PRUNERS.md "EchoPrune", one token at a time, in float64 ----

def unit(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    return v / max(float(v.norm()), 1e-6)


def slow_r(video: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
    t, h, w, _ = video.shape
    r = torch.zeros(t, h * w, dtype=torch.float64)
    if text is None:
        return r
    for k in range(t):
        for i in range(h * w):
            v = unit(video[k, i // w, i % w])
            r[k, i] = max(float(v @ unit(tj)) for tj in text)
    return r


def slow_window(h: int, w: int, y: int, x: int, radius: int | None) -> list[tuple[int, int]]:
    if radius is None:
        return [(a, b) for a in range(h) for b in range(w)]
    return [(a, b) for a in range(y - radius, y + radius + 1) for b in range(x - radius, x + radius + 1)
            if 0 <= a < h and 0 <= b < w]


def slow_corr_echo(video: torch.Tensor, tau: float, radius: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    t, h, w, _ = video.shape
    corr = torch.zeros(t, h * w, dtype=torch.float64)
    echo = torch.zeros(t, h * w, dtype=torch.float64)
    for k in range(1, t):
        for y in range(h):
            for x in range(w):
                v = unit(video[k, y, x])
                corr[k, y * w + x] = float(v @ unit(video[k - 1, y, x]))
                cands = [unit(video[k - 1, a, b]) for a, b in slow_window(h, w, y, x, radius)]
                rho = [float(v @ c) / tau for c in cands]
                top = max(rho)
                e = [math.exp(z - top) for z in rho]
                p = [z / sum(e) for z in e]
                recon = sum(pj * c for pj, c in zip(p, cands))
                echo[k, y * w + x] = float(v @ recon)
    return corr, echo


def slow_select(video: torch.Tensor, text: torch.Tensor | None, budget: int, tau: float,
                radius: int | None) -> list[int]:
    t, h, w, _ = video.shape
    n = h * w
    if budget >= t * n:
        return list(range(t * n))
    if budget <= 0:
        return []
    r = slow_r(video, text)
    corr, echo = slow_corr_echo(video, tau, radius)
    s = r - corr - echo

    def top(pairs: list[tuple[float, int]], k: int) -> list[int]:
        return [i for _, i in sorted(pairs, key=lambda p: (-p[0], p[1]))[:k]]

    if t == 1:
        return sorted(top([(float(r[0, i]), i) for i in range(n)], budget))
    q = min(n, budget, max(1, budget // t))
    first = top([(float(r[0, i]), i) for i in range(n)], q)
    rest = top([(float(s[k, i]), k * n + i) for k in range(1, t) for i in range(n)], budget - q)
    return sorted(first + rest)


def video_and_text(seed: int, t: int, h: int, w: int, d: int, with_text: bool):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(t, h, w, d, generator=g)
    video[1:] = 0.6 * video[:-1] + 0.4 * video[1:]
    text = torch.randn(3, d, generator=g) if with_text else None
    return video, text


CASES = [
    (0, (4, 3, 4, 8), 0.1, 1),
    (1, (3, 4, 5, 6), 0.5, None),
    (2, (3, 2, 3, 5), 0.2, 0),
    (3, (3, 5, 4, 7), 0.1, 2),
    (4, (2, 3, 3, 16), 1.0, 5),
]


# ---- known answers ----

def onehot_clip(t: int = 4, h: int = 4, w: int = 4, appear: int = 2) -> torch.Tensor:
    """Static one-hot background e_p at position p; at group `appear` an object (e_N, e_N+1)
    covers (1, 1) and (1, 2) and stays. Every similarity is exactly 0 or 1."""
    n = h * w
    d = n + 2
    video = torch.eye(d)[:n].reshape(1, h, w, d).repeat(t, 1, 1, 1)
    video[appear:, 1, 1] = torch.eye(d)[n]
    video[appear:, 1, 2] = torch.eye(d)[n + 1]
    return video


def window_size(h: int, w: int, y: int, x: int, radius: int) -> int:
    rows = min(y + radius, h - 1) - max(y - radius, 0) + 1
    cols = min(x + radius, w - 1) - max(x - radius, 0) + 1
    return rows * cols


def test_static_background_is_an_echo_and_the_new_object_is_not():
    video = onehot_clip()
    _, h, w, _ = video.shape
    tau = 0.1
    _, nov = echoprune_scores(video, None, tau=tau, radius=1)
    obj = {1 * w + 1, 1 * w + 2}
    for k in (1, 2, 3):
        for i in range(h * w):
            if k == 2 and i in obj:
                expected = 0.0  # orthogonal to every candidate: corr = echo = 0
            else:
                # an exact copy: corr = 1, echo = softmax weight of itself among K clipped candidates
                big = math.exp(1 / tau)
                expected = -(1 + big / (big + window_size(h, w, i // w, i % w, 1) - 1))
            assert nov[k, i].item() == pytest.approx(expected, abs=1e-6), (k, i)
    # quota min(N, budget, max(1, budget // T)) = 1 with budget 3, T 4: token 0 (r = 0 ties to
    # the lowest index), then the object where it appears; its copies later are echoes
    picked = echoprune_select(video, None, budget=3, tau=tau, radius=1)
    assert picked.tolist() == [0] + [2 * h * w + i for i in sorted(obj)]


def test_streaming_memory_keeps_the_object_and_drops_its_echoes():
    video = onehot_clip(t=6)
    t, h, w, _ = video.shape
    pruner = EchoPrune(tau=0.1, radius=1, first_ratio=0.125)
    mem = TokenMemory(capacity=4, pruner=pruner, recent_groups=0)
    for k in range(t):
        mem.add(FrameTokens(k, float(k), video[k]))
    snap = mem.snapshot()
    held = sorted(zip(snap.group.tolist(), snap.row.tolist(), snap.col.tolist()))
    # group 0's quota (2 of 16; all equally unique, ties to the lowest index), then the object
    # the group it appears; its copies in groups 3..5 and the static background are echoes
    assert held == [(0, 0, 0), (0, 0, 1), (2, 1, 1), (2, 1, 2)]


def test_window_is_clipped_at_the_borders_without_padding_or_duplicates():
    h, w = 4, 5
    n = h * w
    prev = prepare(torch.eye(n).reshape(h, w, n))
    weights = torch.arange(1, n + 1, dtype=torch.float32)
    cur = prepare(weights.expand(h, w, n).contiguous())
    for radius in (0, 1, 2, 6):
        sims, valid = window_cos(cur, prev, radius)
        assert sims.shape == valid.shape == (n, (2 * radius + 1) ** 2)
        assert torch.all(sims[~valid] == 0)
        for i in range(n):
            # cos(weights, e_j) = (j + 1) / |weights| names the neighbour j
            got = (sims[i][valid[i]] * weights.norm() - 1).round().long().tolist()
            expected = [a * w + b for a, b in slow_window(h, w, i // w, i % w, radius)]
            assert got == expected, (radius, i)


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 5), w=st.integers(1, 5), radius=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_window_count_matches_the_clipped_square(h, w, radius, seed):
    g = torch.Generator().manual_seed(seed)
    cur = prepare(torch.randn(h, w, 4, generator=g))
    prev = prepare(torch.randn(h, w, 4, generator=g))
    _, valid = window_cos(cur, prev, radius)
    counts = valid.sum(dim=1).tolist()
    assert counts == [window_size(h, w, i // w, i % w, radius) for i in range(h * w)]


def test_a_window_covering_the_grid_equals_whole_group_matching():
    video, _ = video_and_text(7, 2, 3, 4, 8, False)
    cur, prev = prepare(video[1]), prepare(video[0])
    for a, b in zip(corr_echo(cur, prev, 0.3, 3), corr_echo(cur, prev, 0.3, None)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ---- each equation against the slow transcription ----

@pytest.mark.parametrize("seed,shape,tau,radius", CASES)
def test_relevance_correspondence_and_echo_match_the_equations(seed, shape, tau, radius):
    video, text = video_and_text(seed, *shape, with_text=True)
    r, nov = echoprune_scores(video, text, tau=tau, radius=radius)
    slow_c, slow_e = slow_corr_echo(video, tau, radius)
    torch.testing.assert_close(r.double(), slow_r(video, text), atol=1e-5, rtol=0)
    for k in range(1, shape[0]):
        corr, echo = corr_echo(prepare(video[k]), prepare(video[k - 1]), tau, radius)
        torch.testing.assert_close(corr.double(), slow_c[k], atol=1e-5, rtol=0)
        torch.testing.assert_close(echo.double(), slow_e[k], atol=1e-5, rtol=0)
    torch.testing.assert_close(nov.double(), -(slow_c + slow_e), atol=1e-5, rtol=0)
    assert torch.all(nov[0] == 0)


@pytest.mark.parametrize("seed,shape,tau,radius", CASES)
@pytest.mark.parametrize("with_text", [True, False])
def test_selection_matches_the_slow_selection(seed, shape, tau, radius, with_text):
    video, text = video_and_text(seed, *shape, with_text=with_text)
    t, h, w, _ = shape
    for budget in (1, t - 1, h * w // 2, h * w + 3, t * h * w // 3, t * h * w - 1):
        got = echoprune_select(video, text, budget, tau=tau, radius=radius)
        assert got.tolist() == slow_select(video, text, budget, tau, radius), budget


def test_budget_edges():
    video, text = video_and_text(11, 3, 3, 4, 6, True)
    total = 3 * 12
    assert echoprune_select(video, text, 0).tolist() == []
    assert echoprune_select(video, text, -5).tolist() == []
    assert echoprune_select(video, text, total).tolist() == list(range(total))
    assert echoprune_select(video, text, total + 10).tolist() == list(range(total))
    picked = echoprune_select(video, text, 2)  # budget < T: the first group still gets one
    assert len(picked) == 2 and int((picked < 12).sum()) == 1
    single = video[:1]
    for budget in (1, 5, 12):
        expected = slow_select(single, text, budget, 0.1, 1)
        assert echoprune_select(single, text, budget).tolist() == expected
    assert echoprune_select(single, None, 3).tolist() == [0, 1, 2]  # r = 0: ties to the lower index
    for got in (echoprune_select(video, text, b) for b in range(total + 1)):
        assert got.dtype == torch.long and torch.equal(got, torch.unique(got))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError):
        echoprune_select(torch.zeros(2, 3, 4), None, 3)
    with pytest.raises(ValueError):
        echoprune_select(torch.zeros(2, 2, 2, 4), None, 3, tau=0)
    with pytest.raises(ValueError):
        EchoPrune(radius=-1)
    with pytest.raises(ValueError):
        EchoPrune(first_ratio=1.5)


# ---- streaming against offline ----

def misaligned(x: torch.Tensor) -> torch.Tensor:
    """The same values at an odd address, as a tensor handed over by other code may be."""
    buf = torch.empty(x.numel() + 3)
    return buf[3:].view(x.shape).copy_(x)


@pytest.mark.parametrize("tau,radius", [(0.5, None), (0.1, 1), (0.2, 2), (0.3, 0)])
@pytest.mark.parametrize("shape", [(5, 4, 5, 16), (4, 7, 3, 33)])
def test_streaming_novelty_is_exactly_the_offline_novelty(tau, radius, shape):
    video, _ = video_and_text(5, *shape, with_text=False)
    _, nov = echoprune_scores(video, None, tau=tau, radius=radius)
    pruner = get_pruner("echoprune", tau=tau, radius=radius)
    for k in range(shape[0]):
        tokens = (video[k].clone(), misaligned(video[k]), video[k])[k % 3]
        score = pruner.score(FrameTokens(k, float(k), tokens)).score
        if k:
            assert torch.equal(score, nov[k]), k


def test_first_group_gets_a_bounded_quota_of_its_most_unique_tokens():
    video, _ = video_and_text(3, 3, 4, 4, 8, False)
    pruner = EchoPrune(first_ratio=0.25)
    for first in (video[0], video[0, :, :3]):  # the stream start, then a change of grid
        score = pruner.score(FrameTokens(0, 0.0, first)).score
        n = first.shape[0] * first.shape[1]
        mean = unit(first.reshape(n, 8).mean(0))
        uniq = [1 - float(unit(v) @ mean) for v in first.reshape(n, 8)]
        quota = sorted(range(n), key=lambda i: (-uniq[i], i))[: n // 4]
        above = torch.nonzero(score >= -2).flatten().tolist()
        assert above == sorted(quota)
        for i in quota:
            assert score[i].item() == pytest.approx(-2 * (1 - uniq[i]), abs=1e-5)
        assert bool(torch.all(score[score < -2] < -2.5))
        assert bool(torch.all(pruner.score(FrameTokens(1, 1.0, video[1, :, : first.shape[1]])).score >= -2.0001))


def test_a_reconnect_with_the_same_grid_keeps_the_predecessor():
    """The view after a reconnect is most likely the one before: the first group back is
    compared with the last group seen, as without the reconnect; a new grid starts afresh."""
    video = moving_clip(t=8)
    plain, reconnected = EchoPrune(), EchoPrune()
    mem = TokenMemory(capacity=40, pruner=reconnected, recent_groups=1)
    for k in range(8):
        if k == 5:
            mem.reset_stream()
        mem.add(FrameTokens(k, float(k), video[k]))
        assert torch.equal(mem.snapshot().score[-36:], plain.score(FrameTokens(k, float(k), video[k])).score), k
    mem.reset_stream()
    mem.add(FrameTokens(8, 8.0, video[7, :, :4]))
    assert int((mem.snapshot().score[-24:] >= -2).sum()) == 6  # a first group: its quota of 24 * 0.25


def test_query_score_is_relevance_plus_stored_novelty():
    video, text = video_and_text(9, 6, 3, 3, 8, True)
    pruner = EchoPrune(tau=0.5)
    mem = TokenMemory(capacity=10, pruner=pruner, recent_groups=2)
    for k in range(6):
        mem.add(FrameTokens(k, float(k), video[k]))
    snap = mem.snapshot()
    expected = [max(float(unit(v) @ unit(q)) for q in text) + float(s) for v, s in zip(snap.tokens, snap.score)]
    got = pruner.query_score(snap, text).double()
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.equal(pruner.query_score(snap, None), snap.score)


def test_a_relevant_old_token_outranks_more_novel_ones():
    tokens = torch.eye(6)
    snap = TokenSet(
        tokens=tokens, group=torch.tensor([0, 0, 1, 1, 2, 2]),
        pts=torch.tensor([0.0, 0, 1, 1, 2, 2], dtype=torch.float64),
        row=torch.tensor([0, 1, 0, 1, 0, 1]), col=torch.zeros(6, dtype=torch.long),
        score=torch.tensor([-0.5, -0.6, -1.2, -0.7, -2.0, -2.0]),
        recent=torch.tensor([False, False, False, False, True, True]), grid=(2, 1),
    )
    pruner = EchoPrune()
    assert pruner.rank_for_query(snap, None, 3).tolist() == [0, 4, 5]
    # r = 1 for row 2 only: S = [-0.5, -0.6, -0.2, -0.7] over the store
    assert pruner.rank_for_query(snap, tokens[2:3], 3).tolist() == [2, 4, 5]
    assert pruner.rank_for_query(snap, tokens[2:3], 4).tolist() == [0, 2, 4, 5]


def moving_clip(t: int = 24, h: int = 6, w: int = 6, d: int = 32, seed: int = 0) -> torch.Tensor:
    """A noisy static background, a scene cut half-way, and an object moving one column a group."""
    g = torch.Generator().manual_seed(seed)
    scenes = torch.randn(2, h, w, d, generator=g)
    obj = torch.randn(d, generator=g)
    video = torch.empty(t, h, w, d)
    for k in range(t):
        video[k] = scenes[k * 2 // t] + 0.2 * torch.randn(h, w, d, generator=g)
        video[k, (k // w) % h, k % w] = obj * 2
    return video


@pytest.mark.parametrize("tau,radius", [(0.5, None), (0.1, 1)])
def test_streaming_memory_overlaps_the_offline_selection(tau, radius):
    video = moving_clip()
    t, h, w, _ = video.shape
    n, recent = h * w, 2
    # the paper's novelty (no bank): the object leaving a cell returns it to a state it held
    mem = TokenMemory(capacity=80, pruner=EchoPrune(tau=tau, radius=radius, memory_states=0), recent_groups=recent)
    for k in range(t):
        mem.add(FrameTokens(k, float(k), video[k]))
    snap = mem.snapshot()
    flat = snap.group * n + snap.row * w + snap.col
    assert flat[snap.recent].tolist() == list(range((t - recent) * n, t * n))
    store = set(flat[~snap.recent].tolist())
    offline = set(echoprune_select(video[: t - recent], None, len(store), tau=tau, radius=radius).tolist())
    # Beyond the first group (streaming: a 25% quota by uniqueness; offline: budget // T by r)
    # the store is the global top novelty of the groups that left the recent window.
    assert {i for i in store if i >= n} <= offline
    cut = set(range(t // 2 * n, (t // 2 + 1) * n))
    assert cut <= store and cut <= offline  # the scene cut is all news
    overlap = len(store & offline) / len(store)
    whole = set(echoprune_select(video, None, len(flat), tau=tau, radius=radius).tolist())
    log.info("echoprune tau=%s radius=%s: store/offline overlap %.3f of %d; whole memory/offline %.3f of %d",
             tau, radius, overlap, len(store), len(whole & set(flat.tolist())) / len(flat), len(flat))
    assert overlap >= 0.85
