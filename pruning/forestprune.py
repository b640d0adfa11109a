"""ForestPrune: keep the roots and trunks of spatial-temporal token trees (docs/PRUNERS.md,
"ForestPrune").

Paper: "ForestPrune: High-ratio Visual Token Compression for Video Multimodal Large Language
Models via Spatial-Temporal Forest Modeling", Sec. 3; where the paper is loose, the authors'
released code decides. Offline, `forestprune_select` implements:
1. Node pre-selection per group (Sec. 3.1; Table 3 and Sec. 4.1: G-Prune nodes, 50% of each
   frame): graph propagation over the group's cosine graph as the authors' code does it, top
   round(N*node_ratio) tokens (`node_scores`).
2. Forest (Sec. 3.2, Alg. 1): a node joins a tree through a node of an earlier group (Eq. 5)
   with cos >= tau_s (Eq. 2, 4) and, as the authors' code has it, Chebyshev distance of
   normalised coordinates <= 1 - tau_p (Eq. 3-4; the paper writes an L2 distance <= tau_p). The
   tree is the one with the best such cos (the ranking of Eq. 7-8), the parent is its tail and
   depth counts the groups the tree spans (Alg. 1, LinkNode) (`match_nodes`, `grow_trees`).
3. When there are more trees than the budget K, roots are merged by similarity (end of
   Sec. 3.2) (`merge_roots`).
4. Leaves and tails of the deepest trees go first and the roots of earlier groups stay (Sec. 3.3,
   Eq. 10-11): keep the K smallest depth + t/1000 (`keep_nodes`).

Streaming (`ForestPrune`) departs from offline here, each time because the memory is bounded and
only the past is known:
- A new node matches only nodes still held in memory (learned from the rows `evict` keeps, plus
  the groups not yet evicted), not every earlier node: evicted features are gone.
- The parent is still the tree's tail when that tail was evicted, so depth keeps meaning "groups
  the tree spans", as offline.
- Step 4 becomes eviction, ordered so that the memory's age profile follows the stream. Offline
  (Sec. 3.3: leaves and tails go first, ties to earlier groups) keeps every tree's prefix, its
  earliest nodes; in a stream whose trees span hours that is the oldest quarter. Kept first: the
  roots and each tree's `chain_cap` shallowest nodes below its root, by (current depth, newer
  group first); then the other nodes by the coarsest power-of-two stride of their depth (depth
  512 before 256 before 768 ...), newer first among equals, so what a long tree holds beyond
  its cap spreads over its whole span. Measured with `fixed_camera` (tests/test_forestprune.py:
  a still background whose trees span the stream, a few new tokens a group; 12x12x32, 400
  groups, 4 recent groups), share of the store from the oldest quarter at 10% / 25%: 0.65 / 0.52
  with offline's order, the same with ties toward newer groups alone (a still tree's depth-d
  node is always group d), 0.24 / 0.18 with this order; a hard cap of 8 nodes a tree instead
  left 6% / 64% of the budget unused. video_like_features without cuts (16x16x256, 600 groups,
  moving 0.02) at 5%: 0.38 -> 0.20. On the recall benchmark's streams event recall is unchanged
  (seeds 0-1, 2-25%), the oldest quarter 0.25-0.31 -> 0.23-0.31. Cost: two stable sorts of all
  the store's rows per eviction (sorting only the non-root rows would need their count on the
  host).
- Step 3 runs at eviction, over the store's roots, when they alone exceed the capacity. Offline
  merges the globally most similar pair of roots repeatedly, O(R^2 D) per eviction, too slow
  for a live store. Instead each root records, at ingest, its most similar earlier root held then
  (one more read of the per-group product) and that cosine; the most redundant roots are demoted
  first (ties: the later one): a demoted root becomes a child of that partner when it is still
  held (its tree joins the partner's, depths shift below it, and the deeper tail stays the tail),
  else its tree just goes one level down. The recorded cosine is not refreshed when the partner
  leaves, so it is an upper bound of the root's current redundancy. How many roots go is known
  only on the device, so this runs on every eviction (usually demoting none) over a padded list
  as long as the rows over the capacity; a root whose partner's tree is demoted with it follows
  that tree to its final place (pointer jumping over the list, log2 of its length in rounds).
- `meta` (tree, depth, node id) and `score` (-depth) are fixed at ingest; merges move the pruner's
  own depths, which `evict` uses, but not rows already in the memory.
- Nodes of a different token grid (a resolution change) never match: distances are not comparable.
- `reset` keeps the forest: the memory still holds its tokens and nothing here needs the
  previous group.
- Still old-leaning: when the store's roots alone exceed it, the recorded redundancy decides which
  roots stay, and a root recorded against few held roots (early in the stream) looks less
  redundant, so a store of roots only (video_like_features with cuts every 60 groups, 5%) keeps
  0.34 of itself from the oldest quarter. Not changed here.
On a device (`TokenMemory(device=...)`) a group's score and evict read nothing back (counted,
and run on `meta`, in tests/test_memory_device.py). The held-node product spans a bound the
host keeps on the used slots (their high-water mark, `_Held.hi`), not the exact used prefix,
which only the data (the slots eviction freed) determines and which cost one read-back per
group until 2026-11-30. A product's per-element rounding may depend on its width, so a cosine
may differ in its last bit from the exact prefix's; measured against that code, every
snapshot, tree and depth was the same on 1,800 groups of 20 stream x configuration runs (the
widths differed in 1,065 of them) and on 160 groups at 16x16x3584 (capacity 8192, where the
two widths settle equal, 8832, and `TokenMemory.add` costs the same, 47 ms). Everything else
has sizes known on the host: matching is masked reductions over the whole product, a tree's
tail depth is a column of its held nodes (a tree with no held node can never be joined again),
the store's rows are known to be the rows the last eviction kept, then the nodes of the groups
that left the recent window since (checked on the device, no search), and eviction sorts all
rows. Measured against the data-dependent code before (16x16x3584, capacity
8192, 4 recent groups, float32, store full, median of 15 groups, interleaved): `TokenMemory.add`
44.4 -> 43.6 ms on 2 threads (score 40.9 -> 39.8, evict 2.4 -> 2.8), 83.7 -> 80.8 ms on 1.
Measured (tests/test_forestprune.py, a drifting 32-group clip with a cut, budget 10%): the store
holds 0.63 of the offline pick without a recent window and 0.82 with four recent groups (0.98
before ties went to newer groups: offline keeps the earlier of equal depths). Cost: 44 ms per
group at Qwen2.5-VL-7B shapes with capacity 8192 on a 2-core Xeon, ~75% of it `match_nodes`'s
product with every held node (bench/results/prune_cost.md).
"""
from __future__ import annotations

