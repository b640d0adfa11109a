"""MoPrune: scene-guided, motion-aware token pruning (docs/PRUNERS.md, "MoPrune").

Paper: "MoPrune: Scene-Guided Motion-Aware Token Pruning for Efficient Video Large Language
Models", Sec. 3.3-3.4. Offline, `moprune_select` implements:
1. scenes (Sec. 3.3, Eq. 1-2, `scene_starts`): `g_t` = mean token of group t; a boundary falls
   between t and t+1 when `cos(g_t, g_{t+1}) < scene_threshold` (the paper's tau, 0.8 in its
   Table 7);
2. frame budgets (Sec. 3.3, Eq. 3-6): scene centroid `c_k` (Eq. 3), `s_scene = cos(x, c_k)`
   (Eq. 4), `u_t = mean(-s_scene)`, softmax weight `sigma_t` over the scene with temperature
   `alpha` (Eq. 5, `frame_weights`), `gamma_t = ratio (1 + sigma_t - 1/T_k)` (Eq. 6 with
   `gamma_base = B_k / T_k = ratio`), `k_t = floor(min(gamma_t, 1) N)` (Sec. 3.4; the cap is ours);
3. token score (Sec. 3.4, Eq. 7-11, `group_scores`): `u = -cos(x, c_k) - cos(x, g_t)` (Eq. 7-8),
   motion `m = ||x_t - x_{t-1}||` (Eq. 9, 0 in a scene's first group), both min-max normalised in
   the group (Eq. 10), `s = exp((1-eta) log(u_n + 1e-6) + eta log(m_n + 1e-6))` (Eq. 11);
4. the top `k_t` tokens of each group by `s`.

The streaming `MoPrune` uses the same `scene_starts` test, `group_scores` and `frame_weights`,
and departs from the offline version where the clip's future is unknown:
1. The scene centroid is the running mean of the scene so far, current group included, not
   the whole scene's mean (the rest of the scene has not happened); `u_t` and `s` are computed
   with it once, at ingest, and stored (meta "scene" and "u").
2. Budgets are re-allocated at each eviction over what the store holds instead of once over
   the clip: every held group gets the same base share (scene budgets in proportion to the
   groups each holds), scaled by `1 + sigma_t - 1/G_k` with sigma over the `G_k` groups the
   scene still holds (Eq. 5-6 on the stored `u_t`). `floor(min(gamma_t, 1) N)` becomes a
   divisor (Jefferson) apportionment, `quota_select`: it fills the store exactly to capacity,
   and a group that holds fewer tokens than its share passes the rest on, in proportion.
3. `reset()` (a reconnect) or a change of grid opens a new scene at the next group: it has
   no predecessor. The state bank (4) stays across a reconnect and restarts on a new grid.
4. Memory-aware motion (`memory_states`, default 4; 0 is the paper), because a stream never
   ends and repeats its cycles: a token that returns to a state its position left
   (`novelty.StateBank`, cosine >= 0.9 to the state) moved only as far as that state, so Eq. 9
   becomes `m = min(||x_t - x_{t-1}||, ||x_t - state||)` for it (before the min-max of Eq. 10).
   Measured reason (tests/test_novelty.py, planted blinking and swaying regions on 20% of the
   grid, 3% and 10% capacity): the paper's motion spent 0.93-0.98 of the store on them and kept
   3 and 11 of 12 events; with the bank 0.05-0.07 and every event (0.00 with departure 5).
5. Explained tokens leave first (with the bank): a held token that returned to a banked state
   at ingest, or whose state has proved periodic since (`StateBank.periodic_ids`, remembered in
   `_known` for the tokens of it the store holds after the bank pushes it out), is kept only
   when every other token is (`quota_select(..., last=...)`): it takes no group's share.
   Measured reason (bench/recall.py, 5 seeds x 600 s, 2/5/10%): with 4 alone, 0.19/0.20/0.21
   of the memory stayed on the blinking, swaying and shimmering distractors, because every
   held group keeps its share (about 3 and 22 tokens at 2% and 10%), and in a group with
   nothing new the share went to them: of the 3004 distractor tokens held at 10% (seed 0),
   1545 had returned at ingest, their motion capped only at the distance to a jittered state's
   mean (median 9.0, a still background's 2.8). With those and the tokens of states periodic at
   the time ranked last, 832 were left: 473 of states that had been periodic but that the bank
   had pushed out since, half of the 832 in the first 4 s after a cut (first appearances, new
   when they came). Ranked last, all of these give their share to other tokens: 0.096/0.06/0.04,
   event recall 0.90/0.98/1.00 -> 0.92/0.99/1.00, event-seconds 0.62/0.82/0.87 ->
   0.65/0.83/0.88. Costs two sorted-id lookups of every held token at eviction (among the bank's
   periodic ids and among those remembered; a few tenths of a ms per group at Qwen2.5-VL-7B
   shapes, capacity 8192, 2 cores).
Ingest costs a few passes over the group's [N, D] tokens (the bank one more, about 1 ms at
Qwen2.5-VL-7B shapes on one core); eviction reads only per-row scalars (one integer sort, an
O(n) selection and, with the bank, the lookups above), never the store's features: score +
evict take 3.8 ms per group at Qwen2.5-VL-7B shapes with the bank (bench/results/prune_cost.md,
2026-11-30; 0.5-0.8 ms of it is the price of reading nothing back, below).
Neither reads anything back to the host (tests/test_memory_device.py): a scene cut is decided
on the device, and eviction's per-group values live in buffers as long as the store.
Measured (tests/test_moprune.py, with `memory_states=0`): with no recent window the store holds
0.94-1.00 of the offline pick.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch

from .base import POSITIVE, GroupScore, ParamRange, Pruner, TokenSet, check_params
from .novelty import StateBank, check_states
from .similarity import EPS, cos, minmax, normalize, smallest_rows, topk_indices
from .types import FrameTokens


def scene_starts(means: torch.Tensor, scene_threshold: float) -> torch.Tensor:
    """[T] bool: group t opens a scene (Eq. 2); group 0 always does."""
    starts = torch.ones(means.shape[0], dtype=torch.bool)
    if means.shape[0] > 1:
        starts[1:] = cos(means[:-1], means[1:]) < scene_threshold
    return starts


def group_scores(
    x: torch.Tensor, mean: torch.Tensor, centroid: torch.Tensor, prev: torch.Tensor | None, eta: float,
    recur: torch.Tensor | None = None, same_scene: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token scores `s` [N] (Eq. 7-11) and frame uniqueness `u_t` (Sec. 3.3, 0-dim) of one group.

    `x` [N, D] float32 tokens, `mean` [D] their mean `g_t`, `centroid` [D] the scene centroid,
    `prev` [N, D] the previous group of the same scene, or None in a scene's first group
    (motion 0). `same_scene`, a 0-dim bool, says on the device whether `prev` is of the same
    scene (motion 0 if not), so a scene cut is never read back to the host. `recur` [N], the
    distance to a state the position left (`novelty.StateBank`, inf if none), caps the motion:
    a return to a known state moved only that far. The cosines are matrix-vector products over
    the token norms, which is the same cos on L2-normalised vectors without a normalised copy of
    the group.
    """
    norms = x.norm(dim=-1).clamp_min(EPS)
    s_scene = torch.mv(x, normalize(centroid)) / norms
    s_frame = torch.mv(x, normalize(mean)) / norms
    u = minmax(-s_scene - s_frame)
    if prev is None:
        m = torch.zeros_like(u)
    else:
        motion = (x - prev).norm(dim=-1)
        m = minmax(motion if recur is None else torch.minimum(motion, recur))
        if same_scene is not None:
            m = torch.where(same_scene, m, 0.0)
    s = torch.exp((1 - eta) * torch.log(u + EPS) + eta * torch.log(m + EPS))
    return s, -s_scene.mean()


