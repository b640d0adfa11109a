"""HieraVid (docs/PRUNERS.md, "HieraVid" steps 1-4; the paper's Sec. 3.1-3.2, Eq. 1-10): known
answers, slow transcriptions, streaming."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from slow_math import cosv, f64, mean_rows
from streams import flat, stream

from pruning import FrameTokens, TokenSet, get_pruner, pruner_params
from pruning.base import GroupScore, Pruner
from pruning import TokenMemory
from pruning.hieravid import (
    CUTS,
    HieraVid,
    budget_scores,
    hieravid_select,
    keep_ratios,
    merge_runs,
    relevance,
    segment_ids,
    static_flags,
)
from pruning.dpp import span_scores
from pruning.host_sync import HostSyncs
from pruning.similarity import cos, normalize


def slow_segments(x: torch.Tensor, beta: float, thr: float) -> list[int]:
    t_len, n = x.shape[:2]
    seg = [0]
    for t in range(1, t_len):
        overlap = sum(cosv(x[t, i], x[t - 1, i]) > thr for i in range(n)) / n
        seg.append(seg[-1] + (overlap < beta))
    return seg


def slow_merge(x: torch.Tensor, seg: list[int], merge_ratio: float) -> dict[int, torch.Tensor]:
    """Step 2: the top floor(merge_ratio T N) same-position cos inside segments join their run."""
    t_len, n = x.shape[:2]
    cand = [(t, i) for t in range(1, t_len) for i in range(n) if seg[t] == seg[t - 1]]
    k = min(math.floor(merge_ratio * t_len * n), len(cand))
    flagged = set(sorted(cand, key=lambda ti: (-cosv(x[ti], x[ti[0] - 1, ti[1]]), ti[0] * n + ti[1]))[:k])
    runs: dict[int, list[torch.Tensor]] = {}
    for i in range(n):
        head = -1
        for t in range(t_len):
            if (t, i) in flagged:
                runs[head].append(x[t, i])
            else:
                head = t * n + i
                runs[head] = [x[t, i]]
    return {h: mean_rows(v) for h, v in sorted(runs.items())}


def slow_b(means: list[torch.Tensor], lam: float) -> list[float]:
    b = []
    for m in range(len(means)):
        later = lam * cosv(means[m], mean_rows(means[m + 1:])) if m < len(means) - 1 else 0.0
        earlier = (1 - lam) * (1 - cosv(means[m], mean_rows(means[:m]))) if m > 0 else 0.0
        b.append(later + earlier)
    return b


def slow_keep(b: list[float], ratio: float, r_var: float) -> list[float]:
    mu = sum(b) / len(b)
    sd = math.sqrt(sum((v - mu) ** 2 for v in b) / len(b))
    return [min(max(ratio + r_var * (v - mu) / (sd + 1e-8), 0.05), 0.95) for v in b]


def slow_relevance(feats: list[torch.Tensor], query: torch.Tensor) -> list[float]:
    """Eq. 8 averaged over the question's rows: minmax of the mean of each row's softmax."""
    p = [0.0] * len(feats)
    for h_q in query:
        logits = [float(f.double() @ h_q.double()) / math.sqrt(h_q.numel()) for f in feats]
        e = [math.exp(v - max(logits)) for v in logits]
        p = [a + v / sum(e) / len(query) for a, v in zip(p, e)]
    lo, hi = min(p), max(p)
    return [(v - lo) / (hi - lo) if hi > lo else 0.0 for v in p]


def brute_greedy(kernel: list[list[float]], k: int) -> list[int]:
    lk = torch.tensor(kernel, dtype=torch.float64)
    picked: list[int] = []
    prev = 1.0
    while len(picked) < k:
        dets = [(float(torch.linalg.det(lk[picked + [j]][:, picked + [j]])), -j) for j in range(len(kernel))
                if j not in picked]
        det, neg_j = max(dets)
        if det / prev <= 1e-10:
            break
        picked.append(-neg_j)
        prev = det
    rest = sorted((j for j in range(len(kernel)) if j not in picked), key=lambda j: (-kernel[j][j], j))
    return picked + rest[: k - len(picked)]


def slow_hieravid(video, ratio, query=None, beta=0.4, thr=0.6, merge_ratio=0.5, lam=0.5, r_var=0.1):
    t_len, h, w, d = video.shape
    n = h * w
    x = video.reshape(t_len, n, d)
    seg = slow_segments(x, beta, thr)
    merged = slow_merge(x, seg, merge_ratio)
    n_seg = seg[-1] + 1
    means = [mean_rows([x[t, i] for t in range(t_len) if seg[t] == m for i in range(n)])
             for m in range(n_seg)]
    keep = slow_keep(slow_b(means, lam), ratio, r_var)
    heads = list(merged)
    r = slow_relevance([merged[hd] for hd in heads], query) if query is not None else [1.0] * len(heads)
    kept = []
    for m in range(n_seg):
        rows = [i for i, hd in enumerate(heads) if seg[hd // n] == m]
        k = min(len(rows), math.floor(keep[m] * seg.count(m) * n))
        feats = [merged[heads[a]] for a in rows]
        kernel = [[r[a] * (1.0 if i == j else cosv(feats[i], feats[j])) * r[b] for j, b in enumerate(rows)]
                  for i, a in enumerate(rows)]
        kept += [heads[rows[j]] for j in brute_greedy(kernel, k)]
    kept.sort()
    return kept, torch.stack([merged[hd] for hd in kept]) if kept else torch.zeros(0, d)


def clip(seed: int, t_len: int = 10, h: int = 4, w: int = 4, d: int = 16, cuts=(4, 7)):
    """Segments (a background per segment, cut at `cuts`); each position has its own noise
    level, so some positions are static and some change; a token moves along row 1."""
    g = torch.Generator().manual_seed(seed)
    video = torch.empty(t_len, h, w, d)
    bounds = [0, *cuts, t_len]
    for a, b in zip(bounds[:-1], bounds[1:]):
        bg = torch.randn(h, w, d, generator=g)
        level = torch.rand(h, w, 1, generator=g) * 1.2
        obj = 3 * torch.randn(d, generator=g)
        for t in range(a, b):
            video[t] = bg + level * torch.randn(h, w, d, generator=g)
            video[t, 1, t % w] += obj
    return video


def test_scene_cut_opens_a_segment_exactly_there_offline_and_streaming():
    video = clip(0, cuts=(6,))
    assert segment_ids(video).tolist() == [0] * 6 + [1] * 4
    pruner = HieraVid()
    segs = [int(pruner.score(FrameTokens(t, float(t), video[t])).meta["segment"][0]) for t in range(10)]
    assert segs == [0] * 6 + [1] * 4


def static_run_clip() -> torch.Tensor:
    """Positions 0-7 static over 5 groups, positions 8-15 new every group."""
    g = torch.Generator().manual_seed(3)
    video = torch.randn(5, 4, 4, 8, generator=g)
    video[:, :2] = torch.randn(2, 4, 8, generator=g) + 1e-3 * torch.randn(5, 2, 4, 8, generator=g)
    return video


def test_static_run_becomes_its_mean_at_its_first_group_offline():
    video = static_run_clip()
    # 32 static pairs of 64 candidates: merge_ratio * T * N = 0.4 * 80 = 32 flags them all
    kept, feats = hieravid_select(video, ratio=1.0, merge_ratio=0.4)
    static = [i for i in kept.tolist() if i % 16 < 8]
    assert static == list(range(8))
    got = dict(zip(kept.tolist(), feats))
    for i in range(8):
        assert torch.allclose(got[i], video.reshape(5, 16, 8)[:, i].mean(0), atol=1e-6)
    assert all(i in kept.tolist() for t in range(5) for i in range(t * 16 + 8, t * 16 + 16))


def test_static_run_becomes_its_mean_at_its_first_group_through_token_memory():
    video = static_run_clip()
    # streaming merges the top merge_ratio of within-segment values seen: half are static
    snap = stream(HieraVid(merge_ratio=0.5), video, capacity=1000).snapshot()
    pos = flat(snap).tolist()
    assert [i for i in pos if i % 16 < 8] == list(range(8))
    assert len(pos) == 8 + 5 * 8
    for i in range(8):
        assert torch.allclose(snap.tokens[pos.index(i)], video.reshape(5, 16, 8)[:, i].mean(0), atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), beta=st.floats(0.0, 1.0), thr=st.floats(-0.5, 0.95))
def test_segments_match_transcription(seed, beta, thr):
    video = clip(seed, t_len=6, cuts=(3,))
    assert segment_ids(video, beta, thr).tolist() == slow_segments(video.reshape(6, 16, -1), beta, thr)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), merge_ratio=st.floats(0.0, 1.0))
def test_merge_matches_transcription(seed, merge_ratio):
    video = clip(seed, t_len=6, cuts=(3,))
    x = video.reshape(6, 16, -1)
    seg = segment_ids(video)
    sim = torch.zeros(6, 16)
    sim[1:] = cos(x[1:], x[:-1])
    heads, feats = merge_runs(x, static_flags(sim, seg, merge_ratio))
    want = slow_merge(x, seg.tolist(), merge_ratio)
    assert heads.tolist() == list(want)
    assert torch.allclose(feats.double(), torch.stack(list(want.values())), atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 1000), m=st.integers(1, 6), lam=st.floats(0.0, 1.0), ratio=st.floats(0.0, 1.0),
    r_var=st.floats(0.0, 0.5),
)
def test_budgets_match_transcription(seed, m, lam, ratio, r_var):
    means = torch.randn(m, 8, generator=torch.Generator().manual_seed(seed))
    b = budget_scores(means, lam)
    want = slow_b(list(means), lam)
    assert torch.allclose(b, f64(want), atol=1e-6)
    assert torch.allclose(keep_ratios(f64(want), ratio, r_var), f64(slow_keep(want, ratio, r_var)), atol=1e-9)


def test_relevance_matches_transcription_and_keeps_the_relevant_sign():
    g = torch.Generator().manual_seed(5)
    feats, query = torch.randn(12, 8, generator=g), torch.randn(3, 8, generator=g)
    r = relevance(feats, query)
    assert torch.allclose(r.double(), f64(slow_relevance(list(feats), query)), atol=1e-5)
    assert int(relevance(feats, query[-1:]).argmax()) == int((feats @ query[-1]).argmax())
    assert relevance(feats, None) is None


@pytest.mark.parametrize(
    "seed,ratio,with_query", [(0, 0.3, False), (1, 0.2, True), (4, 0.5, True), (3, 0.1, False)]
)
def test_selection_matches_transcription(seed, ratio, with_query):
    video = clip(seed)
    query = torch.randn(4, 16, generator=torch.Generator().manual_seed(seed)) if with_query else None
    kept, feats = hieravid_select(video, ratio, query=query)
    want, want_feats = slow_hieravid(video, ratio, query=query)
    assert kept.tolist() == want
    assert torch.allclose(feats.double(), want_feats, atol=1e-5)
    assert len(set(segment_ids(video).tolist())) == 3


def slow_running_flags(video: torch.Tensor, merge_ratio: float) -> list[list[bool]]:
    """Streaming step 2 written out: at each group, the cut is the k-th largest of every
    within-segment same-position cos seen so far (this group's included), k = floor(merge_ratio
    * their number); a token merges when its cos is at or above it."""
    t_len = video.shape[0]
    x = video.reshape(t_len, -1, video.shape[-1])
    seg = slow_segments(x, 0.4, 0.6)
    seen: list[float] = []
    flags = [[False] * x.shape[1]]
    for t in range(1, t_len):
        sims = [cosv(x[t, i], x[t - 1, i]) for i in range(x.shape[1])]
        if seg[t] != seg[t - 1]:
            flags.append([False] * len(sims))
            continue
        seen += sims
        k = math.floor(merge_ratio * len(seen))
        cut = sorted(seen, reverse=True)[k - 1] if k else math.inf
        flags.append([s >= cut for s in sims])
    return flags


def static_clip(seed: int, t_len: int = 12) -> torch.Tensor:
    """A fixed camera: a still background with sensor noise, one position of six changing."""
    g = torch.Generator().manual_seed(seed)
    bg = torch.randn(4, 4, 32, generator=g)
    video = bg + 0.01 * torch.randn(t_len, 4, 4, 32, generator=g)
    video[:, ::2, ::3] = torch.randn(t_len, 2, 2, 32, generator=g)
    return video


@pytest.mark.parametrize("seed,merge_ratio", [(0, 0.5), (1, 0.3), (2, 0.7)])
def test_streaming_merge_flags_equal_the_exact_running_quantile_on_a_static_clip(seed, merge_ratio):
    video = static_clip(seed)
    pruner = HieraVid(merge_ratio=merge_ratio)
    got = [(pruner.score(FrameTokens(t, float(t), video[t])).merge_into >= 0).tolist() for t in range(12)]
    assert got == slow_running_flags(video, merge_ratio)
    # a run's head is the latest unflagged token at its position
    pruner = HieraVid(merge_ratio=merge_ratio)
    head = [0] * 16
    for t, flags in enumerate(slow_running_flags(video, merge_ratio)):
        head = [head[i] if flags[i] else t for i in range(16)]
        merge_into = pruner.score(FrameTokens(t, float(t), video[t])).merge_into.tolist()
        assert merge_into == [head[i] if flags[i] else -1 for i in range(16)]


class StaticRuns(Pruner):
    """Positions 0-7 merge into group 0 from group 1 on; eviction keeps the newest rows and
    counts the tokens it drops (rows times the groups each stands for)."""

    def __init__(self) -> None:
        self.evicted = 0

    def score(self, group: FrameTokens) -> GroupScore:
        merge_into = torch.full((16,), -1, dtype=torch.long)
        if group.index:
            merge_into[:8] = 0
        return GroupScore(score=torch.zeros(16), merge_into=merge_into)

    def evict(self, store: TokenSet, capacity: int) -> torch.Tensor:
        keep = torch.arange(len(store) - capacity, len(store))
        self.evicted += int(store.run[: len(store) - capacity].sum())
        return keep


def test_a_merging_token_whose_head_was_evicted_starts_the_run_again():
    video = static_run_clip()
    pruner = StaticRuns()
    mem = TokenMemory(12, pruner, recent_groups=0)
    restarted = set()
    for t in range(5):
        mem.add(FrameTokens(t, float(t), video[t]))
        snap = mem.snapshot()
        # no merged token is lost: each is a held row's share or went with a row `evict` dropped
        assert int(snap.run.sum()) + pruner.evicted == 16 * (t + 1)
        layout = mem.layout()
        assert torch.equal(layout.run, snap.run)
        pos = snap.row * 4 + snap.col
        restarted |= {(int(g), int(p)) for g, p in zip(snap.group, pos) if g > 0 and p < 8}
    # group 0's heads at positions 0-3 were evicted at once: group 1's merging tokens there
    # became rows of their own (a new run), and so on down the stream
    assert {(1, p) for p in range(4)} <= restarted
    x = video.reshape(5, 16, 8)
    for i in range(len(snap)):
        g, pos, run = int(snap.group[i]), int(snap.row[i] * 4 + snap.col[i]), int(snap.run[i])
        assert torch.allclose(snap.tokens[i], x[g:g + run, pos].mean(0), atol=1e-6)


def test_the_snapshot_says_how_many_groups_a_merged_head_stands_for():
    video = static_run_clip()
    snap = stream(HieraVid(merge_ratio=0.5), video, capacity=1000).snapshot()
    static = flat(snap) % 16 < 8
    assert snap.run[static].tolist() == [5] * 8 and bool((snap.run[~static] == 1).all())
    assert snap.select(torch.nonzero(static).flatten()).run.tolist() == [5] * 8


def test_streaming_scores_are_greedy_gains_given_the_previous_group_picks():
    video = clip(8, t_len=2, cuts=())
    x = video.reshape(2, 16, -1)
    pruner = HieraVid(dpp_picks=4)
    first = pruner.score(FrameTokens(0, 0.0, video[0])).score
    second = pruner.score(FrameTokens(1, 1.0, video[1]))
    picks = torch.sort(first, descending=True).indices[:4].tolist()
    cand = [i for i in range(16) if int(second.merge_into[i]) < 0]

    def kernel(rows):
        return torch.tensor([[cosv(a, b) for b in rows] for a in rows], dtype=torch.float64)

    def gain(given, j):
        rows = [x[0, i] for i in picks] + [x[1, i] for i in given + [j]]
        base = [x[0, i] for i in picks] + [x[1, i] for i in given]
        return float(torch.linalg.det(kernel(rows)) / torch.linalg.det(kernel(base)))

    given: list[int] = []
    for _ in range(4):
        best = max(cand, key=lambda j: (gain(given, j), -j) if j not in given else (-1.0, 0))
        assert float(second.score[best]) == pytest.approx(gain(given, best), abs=1e-4)
        given.append(best)


def slow_allocate(store: TokenSet, capacity: int, means: dict[int, torch.Tensor], n: int, last: int) -> list[int]:
    """Step 3 over the store (lam 0.5, r_var 0.1), rows handed out one at a time to the segment
    whose next row has the smallest (rank + 1) / (keep_m * groups it spans), a segment spanning
    from its first group to the next one's (the last one to group `last`)."""
    lam, r_var = 0.5, 0.1
    seg_of = store.meta["segment"].tolist()
    segs = sorted(set(seg_of))
    start = {sg: int(st) for sg, st in zip(seg_of, store.meta["segment_start"])}
    ends = [start[s] for s in segs[1:]] + [last + 1]
    groups = {s: e - start[s] for s, e in zip(segs, ends)}
    ratio = capacity / (n * sum(groups.values()))
    keep = slow_keep(slow_b([means[s] for s in segs], lam), ratio, r_var)
    weight = {s: k * groups[s] for s, k in zip(segs, keep)}
    ranked = {
        s: sorted((i for i in range(len(store)) if seg_of[i] == s), key=lambda i: (-float(store.score[i]), i))
        for s in segs
    }
    taken = {s: 0 for s in segs}
    for _ in range(min(capacity, len(store))):
        open_segs = [s for s in segs if taken[s] < len(ranked[s])]
        best = min(open_segs, key=lambda s: ((taken[s] + 1) / weight[s], ranked[s][taken[s]]))
        taken[best] += 1
    return sorted(i for s in segs for i in ranked[s][: taken[s]])