import functools
import math
from collections import deque
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from .base import POSITIVE, GroupScore, ParamRange, Pruner, TokenSet, check_params
from .similarity import normalize, topk_indices
from .types import FrameTokens

MASKED_LOGIT = -5000.0  # the authors' logit for a missing edge before the row softmax
ZERO_EDGE = 1e-6  # |logit| below this counts as no edge
_BIG = torch.iinfo(torch.long).max
_NO_PARTNER = -4.0  # below any cosine: how a root without a recorded partner ranks in demotion


def _check(tau_s: float, tau_p: float, node_ratio: float) -> None:
    check_params(ForestPrune, tau_s=tau_s, tau_p=tau_p, node_ratio=node_ratio)


def eviction_order(tree: torch.Tensor, depth: torch.Tensor, group: torch.Tensor, chain_cap: int) -> torch.Tensor:
    """[n] int64 rank keys, lowest kept first: the roots and each tree's `chain_cap` shallowest
    nodes below its root (ties: newer group) by (depth, newer group); then the other nodes by the
    trailing zero bits of their depth, most first (a coarse stride over the tree's span), newer
    group first among equals. Every row is sorted, the roots in a run of their own that no rank
    is read from: sorting only the non-root rows would need their count on the host."""
    n = tree.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    late = group.max() - group
    span = late.max() + 1
    key = depth * span + late
    below = depth > 0
    order = torch.sort(key, stable=True).indices
    t = torch.where(below, tree, -1)[order]
    by_tree = torch.sort(t, stable=True).indices
    order, t = order[by_tree], t[by_tree]
    idx = torch.arange(n)
    start = torch.ones(n, dtype=torch.bool)
    start[1:] = t[1:] != t[:-1]
    rank = torch.empty_like(order)
    rank[order] = idx - torch.cummax(torch.where(start, idx, 0), 0).values
    over = below & (rank >= chain_cap)
    zeros = (depth & -depth).clamp_min(1).double().log2().round().long()
    return torch.where(over, key.max() + 1 + (63 - zeros) * span + late, key)


