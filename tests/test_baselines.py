"""The baselines (docs/PRUNERS.md, "Baselines") on hand-built streams through TokenMemory."""
from __future__ import annotations

import torch

from pruning import TokenMemory, TokenSet, get_pruner
from pruning.baselines import DTD, Random, Recent, Uniform
from pruning.host_sync import HostSyncs
from pruning.types import FrameTokens


def groups(t: int, h: int = 2, w: int = 2, d: int = 4, seed: int = 0) -> list[FrameTokens]:
    g = torch.Generator().manual_seed(seed)
    return [FrameTokens(k, float(k), torch.randn(h, w, d, generator=g)) for k in range(t)]


def held_groups(mem: TokenMemory) -> list[int]:
    return torch.unique(mem.snapshot().group).tolist()


def test_recent_is_a_sliding_window():
    mem = TokenMemory(capacity=8, pruner=Recent(), recent_groups=1)
    for g in groups(7):
        mem.add(g)
    snap = mem.snapshot()
    assert snap.group.tolist() == [4] * 4 + [5] * 4 + [6] * 4


def test_uniform_halves_the_stride_when_full():
    mem = TokenMemory(capacity=12, pruner=Uniform(), recent_groups=0)  # 3 groups of 4 tokens
    expected = [[0], [0, 1], [0, 1, 2], [0, 2], [0, 2, 4], [0, 2, 4], [0, 4], [0, 4], [0, 4, 8],
                [0, 4, 8], [0, 4, 8], [0, 4, 8], [0, 8]]
    for g, want in zip(groups(13), expected):
        mem.add(g)
        assert held_groups(mem) == want, g.index
        snap = mem.snapshot()
        assert torch.equal(torch.bincount(snap.group)[snap.group], torch.full((len(snap),), 4))  # whole groups


def test_uniform_counts_from_the_first_group_seen_and_thins_stragglers():
    frames = [FrameTokens(k + 100, float(k), g.tokens) for k, g in enumerate(groups(12))]
    mem = TokenMemory(capacity=12, pruner=Uniform(), recent_groups=2)
    for g in frames:
        mem.add(g)
    # stride 2 once group 103 overflows the store (104, 105 were admitted at stride 1 while
    # recent; 105 is thinned when it overflows the store in turn), stride 4 once 106 does
    snap = mem.snapshot()
    assert torch.unique(snap.group[~snap.recent]).tolist() == [100, 104, 108]
    assert torch.unique(snap.group[snap.recent]).tolist() == [110, 111]


def test_uniform_query_budget_keeps_the_coarsest_stride():
    mem = TokenMemory(capacity=12, pruner=Uniform(), recent_groups=0)
    for g in groups(9):
        mem.add(g)
    snap = mem.snapshot()
    assert torch.unique(snap.group).tolist() == [0, 4, 8]
    pruner = mem.pruner
    picked = pruner.rank_for_query(snap, None, budget=8)
    assert torch.unique(snap.group[picked]).tolist() == [0, 8]


def test_uniform_with_capacity_below_one_group_keeps_a_prefix():
    mem = TokenMemory(capacity=3, pruner=Uniform(), recent_groups=0)
    for g in groups(5):
        mem.add(g)
        snap = mem.snapshot()
        assert snap.group.tolist() == [0, 0, 0] and snap.row.tolist() == [0, 0, 1]


def test_uniform_says_what_a_group_keeps_and_evicts_reading_nothing_back():
    """A group on the stride has no keep-mask and one off it keeps none and says so (the memory
    reads nothing back for either); eviction decides from the groups it admitted, on the host."""
    pruner = Uniform()
    frames = groups(6)
    assert all(pruner.score(g).keep is None for g in frames[:4])
    group = torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [3] * 4)
    store = TokenSet(tokens=torch.zeros(16, 4), group=group, pts=group.double(), row=group * 0, col=group * 0,
                     score=torch.zeros(16), recent=torch.zeros(16, dtype=torch.bool), grid=(2, 2))
    with HostSyncs() as syncs:
        kept = pruner.evict(store, 8)
    assert syncs.total == 0 and group[kept].tolist() == [0] * 4 + [2] * 4
    assert pruner.score(frames[4]).keep is None
    off = pruner.score(frames[5])
    assert off.kept == 0 and not bool(off.keep.any())


