"""ForestPrune against docs/PRUNERS.md, "ForestPrune" (the paper's Sec. 3, Eq. 2-11 and Alg. 1):
hand-built forests, slow loop transcriptions, streaming."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pruning import FrameTokens, TokenMemory, get_pruner, pruner_params
from pruning.forestprune import (
    Forest,
    ForestPrune,
    build_forest,
    eviction_order,
    forestprune_select,
    keep_nodes,
    match_nodes,
    merge_roots,
    node_scores,
    select_nodes,
)
from pruning.similarity import normalize


# ---- slow transcriptions of docs/PRUNERS.md "ForestPrune", written from the text with loops ----

def slow_cos(a: list[float], b: list[float]) -> float:
    na = max(math.sqrt(sum(x * x for x in a)), 1e-6)
    nb = max(math.sqrt(sum(x * x for x in b)), 1e-6)
    return sum((x / na) * (y / nb) for x, y in zip(a, b))


def slow_node_scores(tokens: list[list[float]]) -> list[float]:
    n = len(tokens)
    a = [[slow_cos(tokens[i], tokens[j]) for j in range(n)] for i in range(n)]
    a = [[0.0 if v < 0.5 else v for v in row] for row in a]
    a = [[v / 0.03 for v in row] for row in a]
    a = [[-5000.0 if abs(v) < 1e-6 else v for v in row] for row in a]
    p = []
    for row in a:
        e = [math.exp(v - max(row)) for v in row]
        p.append([v / sum(e) for v in e])
    degree = [sum(1 for v in row if v > 0) for row in p]
    p5 = [[float(i == j) for j in range(n)] for i in range(n)]
    for _ in range(5):
        p5 = [[sum(p5[i][m] * p[m][j] for m in range(n)) for j in range(n)] for i in range(n)]
    norms = [math.sqrt(sum(x * x for x in t)) for t in tokens]
    score = [sum(norms[i] * p5[i][j] for i in range(n)) / degree[j] for j in range(n)]
    return [0.0 if math.isnan(s) else s for s in score]


def slow_select_nodes(tokens: list[list[float]], node_ratio: float) -> list[int]:
    s = slow_node_scores(tokens)
    return sorted(sorted(range(len(s)), key=lambda i: (-s[i], i))[: round(len(s) * node_ratio)])


def coord(pos: int, h: int, w: int) -> tuple[Fraction, Fraction]:
    r, c = divmod(pos, w)
    return (Fraction(r, h - 1) if h > 1 else Fraction(0), Fraction(c, w - 1) if w > 1 else Fraction(0))


def cheb(p: int, q: int, h: int, w: int) -> Fraction:
    (ra, ca), (rb, cb) = coord(p, h, w), coord(q, h, w)
    return max(abs(ra - rb), abs(ca - cb))


def slow_choose(cands: list[tuple[float, Fraction, int]]) -> int:
    """Feasible (cos, distance, tree) -> the tree: best cos per tree, then its smallest distance
    among those best-cos nodes, then the lowest tree id."""
    best: dict[int, tuple[float, Fraction]] = {}
    for c, d, tr in cands:
        if tr not in best or c > best[tr][0] or (c == best[tr][0] and d < best[tr][1]):
            best[tr] = (c, d)
    return min(best, key=lambda tr: (-best[tr][0], best[tr][1], tr)) if best else -1


def slow_forest(video: torch.Tensor, nodes: list[list[int]], tau_s: float, tau_p: float) -> dict[int, list[int]]:
    """flat -> [tree (root flat), depth, parent flat]."""
    t_len, h, w, _ = video.shape
    n = h * w
    feat = video.reshape(t_len * n, -1).tolist()
    lim = 1 - Fraction(str(tau_p))
    info: dict[int, list[int]] = {}
    tail: dict[int, int] = {}
    earlier: list[int] = []
    for t in range(t_len):
        flats = [t * n + p for p in sorted(nodes[t])]
        for f in flats:
            cands = []
            for g in earlier:
                c, d = slow_cos(feat[f], feat[g]), cheb(f % n, g % n, h, w)
                if c >= tau_s and d <= lim:
                    cands.append((c, d, info[g][0]))
            tr = slow_choose(cands)
            info[f] = [f, 0, -1] if tr < 0 else [tr, info[tail[tr]][1] + 1, tail[tr]]
        for f in flats:
            tail[info[f][0]] = f
        earlier += flats
    return info


def slow_merge(info: dict[int, list[int]], feat: list[list[float]], k: int) -> None:
    roots = sorted(f for f, (_, d, _) in info.items() if d == 0)
    while len(roots) > max(k, 1):
        best = None
        for a in range(len(roots)):
            for b in range(a + 1, len(roots)):
                c = slow_cos(feat[roots[a]], feat[roots[b]])
                if best is None or c > best[0]:
                    best = (c, roots[a], roots[b])
        _, i, j = best
        tj, ti = info[j][0], info[i][0]
        for v in info.values():
            if v[0] == tj:
                v[0], v[1] = ti, v[1] + 1
        info[j][2] = i
        roots.remove(j)


def slow_forestprune(video: torch.Tensor, ratio: float, tau_s: float, tau_p: float, node_ratio: float) -> list[int]:
    t_len, h, w, d = video.shape
    n = h * w
    nodes = [slow_select_nodes(video[t].reshape(n, d).tolist(), node_ratio) for t in range(t_len)]
    info = slow_forest(video, nodes, tau_s, tau_p)
    k = min(round(len(info) * ratio / node_ratio), len(info))
    slow_merge(info, video.reshape(t_len * n, d).tolist(), k)
    return sorted(sorted(info, key=lambda f: (info[f][1] + (f // n) / 1000, f))[:k])


# ---- inputs ----

def e(i: int, d: int = 4) -> list[float]:
    return [float(j == i) for j in range(d)]


def unit(*vs: list[float]) -> list[float]:
    s = [sum(x) for x in zip(*vs)]
    return [x / math.sqrt(sum(y * y for y in s)) for x in s]


def video_of(groups: list[list[list[float]]], h: int, w: int) -> torch.Tensor:
    return torch.tensor(groups, dtype=torch.float32).reshape(len(groups), h, w, -1)


def clip(seed: int, t: int = 6, h: int = 3, w: int = 3, d: int = 6, noise: float = 0.15,
         cut: int | None = None) -> torch.Tensor:
    """A drifting scene (and a cut): neighbouring groups are similar at the same position."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(h, w, d, generator=g)
    frames = []
    for i in range(t):
        if i == cut:
            base = torch.randn(h, w, d, generator=g)
        base = base + noise * torch.randn(h, w, d, generator=g)
        frames.append(base.clone())
    return torch.stack(frames)