def propagate(cosm: torch.Tensor, norms: torch.Tensor, edge: float = 0.5, temperature: float = 0.03,
              steps: int = 5) -> torch.Tensor:
    """Step 1 from a group's cosine matrix [N, N] and token norms [N]: norms @ P^steps / degree.

    The row vector is pushed through P `steps` times, the same product as P^5 at O(N^2) each.
    """
    a = torch.where(cosm < edge, torch.zeros_like(cosm), cosm) / temperature
    a = torch.where(a.abs() < ZERO_EDGE, torch.full_like(a, MASKED_LOGIT), a)
    p = torch.softmax(a, dim=-1)
    degree = (p > 0).sum(-1)
    v = norms.float()
    for _ in range(steps):
        v = v @ p
    s = v / degree
    return torch.where(torch.isnan(s), torch.zeros_like(s), s)


def node_scores(tokens: torch.Tensor, edge: float = 0.5, temperature: float = 0.03, steps: int = 5) -> torch.Tensor:
    """Graph-propagation importance [N] of one group's tokens [N, D] (G-Prune, step 1)."""
    xn = normalize(tokens)
    return propagate(xn @ xn.T, tokens.float().norm(dim=-1), edge, temperature, steps)


def select_nodes(tokens: torch.Tensor, node_ratio: float = 0.5) -> torch.Tensor:
    """The group's nodes: top round(N * node_ratio) by `node_scores`, ascending (raster order)."""
    return topk_indices(node_scores(tokens), round(tokens.shape[0] * node_ratio))


def _spacing(grid: tuple[int, int]) -> tuple[int, int]:
    """H-1 and W-1, the denominators of normalised coordinates (1 on a one-cell axis, whose
    coordinate is always 0)."""
    return max(grid[0] - 1, 1), max(grid[1] - 1, 1)