def test_dtd_and_uniforms_ingest_read_nothing_back():
    """On the meta device every read-back raises: DTD's score and evict and Uniform's score run."""
    dtd, uniform = DTD(), Uniform()
    with torch.device("meta"):
        for k in range(3):
            group = FrameTokens(k, float(k), torch.randn(2, 2, 4))
            assert dtd.score(group).keep.device.type == "meta"
            assert uniform.score(group).score.device.type == "meta"
        group = torch.zeros(12, dtype=torch.long)
        store = TokenSet(tokens=torch.zeros(12, 4), group=group, pts=group.double(), row=group, col=group,
                         score=torch.zeros(12), recent=group.bool(), grid=(2, 2))
        assert dtd.evict(store, 8).shape == (8,)


def dtd_stream() -> list[FrameTokens]:
    e = torch.eye(4)
    g0 = torch.stack([e[0], e[1], e[2], e[3]]).reshape(2, 2, 4)
    g1 = g0.clone()
    g1[0, 1] = e[2]  # cos 0 to e[1]: new
    g1[1, 1] = torch.ones(4)  # cos exactly 0.5 to e[3]: not above the threshold, kept
    g2 = g1.clone()
    g2[0, 0] = e[0] + 0.1 * e[1]  # cos 0.995: static, dropped
    return [FrameTokens(k, float(k), g) for k, g in enumerate([g0, g1, g2])]


def test_dtd_drops_tokens_like_the_previous_group_and_keeps_the_first_whole():
    mem = TokenMemory(capacity=100, pruner=DTD(), recent_groups=0)
    for g in dtd_stream():
        mem.add(g)
    snap = mem.snapshot()
    held = list(zip(snap.group.tolist(), snap.row.tolist(), snap.col.tolist()))
    assert held == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 1), (1, 1, 1)]


def test_dtd_keeps_dropped_tokens_while_recent_and_restarts_after_reset():
    pruner = DTD()
    mem = TokenMemory(capacity=100, pruner=pruner, recent_groups=3)
    for g in dtd_stream():
        mem.add(g)
    assert len(mem) == 12
    mem.reset_stream()
    assert bool(pruner.score(dtd_stream()[2]).keep.all())
    assert not bool(pruner.score(dtd_stream()[2]).keep.any())


def test_dtd_evicts_the_oldest_when_over_capacity():
    mem = TokenMemory(capacity=6, pruner=DTD(threshold=0.99), recent_groups=1)
    for g in groups(5):  # independent random groups: nothing is dropped
        mem.add(g)
    snap = mem.snapshot()
    assert snap.group.tolist() == [2, 2, 3, 3, 3, 3, 4, 4, 4, 4]
    assert snap.row.tolist()[:2] == [1, 1]


def test_random_store_is_the_largest_keys_of_a_seeded_generator():
    frames = groups(10)
    mem = TokenMemory(capacity=7, pruner=get_pruner("random", seed=3), recent_groups=2)
    for g in frames:
        mem.add(g)
    gen = torch.Generator().manual_seed(3)
    keys = torch.cat([torch.rand(4, generator=gen) for _ in frames])
    graduated = keys[: 8 * 4]
    expected = torch.sort(torch.topk(graduated, 7).indices).values
    snap = mem.snapshot()
    flat = snap.group * 4 + snap.row * 2 + snap.col
    assert flat[~snap.recent].tolist() == expected.tolist()
    assert torch.equal(snap.score, keys[flat])


def test_random_is_deterministic_per_seed_and_differs_across_seeds():
    def run(seed: int) -> torch.Tensor:
        mem = TokenMemory(capacity=5, pruner=Random(seed=seed), recent_groups=0)
        for g in groups(8):
            mem.add(g)
        snap = mem.snapshot()
        return snap.group * 4 + snap.row * 2 + snap.col

    assert torch.equal(run(1), run(1))
    assert len({tuple(run(s).tolist()) for s in range(5)}) > 1


def test_random_sample_is_uniform_over_tokens():
    total, capacity, seeds = 24, 6, 300
    counts = torch.zeros(total)
    for seed in range(seeds):
        mem = TokenMemory(capacity=capacity, pruner=Random(seed=seed), recent_groups=0)
        for g in groups(6):
            mem.add(g)
        snap = mem.snapshot()
        counts[snap.group * 4 + snap.row * 2 + snap.col] += 1
    freq = counts / seeds
    assert float((freq - capacity / total).abs().max()) < 0.1  # each token: 0.25 +- 0.1
    assert torch.all(counts > 0)
