"""HieraVid: segments, static-token merging, segment budgets, DPP (docs/PRUNERS.md, "HieraVid").

Paper: "HieraVid: Hierarchical Token Pruning for Fast Video Large Language Models", Sec. 3.
Offline, `hieravid_select` implements steps 1-4 (step 5, layer-level balancing inside the LLM,
Sec. 3.3, is not a memory decision and is not implemented):
1. segmentation (Sec. 3.1.1, Eq. 1-2, `segment_ids`): `S_t` = cos of each position to the same
   position in group t-1 (Eq. 1), `O_t` = fraction of positions with `S_t > sim_threshold` (the
   paper's Eq. 2 counts positions in a Top-K of S; we use a fixed threshold), a segment opens at
   t when `O_t < beta`;
2. static merging (Sec. 3.1.1, Eq. 3, `static_flags`, `merge_runs`): the top
   `floor(merge_ratio T N)` values of S inside segments (a segment's first group has no
   predecessor in it, so it is never a candidate) are flagged; a flagged token joins the run
   of the token before it at its position, and a run becomes its mean at its first group;
3. segment budgets (Sec. 3.1.2, Eq. 4-5, `budget_scores`, `keep_ratios`): `g_m` = mean raw
   token of segment m; `b_m = lam cos(g_m, mean of later g) + (1 - lam)(1 - cos(g_m, mean of
   earlier g))` (Eq. 4 writes sums: same cosine; as the authors' code), a missing side's term
   being 0; z-scored with the population std + 1e-8 as in the authors' code;
   `keep_m = clamp(ratio + r_var z_m, 0.05, 0.95)` (Eq. 5, its ratio read as the kept fraction,
   so diverse segments keep more as Sec. 3.1.2 intends). Segment m keeps
   `min(n_m, floor(keep_m T_m N))` of its n_m merged tokens: `ratio` is the fraction of the
   clip's T N tokens kept, as for the other pruners;
4. frame-level DPP (Sec. 3.2, Eq. 6-10): `r = minmax(mean_l softmax(H h_l / sqrt(D)))` over all
   merged tokens, h_l the question's rows (Eq. 8 takes the last instruction token only; we
   average over every question token, the paper's Table 7 variant, because the question's
   states are computed without the video in context and end in the chat template's fixed
   tokens; the last input embedding, "?", gave three different questions identical picks;
   r = 1 without a query); greedy MAP (Eq. 6-7, `dpp.greedy_map`) of `diag(r) C diag(r)`
   (Eq. 9, with C the cosine matrix where the paper writes H H^T / d) in each segment
   (Eq. 10). We keep the paper's sign (instruction-relevant tokens favoured); the authors'
   code negates r. `HieraVid.query_layer` (7: where the first pruning stage starts in a
   28-layer LLM, Sec. 3.3 and 4.1) asks the query side for the question's hidden states at
   that layer (Eq. 11's H_t), computed once per question.

The streaming `HieraVid` shares every step's code and departs from the offline version here
(measured on the tiny model's encoded 40-group recall clips and 60-group video-like features):
1. Segments open causally with the same test (it needs only the previous group); `reset()`
   or a change of grid opens a new one.
2. Offline's top-K over the clip becomes a running one: a token merges when its same-position
   cos is at or above the k-th largest within-segment value seen so far, k = floor(merge_ratio
   * values seen) (`_MergeQuantile`: exact counts per float32 value of 1 - cos with 12 low
   mantissa bits dropped, 2 MB; exact for cos > 1 - 2^-12, within 2^-11 of 1 - cos below).
   Offline's K is a fraction of all T N tokens; over a prefix that would flag every candidate
   of the first groups, so k counts candidates. A 2048-bin histogram put 58% of a static
   camera's values in one bin (Jaccard 0.007 with offline's flags); now 0.86-0.97.
   TokenMemory folds the token into its run's newest held head by running mean when it leaves
   the recent window (`GroupScore.merge_into`); a run whose head was evicted restarts at the
   token (it was dropped before: 45-54% of merged tokens at 10%). `TokenSet.run` says how many
   groups a row stands for.
3. Step 3 runs at each eviction over the segments the store holds, segment m weighing
   `keep_m * G_m` with G_m the groups it spans (meta `segment_start`), `ratio = capacity /
   (N * sum G)`, apportioned exactly to capacity (`moprune.quota_select`). `g_m` is the running
   mean of all the segment's raw tokens (ingest state, as offline).
4. Step 4's exact DPP over a segment costs `n k^2` with n, k up to the capacity (~1e11 flops a
   group at 8192). Instead each group's non-merged tokens run the greedy conditioned on an
   orthonormal basis of the segment's picks so far (`dpp.span_scores`: at most `dpp_picks` a
   group, until the basis has `dpp_rank` rows), so a token's score is its gain against the
   segment's earlier content, not only the previous group's: picks score their gain, the rest
   their residual gain; a token already in the span scores below every pick (eviction then
   fills by the lower row, as offline's greedy fills by diagonal). Per group: one [n, n]
   kernel, an [n, p] projection and `dpp_picks` greedy steps, independent of capacity and
   stream length. Measured (tiny model's 40-group encoded recall clips, 60-group video-like
   features, D = 64): with `dpp_rank` 32, 0.44-0.58 of offline's pick at ratio 0.25 and
   0.33-0.38 at 0.10 (the previous group-conditioned DPP: 0.35-0.62 and 0.31-0.37); event
   recall on the recall benchmark's quick settings 0.84 / 0.94 / 1.00 at 5 / 10 / 25%, against
   EchoPrune's 0.94 / 1.00 / 1.00 (before: 0.59 / 0.94 / 1.00). With `dpp_rank` >= D the
   overlap is 0.77-0.89 at 0.25 and 0.50-0.69 at 0.10, but recall falls to 0.00-0.22: once the
   basis spans R^D, offline's greedy fills the rest of a segment's budget with its earliest
   tokens, and streaming then keeps the segment's first groups only, while offline's few
   greedy picks over the whole segment keep the events. The 0.8 overlap goal is not met.
5. At query time the recent window is spent first (as `base.recent_first`); the rest of the
   budget goes through step 3 over the store's segments, with `g_m` the mean of the segment's
   held tokens (a query must not read ingest state), and step 4 rerun as at ingest with the
   question's relevance, blocks of N consecutive store rows of one segment. Once a segment's
   basis is full no block can pick, so the rest of its rows are scored in one call from the
   kernel's diagonal alone (`span_scores`' fast path, the same scores to 1e-6 and the same
   picks): at 8k held tokens a question makes 4 DPP calls instead of 33, which is what counts
   on a GPU (launches and host syncs); on the CPU the query stays ~115 ms at 7B shapes, bound
   by seven passes over the 117 MB store (gather, normalise, project, sums). Segments are
   independent, so their blocks go in rounds, the picks of a round counted in one read-back:
   a question at 9k tokens with 5 segments reads back twice (was 327 times, twice per step).
   A round's greedy steps run batched across its segments (`dpp.span_scores_batch`, bit for
   bit each segment's own): at 16x16x3584, capacity 8192 and budget 4096, a question
   dispatches 655 operations (not views: a GPU's launches) where it dispatched 1,400 one
   segment at a time on prune_cost's stream (3 segments held), and 1,060 instead of 5,137 with
   a cut every 12 groups (12 segments); the same picks.
6. Memory-aware novelty (`memory_states`, default 4; 0 is the paper), as EchoPrune and MoPrune
   have it (`novelty.StateBank`): a token that returns to a state its position held before
   (cosine >= 0.9) is no news, so it is not a DPP candidate (score 0, like a merging token that
   has no run to join), and a token whose state has since proved periodic is the first out at
   eviction. The paper's static merging only asks the group before: a blinking light or a
   swaying branch never merges, and its alternating states look diverse to the DPP. Measured
   on the recall benchmark's ten-minute streams with periodic distractors (five seeds, at 2 /
   5 / 10% of the stream): distractors 0.18 / 0.22 / 0.24 of the store before, 0.06 / 0.04 /
   0.04 with the bank; event recall 0.57 / 0.83 / 0.92 before, 0.69 / 0.89 / 0.98 with it;
   event-seconds 0.30 / 0.51 / 0.64 before, 0.36 / 0.61 / 0.76. On the planted streams
   (tests/planted_streams.py, seeds 0-2, 3% and 10%): distractors 0.53-0.77 before, 0.00 with
   it; events kept at 10% 1-3 of 4 before, 4 of 4.
7. `merge_ratio` defaults to 0.7 here, 0.5 offline (the paper's). With memory-aware novelty the
   DPP's candidates are the tokens that are neither static nor returning; merging more of the
   near-static ones into their runs leaves each segment's budget to what is new, brief events
   most of all. Tuned on the recall benchmark itself (five seeds; no held-out set), at 2 / 5 /
   10 / 25%: event recall 0.69 / 0.89 / 0.98 / 0.98 at 0.5, 0.79 / 0.96 / 0.99 / 1.00 at 0.7
   (0.87 / 0.99 / 1.00 / 1.00 at 0.8, but 0.26 of the store on distractors at 10%); brief
   events at 5% 0.67 -> 0.85; distractors 0.06 / 0.04 / 0.04 -> 0.08 / 0.06 / 0.11 (a larger
   budget than the new tokens fill takes returning ones). On the planted streams at 3%, events
   kept 3 / 3 / 1 of 4 at 0.5, 4 / 4 / 3 at 0.7; no distractor held at either.
   Streaming vs offline at the same merge_ratio, first 40 groups of the five encoded recall
   clips: 0.73-0.82 of offline's pick at 0.25 and 0.22-0.73 at 0.10 (the paper's settings,
   merge_ratio 0.5 and no bank: 0.50-0.65 and 0.19-0.41). The 0.8 goal is still not met.

On the model's device (`TokenMemory(device=...)`) a group's `score` reads back one small
vector and an eviction nothing. A scene cut, the merge quantile and the greedy's steps are
decided on the device, but a group's DPP candidates and the picks that extend a segment's basis
are counts only the data determines, and they size step 4's products. Sized on the device
instead (padded to N and to `dpp_rank`), each group would pay the [N, N] kernel and `dpp_picks`
greedy steps (only the kernel's diagonal once a segment's basis is full: on a GPU hundreds of
launches more than the read-back costs), so those counts are read back, all of a group's at
once. Eviction runs Eq. 4-5 over every segment whose mean is kept, a size the host knows, the
segments the store no longer holds masked out (until 2026-11-30 it read back how many segments
the store holds, and the oldest): masked, the sums over segments are running sums that add the
masked zeros exactly, and the mean and spread of Eq. 5 are masked ones, so the budgets may
round differently in the last bit; against that code the snapshots, scores and question picks
were the same on 4,638 snapshots (11 stream x configuration runs of up to 100 groups, with
evictions every group or every few, grid changes, banks of 0-4 states). The oldest segment
held, whose predecessors' means can go, is queued for the host and read at the next eviction
(`HostCopy`).
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch

from .base import GroupScore, ParamRange, Pruner, TokenSet, check_params, recent_first, rowwise
from .dpp import SpanPicks, greedy_map, span_scores, span_scores_batch, unit_kernel
from .host_sync import HostCopy
from .novelty import StateBank, check_states
from .moprune import quota_select
from .similarity import EPS, cos, minmax, normalize, topk_indices
from .types import FrameTokens

SHIFT = 12  # float32 bits of 1 - cos kept by the merge histogram: 11 of 23 mantissa bits
BINS = (0x40000000 >> SHIFT) + 1  # 1 - cos in [0, 2]; 2.0 is 0x40000000
FINE = 512
BLOCKS = (BINS + FINE - 1) // FINE
_BIG = torch.iinfo(torch.long).max
CUTS = 64  # segment cuts a question reads back with the recent window's size (more: a second read-back)


def overlap_ratio(sim: torch.Tensor, sim_threshold: float) -> torch.Tensor:
    """Eq. 2: fraction of positions whose same-position cos exceeds `sim_threshold` (last dim).

    Float64, so the comparison with beta is exact (float32 would flush a tiny beta to 0)."""
    return (sim > sim_threshold).to(torch.float64).mean(-1)


def _segments(sim: torch.Tensor, beta: float, sim_threshold: float) -> torch.Tensor:
    """Segment id per group from `sim` [T, N] (row 0 unused): a segment opens when O_t < beta."""
    seg = torch.zeros(sim.shape[0], dtype=torch.long)
    seg[1:] = torch.cumsum((overlap_ratio(sim[1:], sim_threshold) < beta).long(), 0)
    return seg


def _same_position_cos(x: torch.Tensor) -> torch.Tensor:
    """[T, N]: cos of each token to the same position in the group before (row 0 is 0)."""
    sim = torch.zeros(x.shape[0], x.shape[1])
    sim[1:] = cos(x[1:], x[:-1])
    return sim


def segment_ids(video: torch.Tensor, beta: float = 0.4, sim_threshold: float = 0.6) -> torch.Tensor:
    """Segment id of each group of `video` [T, H, W, D] (Sec. 3.1.1), a LongTensor [T]."""
    t_len, h, w, d = video.shape
    return _segments(_same_position_cos(video.reshape(t_len, h * w, d)), beta, sim_threshold)


def static_flags(sim: torch.Tensor, seg: torch.Tensor, merge_ratio: float) -> torch.Tensor:
    """[T, N] bool: the top `floor(merge_ratio T N)` same-position cos inside segments."""
    t_len, n = sim.shape
    cand = torch.zeros(t_len, n, dtype=torch.bool)
    cand[1:] = (seg[1:] == seg[:-1])[:, None]
    k = min(math.floor(merge_ratio * t_len * n), int(cand.sum()))
    flags = torch.zeros(t_len * n, dtype=torch.bool)
    flags[topk_indices(torch.where(cand, sim, -math.inf).flatten(), k)] = True
    return flags.reshape(t_len, n)


def merge_runs(x: torch.Tensor, flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold each flagged token of `x` [T, N, D] into its run's first token (Eq. 3).

    Returns the run heads' flat indices (ascending) and their features, the runs' means [h, D].
    """
    t_len, n, d = x.shape
    t_idx = torch.arange(t_len)[:, None].expand(t_len, n)
    head = torch.cummax(torch.where(flags, -1, t_idx), dim=0).values * n + torch.arange(n)
    head = head.flatten()
    sums = torch.zeros(t_len * n, d).index_add_(0, head, x.reshape(t_len * n, d).float())
    counts = torch.bincount(head, minlength=t_len * n)
    heads = torch.nonzero(~flags.flatten()).flatten()
    return heads, sums[heads] / counts[heads, None]