def frame_weights(
    u: torch.Tensor, alpha: float, scene: torch.Tensor | None = None, scenes: int | None = None
) -> torch.Tensor:
    """Eq. 5 per scene: `sigma_t = exp(u~_t) / (sum_j exp(u~_j) + 1e-6)`, `u~ = (u - max u) / alpha`.

    `u` [G] frame uniqueness; `scene` [G] ids 0..K-1 (None: one scene). `scenes`, a bound on K
    known on the host, sizes the per-scene sums without reading the largest id back. Float64.
    """
    u = u.to(torch.float64)
    if scene is None:
        scene = torch.zeros(u.shape[0], dtype=torch.long, device=u.device)
        scenes = min(1, u.shape[0])
    k = (int(scene.max()) + 1 if scene.numel() else 0) if scenes is None else scenes
    top = torch.full((k,), -math.inf, dtype=torch.float64, device=u.device).scatter_reduce(0, scene, u, "amax")
    e = torch.exp((u - top.index_select(0, scene)) / alpha)
    sums = torch.zeros(k, dtype=torch.float64, device=u.device).index_add(0, scene, e) + EPS
    return e / sums.index_select(0, scene)


def _descending_key(score: torch.Tensor) -> torch.Tensor:
    """int64 keys in [1, 2^32] whose ascending order is float32 `score` descending.

    Integers sort by radix, several times faster than floats; the IEEE bits of a float order
    like the float once the negative ones have their magnitude bits flipped (-0.0 -> +0.0).
    """
    bits = (score.float() + 0.0).view(torch.int32).long()
    return (1 << 31) - torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def quota_select(
    score: torch.Tensor, bucket: torch.Tensor, weight: torch.Tensor, total: int, last: torch.Tensor | None = None
) -> torch.Tensor:
    """`total` rows split over buckets in proportion to `weight`, best `score` first in each.

    Divisor (Jefferson) apportionment: the row of rank r (0 = best, ties toward the lower row)
    in bucket b has key `(r + 1) / weight[b]` and the `total` smallest keys are kept, so bucket
    b keeps `min(held_b, floor(lam * weight[b]))` rows for the one `lam` that sums to `total`.
    `bucket` [n] holds ids 0..B-1 (< 2^29), `weight` [B] > 0 (entries no row names are never
    read). `last` [n] bool: rows kept only when all the others are (they rank after every
    other row of their bucket, and their keys after every other key). Returns ascending rows;
    reads nothing back from the device.
    """
    n = int(score.numel())
    if total >= n:
        return torch.arange(n, device=score.device)
    sort_key = bucket * (1 << 34) + _descending_key(score)
    if last is not None:
        sort_key = sort_key + last.long() * (1 << 33)
    ranked, order = torch.sort(sort_key, stable=True)
    in_bucket = ranked >> 34
    steps = torch.arange(n, device=score.device)
    opens = torch.ones(n, dtype=torch.bool, device=score.device)
    opens[1:] = in_bucket[1:] != in_bucket[:-1]
    rank = steps - torch.cummax(torch.where(opens, steps, 0), 0).values
    key = (rank + 1).to(torch.float64) / weight.to(torch.float64).index_select(0, in_bucket)
    if last is not None:
        key = torch.where((ranked & (1 << 33)) != 0, key + key.max(), key)
    key = torch.empty_like(key).scatter_(0, order, key)
    return smallest_rows(key, total)