@pytest.mark.parametrize("seed", range(3))
def test_evict_reallocates_over_held_segments_like_the_transcription(seed):
    video = clip(seed, t_len=10, cuts=(3, 5, 8))
    x = video.reshape(10, 16, -1)
    pruner = HieraVid()
    scored = [pruner.score(FrameTokens(t, float(t), video[t])) for t in range(10)]
    seg = [int(s.meta["segment"][0]) for s in scored]
    g = torch.Generator().manual_seed(seed)
    rows = []
    for t in range(1, 9):
        held = int(torch.randint(1, 17, (1,), generator=g))
        rows += [(t, i) for i in torch.randperm(16, generator=g)[:held].sort().values.tolist()]
    store = TokenSet(
        tokens=torch.stack([x[t, i] for t, i in rows]), group=torch.tensor([t for t, _ in rows]),
        pts=torch.tensor([float(t) for t, _ in rows], dtype=torch.float64),
        row=torch.tensor([i // 4 for _, i in rows]), col=torch.tensor([i % 4 for _, i in rows]),
        score=torch.rand(len(rows), generator=g), recent=torch.zeros(len(rows), dtype=torch.bool),
        grid=(4, 4),
        meta={"segment": torch.tensor([seg[t] for t, _ in rows]),
              "segment_start": torch.tensor([seg.index(seg[t]) for t, _ in rows])},
    )
    means = {s: mean_rows([x[t, i] for t in range(10) if seg[t] == s for i in range(16)]) for s in set(seg)}
    capacity = len(rows) // 2
    kept = pruner.evict(store, capacity)
    assert kept.tolist() == slow_allocate(store, capacity, means, 16, last=9)
    assert (pruner._means.first, pruner._means.size) == (seg[1], seg[-1] - seg[1] + 1)


def test_rank_for_query_spends_recent_first_then_the_most_relevant():
    video = clip(9, t_len=8, cuts=())
    mem = stream(HieraVid(merge_ratio=0.5), video, capacity=40, recent=2)  # a store where the target is a raw token
    snap = mem.snapshot()
    pruner = mem.pruner
    n_recent = int(snap.recent.sum())
    store_rows = torch.nonzero(~snap.recent).flatten()
    target = int(store_rows[7])
    query = torch.stack([torch.randn(16, generator=torch.Generator().manual_seed(0)), 10 * snap.tokens[target]])
    picked = pruner.rank_for_query(snap, query, n_recent + 1)
    assert picked.tolist() == sorted(torch.nonzero(snap.recent).flatten().tolist() + [target])
    picked = pruner.rank_for_query(snap, query, n_recent + 10)
    assert picked.numel() == n_recent + 10 and bool((picked[1:] > picked[:-1]).all())
    newest = torch.nonzero(snap.group == 7).flatten()
    assert pruner.rank_for_query(snap, query, 5).tolist() == newest[:5].tolist()
    assert pruner.rank_for_query(snap, None, len(snap)).tolist() == list(range(len(snap)))


def test_rank_for_query_is_step_3_over_the_store_with_query_time_scores():
    video = clip(10, t_len=12, cuts=(4, 9))
    mem = stream(HieraVid(), video, capacity=60, recent=2)
    snap, pruner = mem.snapshot(), mem.pruner
    query = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    rest = torch.nonzero(~snap.recent).flatten()
    store = snap.select(rest)
    store = dataclasses.replace(store, score=pruner.query_score(snap, query)[rest].float())
    segs = store.meta["segment"].tolist()
    means = {s: mean_rows([store.tokens[i] for i in range(len(store)) if segs[i] == s]) for s in set(segs)}
    n_recent = int(snap.recent.sum())
    for budget in (n_recent + 7, n_recent + 30):
        want = rest[slow_allocate(store, budget - n_recent, means, 16, last=int(snap.group.max()))].tolist()
        want = sorted(want + torch.nonzero(snap.recent).flatten().tolist())
        assert pruner.rank_for_query(snap, query, budget).tolist() == want


@pytest.mark.parametrize("with_query", [False, True])
def test_query_time_dpp_batched_across_segments_gives_each_segment_its_own_scores(with_query):
    """A question's DPP runs one batched greedy per round over every segment's block; each
    segment's scores are the bits its own blocks give one after another (as before batching)."""
    video = clip(12, t_len=20, d=24, cuts=(5, 9, 14))
    pruner = HieraVid(dpp_picks=3, dpp_rank=7)  # a segment picks over three blocks
    mem = stream(pruner, video, capacity=150, recent=2)
    snap = mem.snapshot()
    query = torch.randn(3, 24, generator=torch.Generator().manual_seed(4)) if with_query else None
    got = pruner.query_score(snap, query)
    order, _, n_recent, cuts = pruner._parts(snap)
    stored = len(snap) - n_recent
    rows = order[:stored]
    cuts = [c for c in cuts if c < stored]
    assert len(cuts) >= 2
    r = relevance(snap.tokens, query)
    units = normalize(snap.tokens[rows].float())
    n = snap.grid[0] * snap.grid[1]
    for a, b in zip([0, *cuts], [*cuts, stored]):  # each segment alone, block after block
        basis, s = torch.zeros(0, 24), a
        while s < b:
            e = min(s + n, b) if basis.shape[0] < pruner.dpp_rank else b
            want, picks = span_scores(units[s:e], basis, None if r is None else r[rows][s:e], 3, 7)
            assert torch.equal(got[rows[s:e]], want)
            if picks is not None:
                basis = picks.extend(int(picks.count()))
            s = e


# Measured on this random clip (D=64, 4 segments), the same merge_ratio on both sides: 0.58 of
# the offline pick at ratio 0.25 (0.64 with the paper's novelty and merge_ratio 0.5).
OVERLAP_FLOOR = 0.5


def test_streaming_memory_stays_bounded_and_overlaps_offline():
    video = clip(11, t_len=24, d=64, cuts=(6, 14, 19))
    pruner = get_pruner("hieravid")
    offline, _ = hieravid_select(video, 0.25, merge_ratio=pruner.merge_ratio)
    mem = stream(pruner, video, capacity=offline.numel())
    snap = mem.snapshot()
    assert len(snap) <= offline.numel()
    overlap = len(set(flat(snap).tolist()) & set(offline.tolist())) / offline.numel()
    assert overlap >= OVERLAP_FLOOR, overlap


def test_registry_and_parameters():
    assert pruner_params("hieravid") == {
        "beta": 0.4, "sim_threshold": 0.6, "merge_ratio": 0.7, "lam": 0.5, "r_var": 0.1, "dpp_picks": 32,
        "dpp_rank": 32, "memory_states": 4,
    }
    assert isinstance(get_pruner("hieravid", beta=0.3), HieraVid)


def test_segment_means_keep_the_gram_of_running_means_through_growth_and_drops():
    g = torch.Generator().manual_seed(12)
    video = torch.randn(30, 2, 2, 32, generator=g)  # unrelated groups: every one opens a segment
    video[10:13] = video[10] + 0.01 * torch.randn(3, 2, 2, 32, generator=g)  # one segment of 3 groups
    pruner = HieraVid()
    seg = []
    for t in range(30):
        seg.append(int(pruner.score(FrameTokens(t, float(t), video[t])).meta["segment"][0]))
        if t % 7 == 6:
            pruner._means.drop_before(seg[t] - 4)
    tracked = torch.arange(pruner._means.first, seg[-1] + 1)
    means = torch.stack(
        [mean_rows([v for t in range(30) if seg[t] == s for v in video[t].reshape(4, 32)]) for s in tracked.tolist()]
    )
    assert seg[10] == seg[12] and len(set(seg)) == 28
    assert torch.allclose(pruner._means.window(), means @ means.T, atol=1e-5)


def test_different_questions_give_different_query_picks():
    video = clip(13, t_len=12, cuts=(6,))
    mem = stream(HieraVid(), video, capacity=80, recent=1)
    snap, pruner = mem.snapshot(), mem.pruner
    g = torch.Generator().manual_seed(2)
    budget = int(snap.recent.sum()) + 20
    picks = [tuple(pruner.rank_for_query(snap, torch.randn(6, 16, generator=g), budget).tolist()) for _ in range(3)]
    assert len(set(picks)) == 3
    # the question's content, not its last token: same last row, different other rows
    a, b = torch.randn(2, 6, 16, generator=g)
    b[-1] = a[-1]
    assert pruner.rank_for_query(snap, a, budget).tolist() != pruner.rank_for_query(snap, b, budget).tolist()
    assert HieraVid.query_layer == 7


def _planted(seed: int, capacity: float, **params) -> tuple[float, int, int]:
    """(distractor share of the store, events kept, events) of a planted stream (tests/planted_streams.py)."""
    from planted_streams import planted_stream, store_report

    planted = planted_stream(seed)
    t = planted.video.shape[0]
    mem = TokenMemory(int(capacity * t * planted.n), get_pruner("hieravid", **params), recent_groups=2)
    for k in range(t):
        mem.add(FrameTokens(k, float(k), planted.video[k]))
    share, kept = store_report(planted, mem.snapshot())
    return share, kept, len(planted.events)


def test_periodic_distractors_are_no_news_to_its_dpp():
    """Memory-aware novelty (departure 6): tokens that return to a state their position held are
    not DPP candidates, so a blinking light and a swaying branch stay out of the store and every
    event is kept at 10%; with memory_states=0 (the paper) they take most of it."""
    for seed in (0, 1, 2):
        for capacity in (0.03, 0.10):
            share, kept, events = _planted(seed, capacity)
            assert share <= 0.10, (seed, capacity, share)
            assert kept == events or capacity < 0.10, (seed, kept)
            paper_share, _, _ = _planted(seed, capacity, memory_states=0)
            assert paper_share >= 0.5, (seed, capacity, paper_share)


def test_ingest_reads_back_once_per_group_and_an_eviction_only_late():
    """On a device every read-back stalls the camera's thread: a group's score reads back one
    vector (a cut, its DPP candidates, the last group's picks), whether a segment opens, merges
    or picks; an eviction reads nothing then, only the oldest segment the one before it saw."""
    video = clip(14, t_len=16, cuts=(5, 11))
    pruner = HieraVid(dpp_picks=4, dpp_rank=8)
    mem = TokenMemory(60, pruner, recent_groups=2, evict_slack=10)
    score, evict = pruner.score, pruner.evict
    counts = {"score": [], "evict": []}

    late = []

    def counted(name, fn):
        def call(*args):
            with HostSyncs() as syncs:
                out = fn(*args)
            counts[name].append(syncs.total)
            if name == "evict":
                late.append(syncs.counts["late Tensor.tolist"])
            return out
        return call

    pruner.score, pruner.evict = counted("score", score), counted("evict", evict)
    for t in range(16):
        mem.add(FrameTokens(t, float(t), video[t]))
    # from the second group on: the state bank's first group copies its signs from the host
    assert counts["score"][1:] == [1] * 15 and len(counts["evict"]) >= 3 and set(counts["evict"]) == {0}
    assert late == [0] + [1] * (len(late) - 1)


def test_a_question_reads_back_the_cuts_and_each_round_of_picks():
    """The recent window's size and the segment cuts in one read-back, then one per round of
    DPP blocks: two when each segment's first block fills its basis."""
    video = clip(15, t_len=12, cuts=(4, 8))
    mem = stream(HieraVid(dpp_rank=4), video, capacity=80, recent=2)
    snap, pruner = mem.snapshot(), mem.pruner
    query = torch.randn(3, 16, generator=torch.Generator().manual_seed(3))
    budget = int(snap.recent.sum()) + 20
    with HostSyncs() as syncs:
        pruner.rank_for_query(snap, query, budget)
    assert syncs.total == 2, dict(syncs.counts)


def test_segment_cuts_past_the_first_read_back_are_read_again():
    n = 2 * CUTS + 10
    seg = torch.arange(n).repeat_interleave(2)
    snap = TokenSet(
        tokens=torch.randn(2 * n, 8), group=torch.arange(2 * n), pts=torch.zeros(2 * n, dtype=torch.float64),
        row=torch.zeros(2 * n, dtype=torch.long), col=torch.zeros(2 * n, dtype=torch.long), score=torch.rand(2 * n),
        recent=torch.arange(2 * n) >= 2 * n - 3, grid=(1, 1), meta={"segment": seg, "segment_start": 2 * (seg // 2)},
    )
    order, flags, n_recent, cuts = HieraVid()._parts(snap)
    assert n_recent == 3 and order.tolist() == list(range(2 * n))
    assert cuts == sorted([*range(2, 2 * n, 2), 2 * n - 3]) and torch.nonzero(flags).flatten().tolist() == cuts