@functools.lru_cache(maxsize=8)
def distance_table(grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """Chebyshev distance [N, N] between the normalised coordinates (row/(H-1), col/(W-1)) of
    two raster positions, exactly, as integers in units of 1/((H-1)(W-1)): equal offsets tie."""
    h, w = grid
    sy, sx = _spacing(grid)
    pos = torch.arange(h * w, device=device)
    row, col = pos // w, pos % w
    dr = (row[:, None] - row[None, :]).abs() * sx
    dc = (col[:, None] - col[None, :]).abs() * sy
    return torch.maximum(dr, dc)


def reach(grid: tuple[int, int], tau_p: float) -> int:
    """The largest `distance_table` entry with distance <= 1 - tau_p; a distance equal to the
    bound in exact arithmetic is inside (1 - 0.8 is 0.19999999999999996 in floating point)."""
    sy, sx = _spacing(grid)
    return math.floor((1.0 - tau_p) * sy * sx + 1e-9)


def match_nodes(new_xn: torch.Tensor, new_pos: torch.Tensor, held_xn: torch.Tensor, held_pos: torch.Tensor,
                held_tree: torch.Tensor, grid: tuple[int, int], tau_s: float, tau_p: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The tree each new node joins (-1: none feasible), and the cosine matrix [n, m] (step 2).

    Features are L2-normalised; positions are raster indices in `grid`, and a held position of
    -1 is never feasible. One matrix product against every held node; a held node is feasible
    with cos >= tau_s and distance <= 1 - tau_p. The tree with the best feasible cos wins, ties
    to the smallest distance among those nodes, then the lowest tree id.
    """
    rank, by_tree, _ = _tree_rank(held_tree)
    tree, _, sim = _match(new_xn, new_pos, held_xn, held_pos, held_tree, grid, tau_s, tau_p, rank, by_tree)
    return tree, sim


def _tree_rank(held_tree: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each held column's rank by tree id (equal ids in any order), the columns in that order,
    and each rank's run of equal ids (a number per tree, ascending)."""
    trees, by_tree = torch.sort(held_tree)
    rank = torch.empty_like(by_tree)
    rank[by_tree] = torch.arange(by_tree.numel())
    return rank, by_tree, torch.cumsum(torch.nn.functional.pad(trees[1:] != trees[:-1], (1, 0)), 0)


def _match(new_xn: torch.Tensor, new_pos: torch.Tensor, held_xn: torch.Tensor, held_pos: torch.Tensor,
           held_tree: torch.Tensor, grid: tuple[int, int], tau_s: float, tau_p: float, rank: torch.Tensor,
           by_tree: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`match_nodes` plus, for a joining node, a held column of the tree it joins (-1 when the
    product is empty), by reductions over the whole [n, m] product, so no size depends on the
    data: the best cos over reachable columns (found when >= tau_s), then among the columns with
    that cos the least (distance, tree) as one integer, distance * m + the column's `rank` by tree.
    One gather (of floats, several times faster than of integers here) brings distance * m, or
    -inf where out of reach: clamped at 0 it is the reach added to the cosines (0 or -inf), its
    magnitude the key (an unreachable column's +inf loses to any other). A column below the
    best cos moves its key past every reachable one (`_below_`). Arithmetic passes in place,
    about half the cost of a comparison and a select here; keys are whole numbers, exact."""
    n, m = new_xn.shape[0], held_xn.shape[0]
    sim = new_xn @ held_xn.T
    if sim.numel() == 0:
        none = torch.full((n,), -1, dtype=torch.long)
        return none, none, sim
    r = reach(grid, tau_p)
    exact = torch.float32 if (r + 2) * m <= 2**24 else torch.float64  # keys are whole numbers below 2^24 or 2^53
    dist = distance_table(grid, sim.device)[new_pos]
    dist = torch.nn.functional.pad(torch.where(dist <= r, (dist * m).to(exact), -math.inf), (0, 1), value=-math.inf)
    key = dist.index_select(1, torch.where(held_pos >= 0, held_pos, dist.shape[1] - 1))
    gated = key.clamp_max(0).to(sim.dtype).add_(sim)
    best = gated.amax(1, keepdim=True)
    found = best[:, 0] >= tau_s
    key = key.abs_().add_(rank.to(exact)).sub_(_below_(gated, best), alpha=(r + 2) * m)
    key = key.amin(1).clamp_max((r + 2) * m).long()
    column = torch.where(found, by_tree[key % m], -1)
    return torch.where(found, held_tree[column.clamp_min(0)], -1), column, sim


def grow_trees(choice: torch.Tensor, ids: torch.Tensor, tails: dict[int, tuple[int, int]]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attach one group's nodes (ids ascending) to the trees `match_nodes` chose: tree, depth, parent.

    `tails` maps tree id -> (tail node id, tail depth) and is updated: a joiner's parent is its
    tree's tail before this group, and afterwards the tail is the highest-id joiner. A node with
    no choice roots a new tree whose id is its own node id (so ids follow creation order).
    """
    rows = []
    new_tails: dict[int, tuple[int, int]] = {}
    for c, nid in zip(choice.tolist(), ids.tolist()):
        if c < 0:
            rows.append((nid, 0, -1))
        else:
            pid, pdepth = tails[c]
            rows.append((c, pdepth + 1, pid))
        new_tails[rows[-1][0]] = (nid, rows[-1][1])
    tails.update(new_tails)
    out = torch.tensor(rows, dtype=torch.long).reshape(-1, 3)
    return out[:, 0], out[:, 1], out[:, 2]


@dataclass(frozen=True)
class Forest:
    """Every node of a clip, ascending by flat index; tree ids are root flat indices."""

    flat: torch.Tensor
    group: torch.Tensor
    tree: torch.Tensor
    depth: torch.Tensor
    parent: torch.Tensor  # flat index of the parent, -1 for a root

    def __len__(self) -> int:
        return int(self.flat.shape[0])


def build_forest(video: torch.Tensor, nodes: list[torch.Tensor], tau_s: float = 0.9, tau_p: float = 0.8) -> Forest:
    """Step 2 over a clip [T, H, W, D] given each group's nodes (ascending raster indices)."""
    t_len, h, w, d = video.shape
    n = h * w
    flat = torch.cat([torch.zeros(0, dtype=torch.long)] + [t * n + idx.to(torch.long) for t, idx in enumerate(nodes)])
    xn = normalize(video.reshape(t_len * n, d)[flat])
    pos = flat % n
    tails: dict[int, tuple[int, int]] = {}
    tree, depth, parent = (torch.zeros_like(flat) for _ in range(3))
    start = 0
    for idx in nodes:
        sl = slice(start, start + idx.numel())
        choice, _ = match_nodes(xn[sl], pos[sl], xn[:start], pos[:start], tree[:start], (h, w), tau_s, tau_p)
        tree[sl], depth[sl], parent[sl] = grow_trees(choice, flat[sl], tails)
        start = sl.stop
    return Forest(flat=flat, group=flat // n, tree=tree, depth=depth, parent=parent)


def merge_roots(forest: Forest, xn: torch.Tensor, k: int) -> Forest:
    """Step 3: while more than k roots remain, the most similar pair of roots (cos of their
    normalised features `xn`, rows aligned with `forest`; ties to the lowest (earlier, later)
    pair) merges: the later root becomes a child of the earlier, its whole tree one level deeper.

    Each root keeps its best later partner; a merge only refreshes rows whose partner it removed.
    """
    roots = torch.nonzero(forest.depth == 0).flatten()
    alive = roots.numel()
    if alive <= max(k, 1):
        return forest
    sim = (xn[roots] @ xn[roots].T).masked_fill(~torch.ones(alive, alive, dtype=torch.bool).triu(1), -math.inf)
    best, partner = sim.max(1).values, sim.argmax(1)
    live = torch.ones(alive, dtype=torch.bool)
    tree, depth, parent = forest.tree.clone(), forest.depth.clone(), forest.parent.clone()
    while alive > max(k, 1):
        i = int(best.argmax())
        j = int(partner[i])
        moved = tree == tree[roots[j]]
        depth[moved] += 1
        tree[moved] = tree[roots[i]]
        parent[roots[j]] = forest.flat[roots[i]]
        live[j] = False
        sim[:, j] = -math.inf
        best[j] = -math.inf
        stale = torch.nonzero(live & (partner == j)).flatten()
        best[stale], partner[stale] = sim[stale].max(1).values, sim[stale].argmax(1)
        alive -= 1
    return replace(forest, tree=tree, depth=depth, parent=parent)


def keep_nodes(forest: Forest, k: int) -> torch.Tensor:
    """Step 4: flat indices of the k nodes with the smallest depth + t/1000, ascending."""
    key = forest.depth.double() + forest.group.double() / 1000.0
    return forest.flat[topk_indices(-key, k)]


def forestprune_select(video: torch.Tensor, ratio: float, tau_s: float = 0.9, tau_p: float = 0.8,
                       node_ratio: float = 0.5) -> torch.Tensor:
    """Offline ForestPrune on a clip [T, H, W, D]: ascending flat indices of the kept tokens.

    `ratio` is the kept fraction of T*H*W: K = round(#nodes * ratio / node_ratio), at most #nodes.
    """
    if video.ndim != 4:
        raise ValueError(f"video must be [T, H, W, D], got {tuple(video.shape)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    _check(tau_s, tau_p, node_ratio)
    t_len, h, w, d = video.shape
    nodes = [select_nodes(video[t].reshape(h * w, d), node_ratio) for t in range(t_len)]
    forest = build_forest(video, nodes, tau_s, tau_p)
    k = min(round(len(forest) * ratio / node_ratio), len(forest))
    xn = normalize(video.reshape(-1, d)[forest.flat])
    return keep_nodes(merge_roots(forest, xn, k), k)


class _Held:
    """Nodes the memory still holds, in reusable slots with their forest state.

    Freed slots are refilled lowest first, so the used slots stay near the prefix [:hi] that the
    per-group matrix product reads. The host knows how many nodes are held (`count`) and a bound
    `hi` on the used slots, their high-water mark (k new nodes take the lowest free slots, all
    below the count after them), so nothing is read back to size the product. `tail` is the
    depth of the node's tree's tail, the same on every held node of a tree: a tree no held node
    belongs to can never be joined again, so no per-tree table outlives its nodes.
    """

    COLUMNS = {"valid": torch.bool, "node": torch.long, "tree": torch.long, "depth": torch.long,
               "pos": torch.long, "grid": torch.long, "redundancy": torch.float32,
               "partner": torch.long, "partner_slot": torch.long, "tail": torch.long}

    def __init__(self) -> None:
        self.size = 0
        self.count = 0
        self.hi = 0
        self.feat = torch.zeros(0, 0)
        self.cols = {name: torch.zeros(0, dtype=dt) for name, dt in self.COLUMNS.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        """Column `name` over the prefix [:hi] (a view: writes go to the buffer)."""
        return self.cols[name][: self.hi]

    def reserve(self, k: int, d: int) -> None:
        """Room for k more nodes of dimension d (the buffers double when full)."""
        if self.size and self.feat.shape[1] != d:
            raise ValueError(f"token dimension changed from {self.feat.shape[1]} to {d}")
        if self.size - self.count >= k and self.size:
            return
        size = max(2 * self.size, self.count + k, 64)
        feat = torch.zeros(size, d)
        if self.size:
            feat[: self.size] = self.feat
        self.feat = feat
        for name, old in self.cols.items():
            new = torch.zeros(size, dtype=old.dtype)
            if self.size:
                new[: self.size] = old
            self.cols[name] = new
        self.size = size

    def add(self, feat: torch.Tensor, **values: torch.Tensor) -> torch.Tensor:
        """Hold k new nodes; returns their slots."""
        k = feat.shape[0]
        self.reserve(k, feat.shape[1])
        slots = torch.nonzero_static(~self.cols["valid"], size=k).flatten()
        self.feat[slots] = feat
        self.cols["valid"][slots] = True
        for name, v in values.items():
            self.cols[name][slots] = v
        self.count += k
        self.hi = max(self.hi, self.count)
        return slots

    def free(self, slots: torch.Tensor, kept: torch.Tensor, gone: int) -> None:
        """Free `slots` where `kept` is False; `gone` of them."""
        self.cols["valid"][slots] = kept
        self.count -= gone


class ForestPrune(Pruner):
    """Streaming ForestPrune: trees grow as groups arrive; the store keeps each tree's shallowest
    nodes up to `chain_cap`, then long trees' further nodes at a coarse stride of depth.

    Non-node tokens are dropped when their group leaves the recent window (`keep` False). Each
    node carries meta `tree` (its root's node id), `depth` and `node` (a stream-wide node id).
    """

    name = "forestprune"
    paper = "ForestPrune: High-ratio Visual Token Compression for Video MLLMs via Spatial-Temporal Forest Modeling (2026)"
    param_ranges: ClassVar[dict[str, ParamRange]] = {"tau_s": (-1.0, 1.0), "tau_p": (0.0, 1.0), "node_ratio": (POSITIVE, 1.0),
                                                      "chain_cap": (0, None)}

    def __init__(self, *, tau_s: float = 0.9, tau_p: float = 0.8, node_ratio: float = 0.5, chain_cap: int = 3):
        _check(tau_s, tau_p, node_ratio)
        check_params(ForestPrune, chain_cap=chain_cap)
        if chain_cap != int(chain_cap):
            raise ValueError(f"chain_cap must be a whole number >= 0, got {chain_cap!r}")
        self.chain_cap = int(chain_cap)
        self.tau_s = float(tau_s)
        self.tau_p = float(tau_p)
        self.node_ratio = float(node_ratio)
        self._held = _Held()
        self._next_node = 0
        self._stored = torch.zeros(0, dtype=torch.long)  # slots of the store's rows, in row order
        self._pending: deque[torch.Tensor] = deque()  # slots of each scored group's nodes not yet in the store

    def score(self, group: FrameTokens) -> GroupScore:
        held = self._held
        hi = held.hi
        h, w = group.grid
        n_tok = h * w
        x = group.tokens.reshape(n_tok, -1)
        xn = normalize(x)
        cosm = xn @ xn.T
        nodes = topk_indices(propagate(cosm, x.float().norm(dim=-1)), round(n_tok * self.node_ratio))
        k = nodes.numel()
        held.reserve(k, xn.shape[1])
        same = held["valid"] & (held["grid"] == _grid_key(h, w))
        rank, by_tree, run = _tree_rank(held["tree"])
        tree, column, sim = _match(xn[nodes], nodes, held.feat[:hi], torch.where(same, held["pos"], -1),
                                   held["tree"], (h, w), self.tau_s, self.tau_p, rank, by_tree)
        ids = torch.arange(self._next_node, self._next_node + k)
        self._next_node += k
        joined = tree >= 0
        depth = torch.zeros(k, dtype=torch.long)
        if hi and k:
            depth = torch.where(joined, held["tail"][column] + 1, 0)
            self._grow(run[rank], column, joined)
        tree = torch.where(joined, tree, ids)
        redundancy, partner, partner_slot, earlier = self._partners(sim, cosm[nodes][:, nodes], ~joined, ids, rank,
                                                                    by_tree)
        slots = held.add(xn[nodes], node=ids, tree=tree, depth=depth, pos=nodes,
                         grid=torch.full((k,), _grid_key(h, w)), redundancy=redundancy, partner=partner, tail=depth)
        held.cols["partner_slot"][slots] = torch.where(earlier >= 0, slots[earlier.clamp_min(0)], partner_slot)
        self._pending.append(slots)
        score = torch.full((n_tok,), -math.inf)
        score[nodes] = -depth.float()
        keep = torch.zeros(n_tok, dtype=torch.bool)
        keep[nodes] = True
        meta = {}
        for name, v in (("tree", tree), ("depth", depth), ("node", ids)):
            meta[name] = torch.full((n_tok,), -1, dtype=torch.long)
            meta[name][nodes] = v
        return GroupScore(score=score, keep=keep, meta=meta, kept=k)

    def _grow(self, run: torch.Tensor, column: torch.Tensor, joined: torch.Tensor) -> None:
        """Alg. 1, LinkNode: a node joins below its tree's tail, so a tree that gained nodes this
        group has a tail one deeper (the joiners' depth) on every held node of it, found by the
        tree's `run` (a number per tree, per held column) through the joiners' `column`s."""
        grew = torch.zeros(run.numel() + 1, dtype=torch.bool)
        grew[torch.where(joined, run[column], run.numel())] = True
        self._held["tail"].add_(grew[run] & self._held["valid"])

    def _partners(self, sim: torch.Tensor, node_cos: torch.Tensor, is_root: torch.Tensor, ids: torch.Tensor,
                  rank: torch.Tensor, by_tree: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each new root's most similar earlier root (held, or earlier in this group): its cos
        and node id (ties to the lower id, so a held one first); -inf and -1 for non-roots and
        the very first root. Also where that partner is: its held slot, or its index in this
        group (else -1), so that demotion finds it without a search. Every row is computed and
        the non-roots' masked: which rows are roots is data. A held root's tree is its own id,
        so its `rank` by tree orders the held roots by id."""
        k, m = ids.numel(), sim.shape[1]
        none = torch.full((k,), -1, dtype=torch.long)
        if k == 0:
            return torch.zeros(0), none, none, none
        at = torch.arange(k)
        mine = torch.where(is_root[None, :] & (at[None, :] < at[:, None]), node_cos, -math.inf)
        best = mine.amax(1, keepdim=True)
        held = self._held
        if m:
            roots = sim + torch.where(held["valid"] & (held["depth"] == 0), -0.0, -math.inf)
            best = torch.maximum(best, roots.amax(1, keepdim=True))
        found = is_root & (best[:, 0] > -math.inf)
        slot = none
        if m:
            below = _below_(roots, best).to(torch.float32 if m <= 2**24 else torch.float64)  # ranks exact
            first = torch.add(rank.to(below.dtype), below, alpha=-m, out=below).amin(1).long()
            slot = torch.where(found & (first < m), by_tree[first.clamp_max(m - 1)], -1)
        earlier = torch.where(found & (slot < 0), torch.where(mine == best, at, k).amin(1), -1)
        who = ids[earlier.clamp_min(0)]
        if m:
            who = torch.where(slot >= 0, held["node"][slot.clamp_min(0)], who)
        return torch.where(found, best[:, 0], -math.inf), torch.where(found, who, -1), slot, earlier

    def evict(self, store: TokenSet, capacity: int) -> torch.Tensor:
        """Keep the `capacity` first rows of `eviction_order`; when the store's roots alone
        exceed it, demote the most redundant roots first (step 3)."""
        held = self._held
        if "node" not in store.meta:
            raise RuntimeError("forestprune.evict got rows without node meta")
        slots = self._store_slots(store)
        self._demote(slots, capacity)
        order = eviction_order(held.cols["tree"][slots], held.cols["depth"][slots], store.group.to(torch.long),
                               self.chain_cap)
        keep = topk_indices(-order.double(), capacity)
        kept = torch.zeros(len(store), dtype=torch.bool)
        kept[keep] = True
        held.free(slots, kept, len(store) - keep.numel())
        self._stored = slots[keep]
        return keep

    def _store_slots(self, store: TokenSet) -> torch.Tensor:
        """The held slot of each store row, without a search: the store is the rows the last
        eviction kept, then the nodes of the groups that left the recent window since, in the
        order they were scored (how many rows each brings is known here). Checked on the device."""
        parts = [self._stored] if self._stored.numel() else []
        new = len(store) - self._stored.numel()
        while new > 0 and self._pending:
            parts.append(self._pending.popleft())
            new -= parts[-1].numel()
        if new:
            raise RuntimeError("forestprune.evict got rows this pruner does not hold")
        slots = torch.cat(parts)
        held = self._held.cols
        torch._assert_async((held["valid"][slots] & (held["node"][slots] == store.meta["node"])).all(),
                            "forestprune.evict got rows this pruner does not hold")
        return slots

    def _demote(self, slots: torch.Tensor, capacity: int) -> None:
        """Make the store's (rows at `slots`) most redundant roots (ties: later first) children of
        their partners, as many as its roots exceed `capacity`. That count is known only on the
        device; the host knows it is at most the rows over `capacity`, so the demoted roots are
        handled as a list of that length, padded.

        The list is `torch.topk` over one distinct integer per row, (redundancy, row): a later row
        holds a later node (ids follow arrival, as rows do). A merged tree's tail is the deeper of
        the two tails: while a tree only grows its tail is its deepest node, and a merge must not
        make a long tree look short. A root whose partner's tree is demoted too follows that tree
        to its final place: pointer jumping over the list, log2 of its length in rounds.
        """
        room = slots.numel() - capacity
        if room <= 0:
            return
        held = self._held
        cols = held.cols
        is_root = cols["depth"][slots] == 0
        red = cols["redundancy"][slots].clamp_min(_NO_PARTNER) + 0.0  # -0.0 ties with 0.0, as in a sort
        red = torch.where(is_root, red, -math.inf).view(torch.int32)
        red = torch.where(red < 0, red ^ 0x7FFFFFFF, red).long()  # float order as integers
        own = slots[torch.topk(red * 2**32 + torch.arange(slots.numel()), room).indices]
        live = torch.arange(room) < is_root.sum() - capacity
        own_tree = torch.where(live, cols["tree"][own], _BIG)
        trees, by_tree = torch.sort(own_tree)
        partner = cols["partner_slot"][own]
        has = live & (partner >= 0)
        partner = partner.clamp_min(0)
        has &= cols["valid"][partner] & (cols["node"][partner] == cols["partner"][own])  # not a reused slot
        partner_tree = cols["tree"][partner]
        at = torch.searchsorted(trees, partner_tree).clamp_max(room - 1)
        chained = has & (trees[at] == partner_tree)  # the partner's tree is demoted too, at by_tree[at]
        kept_tail = torch.where(has & ~chained, cols["tail"][partner], -1)
        # Pointer jumping: row 0 ends a chain in a sentinel (offset 0, index `room`), row 1 in the
        # chain's last root (itself); the offsets add up along row 0.
        nxt = by_tree[at]
        ends = torch.stack([torch.where(chained, nxt, room), torch.where(chained, nxt, torch.arange(room))])
        ends = torch.nn.functional.pad(ends, (0, 1), value=room)
        offset = torch.nn.functional.pad(torch.where(has, cols["depth"][partner] + 1, 1), (0, 1))
        for _ in range(room.bit_length()):
            offset = offset + offset[ends[0]]
            ends = ends.gather(1, ends)
        offset = offset[:room]
        final = torch.where(live, torch.where(has, partner_tree, own_tree)[ends[1, :room]], _BIG)
        tail = _group_max(final, torch.maximum(cols["tail"][own] + offset, kept_tail))
        # One table for every held node: a demoted tree's nodes move (first among equal keys),
        # and every node of a tree that received others takes the merged tail.
        keys, order = torch.sort(torch.cat([own_tree, final]), stable=True)
        table = torch.stack([torch.cat([offset, torch.zeros_like(offset)]), torch.cat([final, final]),
                             torch.cat([tail, tail])])[:, order]
        tree, valid = held["tree"], held["valid"]
        at = torch.searchsorted(keys, tree).clamp_max(2 * room - 1)
        hit = valid & (keys[at] == tree)
        shift, moved, tails = table[:, at]
        held["depth"].add_(torch.where(hit, shift, 0))
        held["tail"].copy_(torch.where(hit, tails, held["tail"]))
        tree.copy_(torch.where(hit, moved, tree))


def _below_(x: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """In place: -1.0 where `x` is below its row's `best` (its max, or -inf), else 0.0, the sign
    of x - best; an empty row's best is taken as -3, below any cosine, so -inf - -inf is no NaN."""
    return x.sub_(best.clamp_min(-3.0)).sign_()


def _group_max(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Per element, the largest `value` among the elements with the same `key`: each group is
    reduced at its first place in the sorted keys."""
    keys = torch.sort(key).values
    at = torch.searchsorted(keys, key)
    return torch.zeros_like(value).scatter_reduce(0, at, value, "amax", include_self=False)[at]


def _grid_key(h: int, w: int) -> int:
    return h * 65536 + w