def forest_dict(f: Forest) -> dict[int, list[int]]:
    return {int(x): [int(a), int(b), int(c)] for x, a, b, c in zip(f.flat, f.tree, f.depth, f.parent)}


def all_nodes(video: torch.Tensor) -> list[torch.Tensor]:
    return [torch.arange(video.shape[1] * video.shape[2])] * video.shape[0]


# ---- step 1: node pre-selection ----

@pytest.mark.parametrize("seed", range(6))
def test_node_scores_match_slow_transcription(seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(9, 3, generator=g) * torch.rand(9, 1, generator=g) * 3
    want = slow_node_scores(tokens.tolist())
    assert torch.allclose(node_scores(tokens), torch.tensor(want), rtol=1e-4, atol=1e-6)
    for ratio in (0.5, 0.3, 1.0):
        assert select_nodes(tokens, ratio).tolist() == slow_select_nodes(tokens.tolist(), ratio)


def test_node_scores_hand_built():
    # Two identical tokens of norm 2 and one orthogonal of norm 1: the pair's graph is a
    # 2-clique (P = 1/2 each, degree 2), the single has only itself (P = 1, degree 1).
    tokens = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(node_scores(tokens), torch.tensor([1.0, 1.0, 1.0]))
    # A zero token has no edge at all: its row is uniform (degree 2) and its norm is 0.
    assert torch.allclose(node_scores(torch.tensor([[1.0, 0.0], [0.0, 0.0]])), torch.tensor([1.0, 0.0]))
    # Ties go to the lower index; nodes come back in raster order; round(4.5) = 4.
    assert select_nodes(torch.ones(9, 2), 0.5).tolist() == [0, 1, 2, 3]


# ---- step 2: forest ----

def test_forest_hand_built_parents_and_depths():
    # 1x3 grid, coordinates 0, .5, 1: tau_p = .5 reaches neighbours, not the far end.
    video = video_of([[e(0), e(1), e(2)], [e(0), e(0), e(3)], [e(0), e(3), e(1)]], 1, 3)
    got = forest_dict(build_forest(video, all_nodes(video), tau_s=0.9, tau_p=0.5))
    assert got == {
        0: [0, 0, -1], 1: [1, 0, -1], 2: [2, 0, -1],
        3: [0, 1, 0],  # same position as 0
        4: [0, 1, 0],  # through 0 at distance .5; the parent is tree 0's tail before group 1
        5: [5, 0, -1],  # e3 is new: a root
        6: [0, 2, 4],  # tree 0's tail became 4, the highest index it gained in group 1
        7: [5, 1, 5],
        8: [1, 1, 1],
    }


def test_forest_spatial_gate():
    video = video_of([[e(0), e(1), e(2)], [e(1), e(2), e(0)]], 1, 3)
    got = forest_dict(build_forest(video, all_nodes(video), tau_s=0.9, tau_p=0.5))
    assert got[3] == [1, 1, 1] and got[4] == [2, 1, 2]
    assert got[5] == [5, 0, -1]  # its twin is at distance 1 > 1 - tau_p
    # A bound met exactly counts: on a 16-wide row, 3 cells is 3/15 = 1 - 0.8.
    row = [[e(0)] + [e(1)] * 15, [e(1)] * 3 + [e(0)] + [e(1)] * 12]
    got = forest_dict(build_forest(video_of(row, 1, 16), [torch.tensor([0]), torch.tensor([3])], 0.9, 0.8))
    assert got[19] == [0, 1, 0]
    row[1] = [e(1)] * 4 + [e(0)] + [e(1)] * 11
    got = forest_dict(build_forest(video_of(row, 1, 16), [torch.tensor([0]), torch.tensor([4])], 0.9, 0.8))
    assert got[20] == [20, 0, -1]


def test_forest_tie_rules():
    s = unit(e(0), e(2))  # cos 1/sqrt(2) to both e0 and e2
    video = video_of([[e(0), e(1), e(2)], [s, s, unit(e(1), e(2))]], 1, 3)
    got = forest_dict(build_forest(video, all_nodes(video), tau_s=0.5, tau_p=0.0))
    assert got[3][0] == 0  # equal cos to trees 0 and 2: distance 0 beats 1
    assert got[4][0] == 0  # equal cos, equal distance .5: the lower tree id
    assert got[5][0] == 2  # equal cos to trees 1 and 2: tree 2 is at distance 0
    # A tree's best node decides: tree 0 has a .8 node (a) and a .99 node (b), tree 1 one .95
    # node (c). On a 1x3 row with tau_p .5, b (under a) cannot reach c at the far end.
    a, b, c, z = [0.8, 0.6, 0.0, 0.0], [0.99, 0.0, 0.141067, 0.0], [0.95, 0.0, 0.0, 0.31225], [0.0] * 4
    video = video_of([[a, z, c], [b, z, z], [z, e(0), z]], 1, 3)
    got = forest_dict(build_forest(video, [torch.tensor([0, 2]), torch.tensor([0]), torch.tensor([1])], 0.5, 0.5))
    assert got[3] == [0, 1, 0] and got[7] == [0, 2, 3]
    # The distance tie-break looks only at each tree's best-cos nodes: on a 1x5 row, tree 0 has
    # a .95 node at .5 and a .7 node at 0, tree 3 a .95 node at .25, so tree 3 wins.
    a1, b, a2 = [0.95, 0.3122, 0.0, 0.0], [0.95, -0.3122, 0.0, 0.0], [0.7, 0.7141, 0.0, 0.0]
    video = video_of([[a1, z, z, b, z], [z, z, a2, z, z], [z, z, e(0), z, z]], 1, 5)
    got = forest_dict(build_forest(video, [torch.tensor([0, 3]), torch.tensor([2]), torch.tensor([2])], 0.5, 0.0))
    assert got[7] == [0, 1, 0] and got[12] == [3, 1, 3]


@st.composite
def matching_case(draw):
    h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    pos = st.integers(0, h * w - 1)
    held = draw(st.lists(st.tuples(st.integers(0, 1), st.one_of(pos, st.just(-1)), st.integers(0, 3)), max_size=12))
    new = draw(st.lists(st.tuples(st.integers(0, 1), pos), min_size=1, max_size=5))
    return h, w, held, new, draw(st.sampled_from([0.0, 0.25, 0.5, 0.8, 1.0]))


@settings(max_examples=150, deadline=None)
@given(matching_case())
@example((1, 3, [(0, 0, 0), (0, 1, 1)], [(0, 1)], 0.0))  # the closer tree wins over the lower id
def test_match_nodes_against_slow_rule(case):
    # One-hot features make cos exactly 0 or 1, so ties in cos, distance and tree are common.
    h, w, held, new, tau_p = case
    lim = 1 - Fraction(str(tau_p))
    hx = torch.tensor([e(b, 3) for b, _, _ in held]).reshape(len(held), 3)
    nx = torch.tensor([e(b, 3) for b, _ in new])
    held_pos = torch.tensor([p for _, p, _ in held], dtype=torch.long)
    held_tree = torch.tensor([t for _, _, t in held], dtype=torch.long)
    tree, sim = match_nodes(nx, torch.tensor([p for _, p in new]), hx, held_pos, held_tree, (h, w), 0.9, tau_p)
    for i, (b, p) in enumerate(new):
        cands = [(float(b == hb), cheb(p, hp, h, w), ht) for hb, hp, ht in held
                 if hp >= 0 and b == hb and cheb(p, hp, h, w) <= lim]
        assert int(tree[i]) == slow_choose(cands)
    assert sim.shape == (len(new), len(held))


# ---- steps 3 and 4 ----

def test_merge_roots_hand_built():
    # Roots a, b, u, v with cos(a,u) = .8, cos(b,v) = .743, the rest 0; group 1 repeats them.
    a, b = e(0), e(1)
    u, v = unit(e(0), [0.0, 0.0, 0.75, 0.0]), unit(e(1), [0.0, 0.0, 0.0, 0.9])
    video = video_of([[a, b, u, v], [a, b, u, v]], 1, 4)
    forest = build_forest(video, all_nodes(video), tau_s=0.9, tau_p=1.0)
    xn = normalize(video.reshape(8, 4))
    got = forest_dict(merge_roots(forest, xn, 3))
    assert got[2] == [0, 1, 0] and got[6] == [0, 2, 2]  # u's whole tree goes one level down
    assert got[3] == [3, 0, -1]
    got = forest_dict(merge_roots(forest, xn, 2))
    assert got[3] == [1, 1, 1] and got[7] == [1, 2, 3]
    assert forest_dict(merge_roots(forest, xn, 4)) == forest_dict(forest)


def test_merge_roots_tie_takes_lowest_pair():
    # Three equal roots: (0,1) merges first, then (0,2): both children of 0, not a chain.
    video = video_of([[e(0), e(0), e(0)]], 1, 3)
    forest = build_forest(video, all_nodes(video))
    got = forest_dict(merge_roots(forest, normalize(video.reshape(3, 4)), 1))
    assert got == {0: [0, 0, -1], 1: [0, 1, 0], 2: [0, 1, 0]}


def test_keep_order_depth_then_group_then_index():
    t = torch.tensor
    forest = Forest(flat=t([0, 1, 4, 5, 8, 9]), group=t([0, 0, 1, 1, 2, 2]), tree=t([0, 1, 0, 5, 0, 9]),
                    depth=t([0, 0, 1, 0, 2, 0]), parent=t([-1, -1, 0, -1, 4, -1]))
    assert keep_nodes(forest, 3).tolist() == [0, 1, 5]
    assert keep_nodes(forest, 4).tolist() == [0, 1, 5, 9]
    assert keep_nodes(forest, 5).tolist() == [0, 1, 4, 5, 9]
    assert keep_nodes(forest, 0).tolist() == []


@pytest.mark.parametrize("seed,ratio,tau_s,tau_p,noise,d", [
    (0, 0.1, 0.9, 0.8, 0.15, 6), (1, 0.25, 0.9, 0.5, 0.15, 6), (2, 0.2, 0.6, 0.5, 0.15, 6),
    (3, 0.4, 0.6, 0.0, 0.15, 6), (4, 0.5, 0.9, 0.5, 0.15, 6), (5, 0.05, 0.7, 0.5, 0.15, 6),
    (6, 0.1, 0.9, 0.5, 0.4, 6), (7, 0.15, 0.8, 0.5, 0.5, 4), (8, 0.1, 0.7, 0.0, 0.5, 3), (9, 0.2, 0.8, 0.8, 0.3, 4),
])
def test_forestprune_select_matches_slow_transcription(seed, ratio, tau_s, tau_p, noise, d):
    # Cases 5-9 have more roots than K (merging) and 7, 8 joins across positions.
    video = clip(seed, cut=3 if seed % 2 else None, noise=noise, d=d)
    got = forestprune_select(video, ratio, tau_s=tau_s, tau_p=tau_p)
    assert got.tolist() == slow_forestprune(video, ratio, tau_s, tau_p, 0.5)
    assert got.dtype == torch.long


def test_forestprune_select_contract():
    video = clip(7, t=4)
    assert forestprune_select(video, 1.0, node_ratio=0.5).numel() == 4 * 4  # all nodes, round(4.5) = 4
    assert forestprune_select(video, 0.0).numel() == 0
    with pytest.raises(ValueError):
        forestprune_select(video[0], 0.1)
    with pytest.raises(ValueError):
        forestprune_select(video, 0.1, node_ratio=0.0)


# ---- streaming ----

class Recording(ForestPrune):
    """ForestPrune that keeps a copy of what it said and what it was shown."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.scores = []
        self.evictions = []

    def score(self, group):
        out = super().score(group)
        self.scores.append(out)
        return out

    def evict(self, store, capacity):
        seen = {k: v.clone() for k, v in store.meta.items()} | {"group": store.group.clone()}
        keep = super().evict(store, capacity)
        self.evictions.append((seen, keep.clone()))
        return keep


def stream(video: torch.Tensor, pruner: ForestPrune, capacity: int, recent: int) -> tuple[TokenMemory, list[int]]:
    mem = TokenMemory(capacity=capacity, pruner=pruner, recent_groups=recent)
    n = video.shape[1] * video.shape[2]
    sizes = []
    for t in range(video.shape[0]):
        mem.add(FrameTokens(index=t, pts=float(t), tokens=video[t]))
        sizes.append(len(mem))
        assert len(mem) <= capacity + recent * n
    return mem, sizes


def flat_of(snap, w: int, n: int) -> torch.Tensor:
    return snap.group * n + snap.row * w + snap.col


def test_registry_and_params():
    p = get_pruner("forestprune", tau_s=0.8)
    assert isinstance(p, ForestPrune) and p.name == "forestprune" and p.tau_s == 0.8
    assert pruner_params("forestprune") == {"tau_s": 0.9, "tau_p": 0.8, "node_ratio": 0.5, "chain_cap": 3}
    with pytest.raises(ValueError):
        ForestPrune(node_ratio=1.5)
    with pytest.raises(ValueError, match="chain_cap"):
        ForestPrune(chain_cap=2.5)
    assert ForestPrune(chain_cap=3.0).chain_cap == 3


def test_streaming_without_eviction_is_the_offline_forest():
    # Causal: the forest of the first t groups does not depend on later ones, so with room for
    # everything each group's ingest meta equals the offline forest's, prefix by prefix.
    video = clip(11, t=8, h=4, w=4, d=8, cut=5)
    pruner = Recording(tau_s=0.8, tau_p=0.5)
    stream(video, pruner, capacity=10_000, recent=2)
    n = 16
    nodes = [select_nodes(video[t].reshape(n, -1)) for t in range(8)]
    offline = forest_dict(build_forest(video, nodes, tau_s=0.8, tau_p=0.5))
    node_flat = {}
    for t, s in enumerate(pruner.scores):
        assert torch.nonzero(s.keep).flatten().tolist() == nodes[t].tolist()
        for pos in nodes[t].tolist():
            node_flat[int(s.meta["node"][pos])] = t * n + pos
        for pos in nodes[t].tolist():
            f = t * n + pos
            assert node_flat[int(s.meta["tree"][pos])] == offline[f][0]
            assert int(s.meta["depth"][pos]) == offline[f][1]
            assert float(s.score[pos]) == -offline[f][1]
        assert bool((s.score[~s.keep] == -math.inf).all())
        assert bool((s.meta["depth"][~s.keep] == -1).all())
    assert pruner.evictions == []


def slow_eviction_order(tree: list[int], depth: list[int], group: list[int], cap: int) -> list[tuple]:
    """docs/PRUNERS.md, ForestPrune streaming departure 3, as sort keys (lowest kept first):
    roots and each tree's `cap` first nodes below its root by (depth, newer group) in tier 0 by
    (depth, newer group); the rest in tier 1 by (most trailing zero bits of depth, newer group)."""
    keys = [None] * len(tree)
    for t in set(tree):
        mine = sorted((i for i in range(len(tree)) if tree[i] == t and depth[i] > 0), key=lambda i: (depth[i], -group[i], i))
        for i in range(len(tree)):
            if tree[i] == t and depth[i] == 0:
                keys[i] = (0, 0, -group[i])
        for rank, i in enumerate(mine):
            if rank < cap:
                keys[i] = (0, depth[i], -group[i])
            else:
                zeros = next(b for b in range(64) if depth[i] >> b & 1)
                keys[i] = (1, -zeros, -group[i])
    return keys


def slow_keep(keys: list[tuple], capacity: int) -> list[int]:
    return sorted(sorted(range(len(keys)), key=lambda i: (keys[i], i))[:capacity])


def test_eviction_order_hand_built():
    t = torch.tensor
    # Tree 0 spans groups 0-9 (depth = group), tree 10 has a root and a node at group 9, tree 20
    # is a root at group 9. Cap 1: the roots and tree 0's depth 1 are tier 0; its depths 8, 4 (stride
    # 8 then 4) lead tier 1, then 6 and 2 (stride 2, the newer first).
    tree = t([0] * 10 + [10, 10, 20])
    depth = t(list(range(10)) + [0, 1, 0])
    group = t(list(range(10)) + [8, 9, 9])
    keys = eviction_order(tree, depth, group, 1)
    order = sorted(range(13), key=lambda i: (int(keys[i]), i))
    assert order[:5] == [12, 10, 0, 11, 1]  # roots (the newer first), then depth 1 (the newer first)
    assert order[5:9] == [8, 4, 6, 2]
    assert slow_keep(slow_eviction_order(tree.tolist(), depth.tolist(), group.tolist(), 1), 9) == \
        sorted(order[:9])
    assert eviction_order(t([], dtype=torch.long), t([], dtype=torch.long), t([], dtype=torch.long), 4).numel() == 0


def test_eviction_ties_go_to_recent_groups():
    # Four one-node trees at depth 0 and four at depth 1, groups 0-3: capacity 6 keeps the roots
    # and the depth-1 nodes of the two newest groups (offline's depth + t/1000 would keep 0, 1).
    tree = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    depth = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    group = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    keys = eviction_order(tree, depth, group, 4)
    kept = sorted(sorted(range(8), key=lambda i: (int(keys[i]), i))[:6])
    assert kept == [0, 1, 2, 3, 6, 7]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 9), st.integers(0, 20)), min_size=1, max_size=30),
       st.integers(0, 4), st.integers(0, 30))
def test_eviction_order_against_slow_rule(rows, cap, capacity):
    tree, depth, group = (list(x) for x in zip(*rows))
    keys = eviction_order(torch.tensor(tree), torch.tensor(depth), torch.tensor(group), cap)
    got = sorted(sorted(range(len(rows)), key=lambda i: (int(keys[i]), i))[:capacity])
    assert got == slow_keep(slow_eviction_order(tree, depth, group, cap), capacity)


def fixed_camera(h: int, w: int, d: int, t: int, movers: int, seed: int = 0) -> list[torch.Tensor]:
    """A fixed camera: a still background with sensor noise (same-position cos ~0.998, so its
    trees span the whole stream) and `movers` positions a group showing something new."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(h, w, d, generator=g)
    out = []
    for _ in range(t):
        x = base + 0.05 * torch.randn(h, w, d, generator=g)
        x.view(h * w, d)[torch.randperm(h * w, generator=g)[:movers]] = 1.5 * torch.randn(movers, d, generator=g)
        out.append(x)
    return out


def test_streaming_evicts_by_the_order_and_the_chain_cap_holds(monkeypatch):
    # Every eviction keeps exactly the first `capacity` rows of `eviction_order` on the pruner's
    # current trees and depths, which the slow rule agrees with; no tree holds more than its root
    # and `chain_cap` nodes while another tree's first `chain_cap` were evicted.
    import pruning.forestprune as fp

    seen = []

    def recording(tree, depth, group, cap):
        keys = eviction_order(tree, depth, group, cap)
        seen.append((tree.clone(), depth.clone(), group.clone(), keys))
        return keys

    monkeypatch.setattr(fp, "eviction_order", recording)
    pruner = Recording(tau_p=0.5, chain_cap=2)
    stream(torch.stack(fixed_camera(4, 4, 8, 40, 1)), pruner, capacity=60, recent=2)
    capped = 0
    for (tree, depth, group, keys), (_, keep) in zip(seen, pruner.evictions):
        slow = slow_eviction_order(tree.tolist(), depth.tolist(), group.tolist(), 2)
        assert keep.tolist() == slow_keep(slow, 60)
        kept_over = any(slow[i][0] == 1 for i in keep.tolist())
        lost_under = any(slow[i][0] == 0 for i in set(range(len(slow))) - set(keep.tolist()))
        assert not (kept_over and lost_under)
        sizes = torch.unique(tree[keep], return_counts=True)[1]
        capped += int(sizes.max()) <= 3 and int(torch.unique(tree, return_counts=True)[1].max()) > 3
    assert len(seen) == len(pruner.evictions) >= 30 and capped >= 10


@pytest.mark.parametrize("frac,most", [(0.10, 0.40), (0.25, 0.26)])
def test_age_profile_of_a_fixed_camera_follows_the_stream(frac, most):
    # A fixed camera's background trees span the whole stream. Depth order alone keeps their
    # prefixes, the oldest groups (measured: 0.56 and 0.54 of the store from the oldest quarter);
    # the chain cap spreads what a long tree holds over its span (0.36 and 0.23).
    feats = fixed_camera(6, 6, 16, 200, 2)
    capacity = int(frac * 200 * 36) - 4 * 36

    def oldest_quarter(pruner) -> float:
        mem, _ = stream(torch.stack(feats), pruner, capacity=capacity, recent=4)
        snap = mem.snapshot()
        g = snap.group[~snap.recent]
        assert g.numel() == capacity
        return float((g < 50).float().mean())

    assert oldest_quarter(ForestPrune()) <= most
    assert oldest_quarter(ForestPrune(chain_cap=10**9)) >= 0.5  # no cap: ties toward newer groups are not enough


def test_streaming_matches_only_held_nodes():
    # Capacity 1 holds one of group 0's two roots (the later one is demoted: step 3). Group 1
    # repeats group 0: the repeat of the held root joins its tree; the repeat of the evicted one
    # finds nothing held and roots a new tree, where offline it would join tree 1.
    video = video_of([[e(0), e(1)], [e(0), e(1)]], 1, 2)
    pruner = Recording(tau_p=0.0, node_ratio=1.0)
    stream(video, pruner, capacity=1, recent=0)
    g1 = pruner.scores[1]
    assert g1.meta["node"].tolist() == [2, 3]
    assert g1.meta["tree"].tolist() == [0, 3] and int(g1.meta["depth"][1]) == 0
    assert forest_dict(build_forest(video, all_nodes(video), tau_p=0.0))[3] == [1, 1, 1]


def test_streaming_root_merge_demotes_the_redundant_root():
    # Group 0 has four roots; the third is almost the first. Over capacity 3 the store drops
    # that near-duplicate (a child of the first), not the later, novel fourth root.
    near = unit([1.0, 0.05, 0.0, 0.0])
    video = video_of([[e(0), e(1), near, e(2)]], 2, 2)
    mem, _ = stream(video, ForestPrune(node_ratio=1.0), capacity=3, recent=0)
    snap = mem.snapshot()
    assert flat_of(snap, 2, 4).tolist() == [0, 1, 3]


def test_streaming_demotion_moves_the_tree_below_its_partner():
    # Group 1 extends group 0's trees; then group 0's near-duplicate root is demoted into the
    # first root's tree: its child (still in the recent window) goes to depth 2 in that tree.
    near = unit([1.0, 0.05, 0.0, 0.0])
    g = [e(0), e(1), near, e(2)]
    video = video_of([g, g], 2, 2)
    pruner = ForestPrune(tau_p=0.0, node_ratio=1.0)
    stream(video, pruner, capacity=3, recent=1)
    held = pruner._held
    node = held["node"][held["valid"]].tolist()
    depth = dict(zip(node, held["depth"][held["valid"]].tolist()))
    tree = dict(zip(node, held["tree"][held["valid"]].tolist()))
    assert 2 not in depth  # the demoted root left the store
    assert (tree[6], depth[6]) == (0, 2)  # its child now hangs under root 0's tree
    assert (tree[4], depth[4]) == (0, 1) and (tree[7], depth[7]) == (3, 1)


def test_streaming_demotions_chain_through_a_demoted_partner():
    # b is nearly a, c nearly b, d new. Over capacity 1, b, c and d are demoted at once: b below
    # a; c below b, which is itself demoted, so into a's tree at b's depth + 1 + b's shift; d
    # below a (its partner among equal cosines 0: the lowest id). Group 1's nodes (still recent)
    # follow their trees; a's tree's tail becomes the deepest, so group 2 joins at depth 4.
    a, b, c, d = e(0), unit(e(0), [0.0, 0.3, 0.0, 0.0]), unit(e(0), [0.0, 0.3, 0.3, 0.0]), e(3)
    video = video_of([[a, b, c, d]] * 3, 2, 2)
    pruner = Recording(tau_p=0.0, node_ratio=1.0)
    mem, _ = stream(video[:2], pruner, capacity=1, recent=1)
    g1 = pruner.scores[1]
    assert g1.meta["tree"].tolist() == [0, 1, 2, 3] and g1.meta["depth"].tolist() == [1, 1, 1, 1]
    held = pruner._held
    node = held["node"][held["valid"]].tolist()
    placed = dict(zip(node, zip(held["tree"][held["valid"]].tolist(), held["depth"][held["valid"]].tolist())))
    assert placed == {0: (0, 0), 4: (0, 1), 5: (0, 2), 6: (0, 3), 7: (0, 2)}
    mem.add(FrameTokens(index=2, pts=2.0, tokens=video[2]))
    g2 = pruner.scores[2]
    assert g2.meta["tree"].tolist() == [0, 0, 0, 0] and g2.meta["depth"].tolist() == [4, 4, 4, 4]


def test_ingest_reads_nothing_back():
    # On a device every read-back stalls the camera's thread. Neither score nor evict reads
    # anything back, through evictions and demotions: the held-node product spans the host's
    # bound on the used slots.
    from pruning.host_sync import HostSyncs

    pruner = ForestPrune(tau_p=0.5)
    counts = {"score": [], "evict": []}
    for name in counts:
        inner = getattr(pruner, name)

        def counted(*args, _inner=inner, _name=name):
            with HostSyncs() as syncs:
                out = _inner(*args)
            counts[_name].append(syncs.total)
            return out

        setattr(pruner, name, counted)
    video = clip(5, t=24, h=4, w=4, d=8, noise=0.4, cut=12)
    stream(video, pruner, capacity=12, recent=2)
    assert len(counts["score"]) == 24 and max(counts["score"]) == 0
    assert len(counts["evict"]) >= 15 and max(counts["evict"]) == 0


@pytest.mark.parametrize("recent,measured", [(0, 0.63), (4, 0.82)])
def test_streaming_overlaps_offline(recent, measured):
    # A drifting 32-group clip with a cut, budget 10% of its tokens: the share of the offline
    # selection that the long-term store holds at the end. Without a recent window every node
    # leaves matching range at once, so a drifting tree loses its trunk and restarts as a root;
    # four recent groups keep the trunks. Offline keeps the earlier group among equal depths,
    # streaming the newer (its age profile follows the stream): 0.98 before that rule, 0.82 after.
    video = clip(21, t=32, h=8, w=8, d=32, noise=0.3, cut=12)
    offline = forestprune_select(video, 0.1)
    mem, _ = stream(video, ForestPrune(), capacity=offline.numel(), recent=recent)
    snap = mem.snapshot()
    got = set(flat_of(snap, 8, 64)[~snap.recent].tolist())
    overlap = len(got & set(offline.tolist())) / offline.numel()
    assert overlap >= measured - 0.03


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), capacity=st.integers(1, 12), recent=st.integers(0, 3),
       node_ratio=st.sampled_from([0.25, 0.5, 1.0]), tau_s=st.sampled_from([0.5, 0.9]))
def test_streaming_held_set_tracks_the_memory(seed, capacity, recent, node_ratio, tau_s):
    # What the pruner believes is held is exactly the nodes the memory holds, after every group,
    # through evictions and demotions; a root is always the root of its own tree.
    video = clip(seed, t=10, h=3, w=3, d=4, noise=0.3, cut=5)
    pruner = ForestPrune(tau_s=tau_s, tau_p=0.5, node_ratio=node_ratio)
    mem = TokenMemory(capacity=capacity, pruner=pruner, recent_groups=recent)
    for t in range(video.shape[0]):
        mem.add(FrameTokens(index=t, pts=float(t), tokens=video[t]))
        snap = mem.snapshot()
        held = pruner._held
        node = held["node"][held["valid"]]
        assert sorted(node.tolist()) == sorted(snap.meta["node"][snap.meta["node"] >= 0].tolist())
        roots = held["depth"][held["valid"]] == 0
        assert bool((held["tree"][held["valid"]][roots] == node[roots]).all())
        assert len(mem) <= capacity + recent * 9