def moprune_select(
    video: torch.Tensor, ratio: float, scene_threshold: float = 0.8, alpha: float = 0.01, eta: float = 0.5
) -> torch.Tensor:
    """Offline MoPrune on `video` [T, H, W, D]: kept flat indices into T*H*W, ascending."""
    if ratio < 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}")
    t_len, h, w, d = video.shape
    n = h * w
    x = video.reshape(t_len, n, d).float()
    means = x.mean(1)
    starts = scene_starts(means, scene_threshold)
    bounds = torch.nonzero(starts).flatten().tolist() + [t_len]
    kept = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        centroid = x[a:b].reshape(-1, d).mean(0)
        scored = [
            group_scores(x[t], means[t], centroid, x[t - 1] if t > a else None, eta) for t in range(a, b)
        ]
        sigma = frame_weights(torch.stack([u for _, u in scored]), alpha)
        gamma = ratio * (1 + sigma - 1 / (b - a))
        for t, (s, _), g in zip(range(a, b), scored, gamma.tolist()):
            kept.append(t * n + topk_indices(s, math.floor(min(g, 1.0) * n)))
    return torch.sort(torch.cat(kept)).values


def _among(x: torch.Tensor, ascending: torch.Tensor) -> torch.Tensor:
    """[n] bool: each of x is in the ascending vector (a fixed-size membership test)."""
    if ascending.numel() == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    at = torch.searchsorted(ascending, x).clamp_max(ascending.numel() - 1)
    return ascending.index_select(0, at) == x