def budget_scores(means: torch.Tensor, lam: float) -> torch.Tensor:
    """Eq. 4 for segment means `means` [M, D]: b [M] float64; a missing side's term is 0."""
    g = means.to(torch.float64)
    return gram_budget_scores(g @ g.T, lam)


def gram_budget_scores(gram: torch.Tensor, lam: float, held: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4 from the Gram matrix [M, M] (float64) of the segment means.

    Each cos in Eq. 4 is a ratio of sums of Gram entries (`g_m . sum_{j<m} g_j`,
    `|sum_{j<m} g_j|^2`, ...), so b costs O(M^2) instead of O(M D); cos of a sum equals cos of
    the mean. Norms are clamped at 1e-6 as in `similarity.normalize`. `held` [M] bool: score
    only these segments, as if the others were not there (their own scores are meaningless);
    their rows and columns are zeroed, which the running sums (sequential `cumsum`) add exactly,
    and a row's total is its running sum's last entry.
    """
    m = gram.shape[0]
    idx = torch.arange(m, device=gram.device)
    if held is not None:
        gram = gram * held[:, None] * held[None, :]
    rows = gram.cumsum(1)
    prefix = gram.cumsum(0).cumsum(1)
    upto = rows.diagonal()
    own = gram.diagonal()
    norm = own.clamp_min(0).sqrt().clamp_min(EPS)
    sq_earlier = torch.cat([gram.new_zeros(1), prefix.diagonal()[:-1]])
    sq_later = prefix[-1, -1] - 2 * prefix[:, -1] + prefix.diagonal()
    cos_earlier = (upto - own) / (norm * sq_earlier.clamp_min(0).sqrt().clamp_min(EPS))
    total = gram.sum(1) if held is None else rows[:, -1]
    cos_later = (total - upto) / (norm * sq_later.clamp_min(0).sqrt().clamp_min(EPS))
    if held is None:
        return lam * cos_later * (idx < m - 1) + (1 - lam) * (1 - cos_earlier) * (idx > 0)
    count = held.cumsum(0)  # held segments up to each
    return lam * cos_later * (count < count[-1]) + (1 - lam) * (1 - cos_earlier) * (count > 1)


def keep_ratios(b: torch.Tensor, ratio: float | torch.Tensor, r_var: float,
                held: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 5: `clamp(ratio + r_var z(b), 0.05, 0.95)`, z with the population std + 1e-8; over
    the `held` segments only when given (a masked mean and variance)."""
    if held is None:
        mean, std = b.mean(), b.std(correction=0)
    else:
        count = held.sum()
        mean = torch.where(held, b, 0.0).sum() / count
        std = (torch.where(held, b - mean, 0.0).square().sum() / count).sqrt()
    z = (b - mean) / (std + 1e-8)
    return (ratio + r_var * z).clamp(0.05, 0.95)


def relevance(tokens: torch.Tensor, query: torch.Tensor | None) -> torch.Tensor | None:
    """Eq. 8 over every question token: `minmax(mean_l softmax(H h_l / sqrt(D)))`, `query` [L, D]
    (or [D]) the question's states, h_l its rows (the paper's Table 7 "average" variant); H
    [n, D] or a `RowView` of the held rows."""
    if query is None or query.numel() == 0 or tokens.shape[0] == 0:
        return None
    h = query.reshape(-1, query.shape[-1]).float()
    logits = rowwise(tokens, lambda x: x.float() @ h.T)
    p = torch.softmax(logits.double() / math.sqrt(h.shape[1]), 0).mean(1)
    return minmax(p)


def dpp_kernel(feats: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
    """Eq. 9: `diag(r) C diag(r)`, C the cosine matrix of `feats` [n, D] (r = 1 when None)."""
    c = unit_kernel(normalize(feats))
    return c if r is None else r[:, None] * c * r[None, :]


def allocate(
    score: torch.Tensor, seg: torch.Tensor, start: torch.Tensor, last: torch.Tensor, b: torch.Tensor,
    total: int, n: int, r_var: float, held: torch.Tensor | None = None,
) -> torch.Tensor:
    """Step 3 over held rows sorted by group: `total` rows, best `score` first per segment.

    `seg` [rows] ids 0..M-1, `start` [rows] the first group of each row's segment, `last` (0-dim)
    the newest group of the last one, `b` [M] Eq. 4's scores; `n` tokens per full group. Segment
    m spans `G_m` groups (from its start to the next one's), its share is `keep_m * G_m` with
    `ratio = total / (n * sum G)`, as offline's `keep_m * T_m * N`; all on the device. `held`
    [M] bool: the ids some row names, when not all are (streaming's ids are slots of segments
    that may have left): a segment then ends where the next held one starts.
    """
    starts = start.new_zeros(b.shape[0]).scatter_(0, seg, start)
    if held is None:
        ends = torch.cat([starts[1:], last.view(1) + 1])
    else:  # the next held segment's start: the least start held after each
        after = torch.cat([torch.where(held, starts, _BIG)[1:], last.view(1) + 1])
        ends = torch.cummin(after.flip(0), 0).values.flip(0)
    groups = (ends - starts).clamp_min(1).to(torch.float64)
    spanned = groups.sum() if held is None else torch.where(held, groups, 0.0).sum()  # whole numbers: exact
    ratio = groups.new_full((), total) / (n * spanned)
    return quota_select(score, seg, keep_ratios(b, ratio, r_var, held) * groups, total)


def hieravid_select(
    video: torch.Tensor, ratio: float, query: torch.Tensor | None = None, beta: float = 0.4,
    sim_threshold: float = 0.6, merge_ratio: float = 0.5, lam: float = 0.5, r_var: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Offline HieraVid on `video` [T, H, W, D]: (kept flat indices ascending, their merged features).

    `query` [L, D] (or [D]) holds the question tokens' states (`relevance`).
    """
    if ratio < 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}")
    t_len, h, w, d = video.shape
    n = h * w
    x = video.reshape(t_len, n, d).float()
    sim = _same_position_cos(x)
    seg = _segments(sim, beta, sim_threshold)
    heads, feats = merge_runs(x, static_flags(sim, seg, merge_ratio))
    head_seg = seg[heads // n]
    n_seg = int(seg[-1]) + 1
    groups = torch.bincount(seg, minlength=n_seg)
    means = torch.zeros(n_seg, d).index_add_(0, seg, x.sum(1)) / (groups[:, None] * n)
    keep = keep_ratios(budget_scores(means, lam), ratio, r_var)
    r = relevance(feats, query)
    kept = []
    for m in range(n_seg):
        rows = torch.nonzero(head_seg == m).flatten()
        k = min(rows.numel(), math.floor(float(keep[m]) * int(groups[m]) * n))
        kept.append(rows[greedy_map(dpp_kernel(feats[rows], None if r is None else r[rows]), k)])
    kept = torch.sort(torch.cat(kept)).values
    return heads[kept], feats[kept].to(video.dtype)


class _MergeQuantile:
    """Every within-segment same-position cos seen, as an exact count per float32 value of
    `1 - cos` with its low SHIFT mantissa bits dropped: 2^18 bins (2 MB), in 512-bin blocks with
    their own counts, so adding a group costs O(N) and a quantile O(2 * 512).

    `1 - cos` is exact in float32 for cos >= 0.5 and every float32 cos > 1 - 2^-12 has a bin of
    its own, so the order is exact there (where a static camera's values crowd: a fixed-width
    2048-bin histogram put 58% of them in its top bin); below, values within a relative
    2^-11 of `1 - cos` of each other share a bin. The counts live on the groups' device and the
    quantile is found there; the host keeps only how many values were counted."""

    def __init__(self) -> None:
        self.count: torch.Tensor | None = None
        self.block: torch.Tensor | None = None
        self.total = 0

    @staticmethod
    def bins(sim: torch.Tensor) -> torch.Tensor:
        dist = (1.0 - sim.float().clamp(-1.0, 1.0)).clamp_min(0.0)
        return dist.view(torch.int32).long() >> SHIFT

    def add(self, bins: torch.Tensor, counted: torch.Tensor) -> None:
        """Count `bins` where `counted` (0-dim bool, on the device) holds; `total` is the host's
        to raise once it knows."""
        if self.count is None:
            self.block = torch.zeros(BLOCKS, dtype=torch.long, device=bins.device)
            self.count = torch.zeros(BLOCKS * FINE, dtype=torch.long, device=bins.device)  # whole blocks
        ones = torch.ones_like(bins) * counted
        self.count.index_add_(0, bins, ones)
        self.block.index_add_(0, bins // FINE, ones)

    def kth(self, k: int) -> torch.Tensor:
        """The bin (0-dim) of the k-th smallest `1 - cos` (k >= 1), i.e. of the k-th largest cos."""
        cum = torch.cumsum(self.block, 0)
        b = torch.searchsorted(cum, k).clamp_max(BLOCKS - 1).view(1)  # past the counts where a segment opens: unused
        below = torch.where(b > 0, cum.index_select(0, (b - 1).clamp_min(0)), 0)  # a tensor index: no read-back
        fine = torch.cumsum(self.count.view(BLOCKS, FINE).index_select(0, b)[0], 0)
        return (b * FINE + torch.searchsorted(fine, k - below)).squeeze(0)


class _SegmentMeans:
    """Running mean token of each segment, from the oldest the store may hold to the current
    one, and their Gram matrix, which is all Eq. 4 needs. Closed segments never change, so a
    group costs one [M, D] matrix-vector product (the current segment's Gram row) and an
    eviction O(M^2), not O(M D). Rows [start, start + size) of float64 buffers that double
    when full; dropping old segments moves `start`, and rows are compacted only on growth."""

    def __init__(self) -> None:
        self.first = 0
        self.start = 0
        self.size = 0
        self.means = torch.zeros(0, 0, dtype=torch.float64)
        self.gram = torch.zeros(0, 0, dtype=torch.float64)
        self._sum = torch.zeros(0, dtype=torch.float64)
        self._count = 0

    def open(self, segment: int, d: int, device: torch.device) -> None:
        if self.size == 0 or self.means.shape[1] != d:
            self.first, self.start, self.size = segment, 0, 0
            self.means = torch.zeros(max(8, self.means.shape[0]), d, dtype=torch.float64, device=device)
            self.gram = torch.zeros(self.means.shape[0], self.means.shape[0], dtype=torch.float64, device=device)
        if self.start + self.size == self.means.shape[0]:
            rows = slice(self.start, self.start + self.size)
            cap = max(8, 2 * self.size + 1)
            means = torch.zeros(cap, d, dtype=torch.float64, device=device)
            gram = torch.zeros(cap, cap, dtype=torch.float64, device=device)
            means[: self.size] = self.means[rows]
            gram[: self.size, : self.size] = self.gram[rows, rows]
            self.means, self.gram, self.start = means, gram, 0
        self.size += 1
        self._sum = torch.zeros(d, dtype=torch.float64, device=device)
        self._count = 0

    def add(self, mean: torch.Tensor, n: int) -> None:
        """Fold a group's mean token (n tokens) into the current segment."""
        self._sum += mean.to(torch.float64) * n
        self._count += n
        last = self.start + self.size - 1
        self.means[last] = self._sum / self._count
        rows = slice(self.start, last + 1)
        row = self.means[rows] @ self.means[last]
        self.gram[last, rows] = row
        self.gram[rows, last] = row

    def drop_before(self, segment: int) -> None:
        k = min(max(0, segment - self.first), self.size - 1)
        self.first, self.start, self.size = self.first + k, self.start + k, self.size - k

    def window(self) -> torch.Tensor:
        """The Gram matrix of the segments kept, `first` on (a view)."""
        rows = slice(self.start, self.start + self.size)
        return self.gram[rows, rows]


class HieraVid(Pruner):
    """Streaming HieraVid: causal segments, exact running merge quantile, runs that outlive
    their head, a segment DPP on a basis of the segment's picks, budgets per segment."""

    name = "hieravid"
    paper = "HieraVid: Hierarchical Token Pruning for Fast Video Large Language Models (2026)"
    param_ranges: ClassVar[dict[str, ParamRange]] = {
        "beta": (0.0, 1.0), "sim_threshold": (-1.0, 1.0), "merge_ratio": (0.0, 1.0),
        "lam": (0.0, 1.0), "r_var": (0.0, None), "dpp_picks": (0, None), "dpp_rank": (0, None),
        "memory_states": (0, 64),
    }
    # `rank_for_query` wants the question tokens' hidden states at this LLM layer (Eq. 8 and 11:
    # the instruction's state where the first pruning stage starts, after a quarter of a 28-layer
    # LLM); None would mean the question's input embeddings.
    query_layer: ClassVar[int | None] = 7

    def __init__(
        self, beta: float = 0.4, sim_threshold: float = 0.6, merge_ratio: float = 0.7,
        lam: float = 0.5, r_var: float = 0.1, dpp_picks: int = 32, dpp_rank: int = 32, memory_states: int = 4,
    ):
        check_params(HieraVid, beta=beta, sim_threshold=sim_threshold, merge_ratio=merge_ratio, lam=lam,
                     r_var=r_var, dpp_picks=dpp_picks, dpp_rank=dpp_rank)
        self.beta = float(beta)
        self.sim_threshold = float(sim_threshold)
        self.merge_ratio = float(merge_ratio)
        self.lam = float(lam)
        self.r_var = float(r_var)
        self.dpp_picks = int(dpp_picks)
        self.dpp_rank = int(dpp_rank)
        check_states(HieraVid, memory_states)
        self.memory_states = memory_states
        self._bank = StateBank(memory_states) if memory_states else None
        self._segment = -1
        self._start = 0
        self._last = 0
        self._quantile = _MergeQuantile()
        self._means = _SegmentMeans()
        self._oldest: HostCopy | None = None  # the oldest segment the last eviction saw, for the host
        self.reset()

    def reset(self) -> None:
        self._prev: torch.Tensor | None = None
        self._head: torch.Tensor | None = None
        self._basis: torch.Tensor | None = None
        self._picks: SpanPicks | None = None  # the last group's picks, to join the basis once counted

    def _merging(self, sim: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        """Step 2 so far: tokens among the top `floor(merge_ratio * values seen)` within-segment
        cos of the stream (this group's counted), ties at the cut included. `counted` (0-dim
        bool) is False where a segment opens at this group: its values are not counted then."""
        bins = self._quantile.bins(sim)
        self._quantile.add(bins, counted)
        total = self._quantile.total + sim.shape[0]
        k = math.floor(self.merge_ratio * total)
        if k <= 0:
            return torch.zeros(sim.shape[0], dtype=torch.bool, device=sim.device)
        if k >= total:
            return torch.ones(sim.shape[0], dtype=torch.bool, device=sim.device)
        return bins <= self._quantile.kth(k)

    def score(self, group: FrameTokens) -> GroupScore:
        """Steps 1, 2 and 4 for one group. Reads back one small vector: whether a segment opens
        here, how many DPP candidates the group has and how many tokens the last group's DPP
        picked. Those are the sizes of the DPP's matrices; padding them to fixed sizes would
        cost the [N, N] kernel every group (once the segment's basis is full only its diagonal
        is needed) and change the scores' rounding (a product's rounding depends on its shape)."""
        h, w = group.grid
        n = h * w
        x = group.tokens.reshape(n, -1).float()
        dev = x.device
        unit = normalize(x)
        prev = self._prev
        merging = torch.zeros(n, dtype=torch.bool, device=dev)
        cut = torch.ones((), dtype=torch.bool, device=dev)  # a first group, or a new grid
        if prev is not None and prev.shape == unit.shape:
            sim = (unit * prev).sum(-1)
            cut = overlap_ratio(sim, self.sim_threshold) < self.beta
            merging = self._merging(sim, ~cut) & ~cut
        explained = torch.zeros(n, dtype=torch.bool, device=dev)
        if self._bank is not None:
            recur, _, state = self._bank.observe(x)
            explained = recur > float("-inf")  # a state its position held before: no news
        cand = ~merging & ~explained
        made = cand.new_zeros((), dtype=torch.long) if self._picks is None else self._picks.count()
        n_cand, opens, made = torch.stack([cand.sum(), cut.long(), made]).tolist()  # the group's one read-back
        if opens:
            self._segment += 1
            self._means.open(self._segment, x.shape[1], dev)
            self._head = torch.full((n,), group.index, dtype=torch.long, device=dev)
            self._basis = torch.zeros(0, x.shape[1], device=dev)
            self._start = group.index
        else:
            self._quantile.total += n
            self._head = torch.where(merging, self._head, group.index)
            if self._picks is not None:
                self._basis = self._picks.extend(made)
        self._means.add(x.mean(0), n)
        self._last = group.index
        meta = {"segment": torch.full((n,), self._segment, dtype=torch.long, device=dev),
                "segment_start": torch.full((n,), self._start, dtype=torch.long, device=dev)}
        if self._bank is not None:
            meta["state"] = state
        rows = torch.nonzero_static(cand, size=n_cand).flatten()
        block, self._picks = span_scores(unit[rows], self._basis, None, self.dpp_picks, self.dpp_rank)
        scores = torch.zeros(n, device=dev).index_copy_(0, rows, block.float())
        self._prev = unit
        return GroupScore(score=scores, merge_into=torch.where(merging, self._head, -1), meta=meta)

    def evict(self, store: TokenSet, capacity: int) -> torch.Tensor:
        """Step 3 over the held segments; reads nothing back. Eq. 4-5 run over every segment
        whose mean is kept (`_SegmentMeans`, sizes the host knows), the ones the store no longer
        holds masked out. The oldest segment held is queued for the host (`HostCopy`) and read
        at the next eviction, which drops the means before it: the store never holds an older
        one again."""
        segment = store.meta["segment"]
        if self._oldest is not None:
            self._means.drop_before(self._oldest.tolist()[0])
        self._oldest = HostCopy(segment[:1])
        slot = segment - self._means.first  # ids 0..M-1 over the means kept
        held = torch.zeros(self._means.size, dtype=torch.bool, device=segment.device).index_fill_(0, slot, True)
        b = gram_budget_scores(self._means.window(), self.lam, held)
        h, w = store.grid
        score = store.score
        if self._bank is not None and "state" in store.meta:  # a state since proved periodic: first out
            periodic = self._bank.periodic(store.row * w + store.col, store.meta["state"])
            score = torch.where(periodic, torch.full_like(score, -1.0), score)
        last = store.group.new_full((), self._last)
        return allocate(score, slot, store.meta["segment_start"], last, b, capacity, h * w, self.r_var, held)

    def _parts(self, snap: TokenSet) -> tuple[torch.Tensor, torch.Tensor, int, list[int]]:
        """Rows of the store, then of the recent window (each ascending); [rows] bool, True where
        a segment or the recent window starts in that order (after row 0); how many rows are
        recent, and where those starts are, from one read-back (a second past CUTS starts)."""
        order = torch.sort(snap.recent.to(torch.uint8), stable=True).indices
        seg, recent = snap.meta["segment"][order], snap.recent[order]
        flags = torch.zeros_like(recent)
        flags[1:] = (seg[1:] != seg[:-1]) | (recent[1:] != recent[:-1])
        first = torch.nonzero_static(flags, size=min(CUTS, flags.numel()), fill_value=-1).flatten()
        read = torch.cat([snap.recent.sum().view(1), flags.sum().view(1), first]).tolist()
        n_recent, n_cuts = read[:2]
        cuts = read[2:2 + n_cuts] if n_cuts <= CUTS else torch.nonzero_static(flags, size=n_cuts).flatten().tolist()
        return order, flags, n_recent, cuts

    def _dpp_scores(
        self, snap: TokenSet, rows: torch.Tensor, r: torch.Tensor | None, cuts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 4 over `rows` (sorted by group, a segment starting at each of `cuts`) as at
        ingest, with relevance `r`: each segment's rows in blocks of <= N, each block's greedy
        conditioned on the segment's basis so far; and the mean token of each segment's rows
        [M, D]. Segments are independent, so their blocks go in rounds, one block of each
        segment per round, the round's greedy steps batched across segments
        (`span_scores_batch`), and one read-back of the picks' counts per round that picked."""
        n = snap.grid[0] * snap.grid[1]
        x = snap.tokens[rows].float()  # a gathered copy: the means come first, then it is normalised in place
        spans = list(zip([0, *cuts], [*cuts, rows.numel()]))
        means = []
        for a, b in spans:  # summed in group-sized blocks, as ingest sums them, added in order
            whole, part = divmod(b - a, n)
            sums = x[a:b - part].view(whole, n, x.shape[1]).sum(1)
            if part:
                sums = torch.cat([sums, x[b - part:b].sum(0, keepdim=True)])
            means.append(sums.double().cumsum(0)[-1] / (b - a))
        units = normalize(x, inplace=True)
        rel = None if r is None else r[rows]
        at = [a for a, _ in spans]
        bases = [torch.zeros(0, snap.tokens.shape[1], device=rows.device) for _ in spans]
        pieces: list[tuple[int, torch.Tensor]] = []  # (first row, its block's scores)
        while any(s < b for s, (_, b) in zip(at, spans)):
            blocks, owners = [], []
            for m, (_, b) in enumerate(spans):
                s = at[m]
                if s == b:
                    continue
                # block by block while picks grow the basis; once it is full, the rest at once
                e = min(s + n, b) if bases[m].shape[0] < self.dpp_rank and self.dpp_picks > 0 else b
                blocks.append((units[s:e], bases[m], None if rel is None else rel[s:e]))
                owners.append((m, s))
                at[m] = e
            picked = []
            for (m, s), (block, picks) in zip(owners, span_scores_batch(blocks, self.dpp_picks, self.dpp_rank)):
                pieces.append((s, block))
                if picks is not None:
                    picked.append((m, picks))
            if picked:
                for (m, picks), made in zip(picked, torch.stack([p.count() for _, p in picked]).tolist()):
                    bases[m] = picks.extend(made)
        if not pieces:
            return x.new_zeros(0, dtype=torch.float64), torch.stack(means).float()
        return torch.cat([block for _, block in sorted(pieces, key=lambda p: p[0])]), torch.stack(means).float()

    def query_score(self, snap: TokenSet, query_embeds: torch.Tensor | None) -> torch.Tensor:
        """Blocked DPP scores with the question's relevance (Eq. 8-9), the store's rows and the
        recent window's in separate blocks, as `rank_for_query` ranks them."""
        r = relevance(snap.tokens, query_embeds)
        out = torch.zeros(len(snap), dtype=torch.float64, device=snap.score.device)
        order, _, n_recent, cuts = self._parts(snap)
        stored = len(snap) - n_recent
        for rows, part in ((order[:stored], [c for c in cuts if c < stored]),
                           (order[stored:], [c - stored for c in cuts if c > stored])):
            if rows.numel():
                out[rows] = self._dpp_scores(snap, rows, r, part)[0]
        return out

    def rank_for_query(self, snap: TokenSet, query_embeds: torch.Tensor | None, budget: int) -> torch.Tensor:
        """The recent window first, then step 3's segment shares of the store by query-time DPP.
        Reads back the recent window's size and the store's segment cuts (one read-back), and
        the number of picks once per round of DPP blocks (`_dpp_scores`)."""
        budget = max(0, min(int(budget), len(snap)))
        if budget == len(snap):
            return recent_first(snap, snap.score, budget)
        order, flags, n_recent, cuts = self._parts(snap)
        if n_recent >= budget:
            return recent_first(snap, snap.score, budget)
        stored = len(snap) - n_recent
        rest, recent = order[:stored], order[stored:]
        cuts = [c for c in cuts if c < stored]
        scores, means = self._dpp_scores(snap, rest, relevance(snap.tokens, query_embeds), cuts)
        seg = flags[:stored].cumsum(0)  # ids 0..M-1
        h, w = snap.grid
        b = budget_scores(means, self.lam)
        last = snap.group.max()
        picked = rest[allocate(scores, seg, snap.meta["segment_start"][rest], last, b, budget - n_recent,
                               h * w, self.r_var)]
        return torch.sort(torch.cat([recent, picked])).values
