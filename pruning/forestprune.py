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
  (seeds 0-1, 2-25%), the oldest quarter 0.25-0.31 -> 0.23-0.31. Cost: the order sorts only the
  non-root rows (sorting all 8.8k rows of the 7B store cost 1.6 ms a group); per group within
  noise of before (44 ms at the 7B shape on this machine).
- Step 3 runs at eviction, over the store's roots, when they alone exceed the capacity. Offline
  merges the globally most similar pair of roots repeatedly, O(R^2 D) per eviction, too slow
  for a live store. Instead each root records, at ingest, its most similar earlier root held then
  (one more read of the per-group product) and that cosine; the most redundant roots are demoted
  first (ties: the later one): a demoted root becomes a child of that partner when it is still
  held (its tree joins the partner's, depths shift below it, and the deeper tail stays the tail),
  else its tree just goes one level down. The recorded cosine is not refreshed when the partner
  leaves, so it is an upper bound of the root's current redundancy.
- `meta` (tree, depth, node id) and `score` (-depth) are fixed at ingest; merges move the pruner's
  own depths, which `evict` uses, but not rows already in the memory.
- Nodes of a different token grid (a resolution change) never match: distances are not comparable.
- `reset` keeps the forest: the memory still holds its tokens and nothing here needs the
  previous group.
- Still old-leaning: when the store's roots alone exceed it, the recorded redundancy decides which
  roots stay, and a root recorded against few held roots (early in the stream) looks less
  redundant, so a store of roots only (video_like_features with cuts every 60 groups, 5%) keeps
  0.34 of itself from the oldest quarter. Not changed here.
Measured (tests/test_forestprune.py, a drifting 32-group clip with a cut, budget 10%): the store
holds 0.63 of the offline pick without a recent window and 0.82 with four recent groups (0.98
before ties went to newer groups: offline keeps the earlier of equal depths). Cost: 44 ms per
group at Qwen2.5-VL-7B shapes with capacity 8192 on a 2-core Xeon, ~75% of it `match_nodes`'s
product with every held node (bench/results/prune_cost.md).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from .base import POSITIVE, GroupScore, ParamRange, Pruner, TokenSet, check_params
from .similarity import normalize, topk_indices
from .types import FrameTokens

MASKED_LOGIT = -5000.0  # the authors' logit for a missing edge before the row softmax
ZERO_EDGE = 1e-6  # |logit| below this counts as no edge
_BIG = torch.iinfo(torch.long).max


def _check(tau_s: float, tau_p: float, node_ratio: float) -> None:
    check_params(ForestPrune, tau_s=tau_s, tau_p=tau_p, node_ratio=node_ratio)


def eviction_order(tree: torch.Tensor, depth: torch.Tensor, group: torch.Tensor, chain_cap: int) -> torch.Tensor:
    """[n] int64 rank keys, lowest kept first: the roots and each tree's `chain_cap` shallowest
    nodes below its root (ties: newer group) by (depth, newer group); then the other nodes by the
    trailing zero bits of their depth, most first (a coarse stride over the tree's span), newer
    group first among equals. Only non-root rows are sorted (a store of 8k rows is mostly roots;
    a sort of all of them cost 1.6 ms a group)."""
    if tree.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    late = group.max() - group
    span = int(late.max()) + 1
    key = depth * span + late
    below = torch.nonzero(depth > 0).flatten()
    if below.numel() == 0:
        return key
    order = below[torch.sort(key[below], stable=True).indices]
    order = order[torch.sort(tree[order], stable=True).indices]
    t = tree[order]
    idx = torch.arange(order.numel())
    start = torch.ones(order.numel(), dtype=torch.bool)
    start[1:] = t[1:] != t[:-1]
    over = order[idx - torch.cummax(torch.where(start, idx, 0), 0).values >= chain_cap]
    zeros = (depth[over] & -depth[over]).double().log2().round().long()
    out = key.clone()
    out[over] = int(key.max()) + 1 + (63 - zeros) * span + late[over]
    return out


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
def distance_table(grid: tuple[int, int]) -> torch.Tensor:
    """Chebyshev distance [N, N] between the normalised coordinates (row/(H-1), col/(W-1)) of
    two raster positions, exactly, as integers in units of 1/((H-1)(W-1)): equal offsets tie."""
    h, w = grid
    sy, sx = _spacing(grid)
    pos = torch.arange(h * w)
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
    n = new_xn.shape[0]
    sim = new_xn @ held_xn.T
    if sim.numel() == 0:
        return torch.full((n,), -1, dtype=torch.long), sim
    table = distance_table(grid)
    n_pos = table.shape[0]
    reachable = torch.nn.functional.pad(table <= reach(grid, tau_p), (0, 1))
    hpos = torch.where(held_pos >= 0, held_pos, n_pos)
    feasible = reachable[new_pos][:, hpos] & (sim >= tau_s)
    s = torch.where(feasible, sim, -math.inf)
    ii, mm = torch.nonzero(feasible & (s == s.amax(1, keepdim=True)), as_tuple=True)
    d = table[new_pos[ii], hpos[mm]]
    nearest = torch.full((n,), _BIG).scatter_reduce(0, ii, d, "amin")
    closest = d == nearest[ii]
    ii, mm = ii[closest], mm[closest]
    tree = torch.full((n,), _BIG).scatter_reduce(0, ii, held_tree[mm], "amin")
    return torch.where(tree == _BIG, -1, tree), sim


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
    per-group matrix product reads.
    """

    COLUMNS = {"valid": torch.bool, "node": torch.long, "tree": torch.long, "depth": torch.long,
               "pos": torch.long, "grid": torch.long, "redundancy": torch.float32,
               "partner": torch.long}

    def __init__(self) -> None:
        self.size = 0
        self.hi = 0
        self.feat = torch.zeros(0, 0)
        self.cols = {name: torch.zeros(0, dtype=dt) for name, dt in self.COLUMNS.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        """Column `name` over the used prefix [:hi] (a view: writes go to the buffer)."""
        return self.cols[name][: self.hi]

    def reserve(self, k: int, d: int) -> None:
        """Room for k more nodes of dimension d (the buffers double when full)."""
        if self.size and self.feat.shape[1] != d:
            raise ValueError(f"token dimension changed from {self.feat.shape[1]} to {d}")
        free = self.size - int(self.cols["valid"].sum())
        if free >= k and self.size:
            return
        size = max(2 * self.size, self.size + k - free, 64)
        feat = torch.zeros(size, d)
        if self.size:
            feat[: self.size] = self.feat
        self.feat = feat
        for name, old in self.cols.items():
            new = torch.zeros(size, dtype=old.dtype)
            new[: self.size] = old
            self.cols[name] = new
        self.size = size

    def add(self, feat: torch.Tensor, **values: torch.Tensor) -> None:
        k = feat.shape[0]
        self.reserve(k, feat.shape[1])
        slots = torch.nonzero(~self.cols["valid"]).flatten()[:k]
        self.feat[slots] = feat
        self.cols["valid"][slots] = True
        for name, v in values.items():
            self.cols[name][slots] = v
        if k:
            self.hi = max(self.hi, int(slots[-1]) + 1)

    def free(self, slots: torch.Tensor) -> None:
        self.cols["valid"][slots] = False
        used = torch.nonzero(self.cols["valid"][: self.hi]).flatten()
        self.hi = int(used[-1]) + 1 if used.numel() else 0

    def find(self, node_ids: torch.Tensor) -> torch.Tensor:
        """Slots of these node ids, -1 where the node is not held."""
        live = torch.nonzero(self["valid"]).flatten()
        if live.numel() == 0:
            return torch.full_like(node_ids, -1)
        ids, order = torch.sort(self["node"][live])
        pos = torch.searchsorted(ids, node_ids).clamp_max(ids.numel() - 1)
        return torch.where(ids[pos] == node_ids, live[order[pos]], -1)


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
        self._tails: dict[int, tuple[int, int]] = {}
        self._next_node = 0

    def score(self, group: FrameTokens) -> GroupScore:
        h, w = group.grid
        n_tok = h * w
        x = group.tokens.reshape(n_tok, -1)
        xn = normalize(x)
        cosm = xn @ xn.T
        nodes = topk_indices(propagate(cosm, x.float().norm(dim=-1)), round(n_tok * self.node_ratio))
        k = nodes.numel()
        held = self._held
        held.reserve(k, xn.shape[1])
        same = held["valid"] & (held["grid"] == _grid_key(h, w))
        choice, sim = match_nodes(xn[nodes], nodes, held.feat[: held.hi], torch.where(same, held["pos"], -1),
                                  held["tree"], (h, w), self.tau_s, self.tau_p)
        ids = torch.arange(self._next_node, self._next_node + k)
        self._next_node += k
        tree, depth, _ = grow_trees(choice, ids, self._tails)
        redundancy, partner = self._partners(sim, cosm[nodes][:, nodes], tree == ids, ids)
        held.add(xn[nodes], node=ids, tree=tree, depth=depth, pos=nodes,
                 grid=torch.full((k,), _grid_key(h, w)), redundancy=redundancy, partner=partner)
        score = torch.full((n_tok,), -math.inf)
        score[nodes] = -depth.float()
        keep = torch.zeros(n_tok, dtype=torch.bool)
        keep[nodes] = True
        meta = {}
        for name, v in (("tree", tree), ("depth", depth), ("node", ids)):
            meta[name] = torch.full((n_tok,), -1, dtype=torch.long)
            meta[name][nodes] = v
        return GroupScore(score=score, keep=keep, meta=meta)

    def _partners(self, sim: torch.Tensor, node_cos: torch.Tensor, is_root: torch.Tensor,
                  ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each new root's most similar earlier root (held, or earlier in this group): its cos
        and node id (ties to the lower id); -inf and -1 for non-roots and the very first root."""
        k = ids.numel()
        redundancy = torch.full((k,), -math.inf)
        partner = torch.full((k,), -1, dtype=torch.long)
        r = torch.nonzero(is_root).flatten()
        if r.numel() == 0:
            return redundancy, partner
        held = self._held
        earlier = is_root[None, :] & (torch.arange(k)[None, :] < r[:, None])
        cand = torch.cat([sim[r].masked_fill(~(held["valid"] & (held["depth"] == 0)), -math.inf),
                          node_cos[r].masked_fill(~earlier, -math.inf)], dim=1)
        cand_ids = torch.cat([held["node"], ids])
        best = cand.amax(1, keepdim=True)
        found = best[:, 0] > -math.inf
        who = cand_ids.expand(r.numel(), -1).masked_fill(cand != best, _BIG).amin(1)
        redundancy[r] = torch.where(found, best[:, 0], -math.inf)
        partner[r] = torch.where(found, who, -1)
        return redundancy, partner

    def evict(self, store: TokenSet, capacity: int) -> torch.Tensor:
        """Keep the `capacity` first rows of `eviction_order`; when the store's roots alone
        exceed it, demote the most redundant roots first (step 3)."""
        held = self._held
        if "node" not in store.meta:
            raise RuntimeError("forestprune.evict got rows without node meta")
        slots = held.find(store.meta["node"])
        if bool((slots < 0).any()):
            raise RuntimeError("forestprune.evict got rows this pruner does not hold")
        is_root = held["depth"][slots] == 0
        excess = int(is_root.sum()) - capacity
        if excess > 0:
            self._demote(slots[is_root], excess)
        order = eviction_order(held["tree"][slots], held["depth"][slots], store.group.to(torch.long), self.chain_cap)
        keep = topk_indices(-order.double(), capacity)
        gone = torch.ones(len(store), dtype=torch.bool)
        gone[keep] = False
        held.free(slots[gone])
        if len(self._tails) > 2 * held.hi + 64:
            live = set(torch.unique(held["tree"][held["valid"]]).tolist())
            self._tails = {t: v for t, v in self._tails.items() if t in live}
        return keep

    def _demote(self, root_slots: torch.Tensor, count: int) -> None:
        """Make the `count` most redundant roots (ties: later first) children of their partners.

        A merged tree's tail is the deeper of the two tails (the later among equals): while a tree
        only grows its tail is its deepest node, and a merge must not make a long tree look short.
        """
        held = self._held
        later_first = root_slots[torch.sort(held["node"][root_slots], descending=True).indices]
        order = torch.sort(held["redundancy"][later_first], descending=True, stable=True).indices
        chosen = later_first[order[:count]]
        chosen = chosen[torch.sort(held["node"][chosen]).indices]
        partner_slot = held.find(held["partner"][chosen])
        offset: dict[int, int] = {}
        final: dict[int, int] = {}
        for j_slot, p_slot in zip(chosen.tolist(), partner_slot.tolist()):
            j = int(held["tree"][j_slot])
            if p_slot < 0:
                offset[j], final[j] = 1, j
            else:
                pt = int(held["tree"][p_slot])
                offset[j] = int(held["depth"][p_slot]) + 1 + offset.get(pt, 0)
                final[j] = final.get(pt, pt)
        dem = torch.tensor(sorted(offset), dtype=torch.long)
        tree, depth = held["tree"], held["depth"]
        pos = torch.searchsorted(dem, tree).clamp_max(dem.numel() - 1)
        hit = held["valid"] & (dem[pos] == tree)
        depth[hit] += torch.tensor([offset[t] for t in dem.tolist()], dtype=torch.long)[pos[hit]]
        tree[hit] = torch.tensor([final[t] for t in dem.tolist()], dtype=torch.long)[pos[hit]]
        for j in dem.tolist():
            nid, d = self._tails.pop(j)
            moved = (d + offset[j], nid)
            cur = self._tails.get(final[j])
            self._tails[final[j]] = moved[::-1] if cur is None or moved > cur[::-1] else cur


def _grid_key(h: int, w: int) -> int:
    return h * 65536 + w