class MoPrune(Pruner):
    """Streaming MoPrune: causal scenes and motion, budgets re-allocated over the store."""

    name = "moprune"
    paper = "MoPrune: Scene-Guided Motion-Aware Token Pruning for Efficient Video LLMs (2026)"
    param_ranges: ClassVar[dict[str, ParamRange]] = {
        "scene_threshold": (-1.0, 1.0), "alpha": (POSITIVE, None), "eta": (0.0, 1.0), "memory_states": (0, 64)}

    def __init__(self, scene_threshold: float = 0.8, alpha: float = 0.01, eta: float = 0.5, memory_states: int = 4):
        check_params(MoPrune, scene_threshold=scene_threshold, alpha=alpha, eta=eta)
        check_states(MoPrune, memory_states)
        self.scene_threshold = float(scene_threshold)
        self.alpha = float(alpha)
        self.eta = float(eta)
        self.memory_states = memory_states
        self._bank = StateBank(memory_states) if memory_states else None
        self._known: torch.Tensor | None = None  # ids of periodic states the store holds, sorted, -1 padded
        self._scene: torch.Tensor | None = None  # the last scene's id, on the device
        self.reset()

    def reset(self) -> None:
        """A reconnect opens a new scene with no predecessor; the bank stays (it restarts only on
        a change of grid)."""
        self._prev: torch.Tensor | None = None
        self._prev_mean: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._count: torch.Tensor | None = None

    def score(self, group: FrameTokens) -> GroupScore:
        """Scene and motion decided on the device: a cut resets the running centroid and zeroes
        the motion by `torch.where`, so nothing is read back. Only a first group, a reconnect and
        a group of another shape (token count or width D), which the host sees, open a scene on
        the host's word."""
        h, w = group.grid
        n = h * w
        x = group.tokens.reshape(n, -1).float()
        mean = x.mean(0)
        prev = self._prev if self._prev is not None and self._prev.shape == x.shape else None
        if prev is None:
            same_scene = None
            opens = torch.ones((), dtype=torch.long, device=x.device)
            self._sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self._count = torch.zeros((), dtype=torch.long, device=x.device)
        else:
            same_scene = ~scene_starts(torch.stack([self._prev_mean, mean]), self.scene_threshold)[1]
            opens = (~same_scene).long()
            self._sum = torch.where(same_scene, self._sum, 0.0)
            self._count = torch.where(same_scene, self._count, 0)
        if self._scene is None:
            self._scene = torch.full((), -1, dtype=torch.long, device=x.device)
        self._scene = self._scene + opens
        self._sum += mean.to(torch.float64) * n
        self._count = self._count + n
        meta = {"scene": self._scene.expand(n).clone()}
        recur = None
        if self._bank is not None:
            _, recur, meta["state"] = self._bank.observe(x)
            meta["returned"] = torch.isfinite(recur)
        s, u = group_scores(x, mean, (self._sum / self._count).float(), prev, self.eta, recur, same_scene)
        self._prev, self._prev_mean = x, mean
        meta["u"] = u.expand(n).clone()
        return GroupScore(score=s, meta=meta)

    def _explained(self, store: TokenSet) -> torch.Tensor | None:
        """[n] bool: held tokens that returned to a banked state at ingest, or whose state has
        proved periodic since, or None without the bank. A state once seen periodic stays so for
        the tokens of it the store holds after the bank has pushed it out: `self._known` keeps
        the ids of those (ids are never reused), as many entries as the store had rows, so its
        size is known on the host. An id names one state of one position, so looking it up
        among the bank's periodic ids needs no position."""
        if self._bank is None or "state" not in store.meta:
            return None
        state = store.meta["state"]
        periodic = _among(state, self._bank.periodic_ids())
        if self._known is not None:
            periodic |= _among(state, self._known)
        self._known = torch.sort(torch.where(periodic, state, -1)).values
        return periodic | store.meta["returned"]

    def evict(self, store: TokenSet, capacity: int) -> torch.Tensor:
        """Per-group values live in [n] buffers (a store of n rows holds at most n groups):
        group g's at entry g, the entries past the last group in a scene of their own, so no
        size is read back from the device."""
        n = len(store)
        steps = torch.arange(n)
        first = torch.ones(n, dtype=torch.bool)
        torch.ne(store.group[1:], store.group[:-1], out=first[1:])
        group_of_row = torch.cumsum(first, 0) - 1
        heads = torch.zeros(n + 1, dtype=torch.long).scatter_(0, torch.where(first, group_of_row, n), steps)[:n]
        scene = store.meta["scene"].index_select(0, heads)
        opens = torch.ones(n, dtype=torch.bool)
        torch.ne(scene[1:], scene[:-1], out=opens[1:])
        scene_of_group = torch.where(steps <= group_of_row[-1], torch.cumsum(opens, 0) - 1, n)
        held = torch.zeros(n + 1, dtype=torch.float64).index_add_(0, scene_of_group, torch.ones(n, dtype=torch.float64))
        sigma = frame_weights(store.meta["u"].index_select(0, heads), self.alpha, scene_of_group, scenes=n + 1)
        weight = 1 + sigma - 1 / held.index_select(0, scene_of_group)
        return quota_select(store.score, group_of_row, weight, capacity, self._explained(store))
