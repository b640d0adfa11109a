"""Greedy MAP inference for a determinantal point process (docs/PRUNERS.md, "HieraVid", step 4).

HieraVid ("HieraVid: Hierarchical Token Pruning for Fast Video Large Language Models",
Sec. 3.2, Eq. 6-7 and 10) picks each segment's tokens by the MAP of a DPP. `greedy_map` is the
fast greedy MAP of Chen et al. (2018) that HieraVid (via CDPruner) uses: pick `j = argmax d2`,
`e = (L[j] - c[:i, j] @ c[:i]) / sqrt(d2[j])`, `d2 -= e**2`, `d2[j] = -inf`. `d2[j]` at the
moment j is picked is j's gain, det(L_{S+j}) / det(L_S), so gains never increase and a prefix
of the order is the greedy pick for a smaller k. Once the best gain is <= 1e-10 the rest of
the set lies numerically in the span of what was picked; dividing by its square root would give
NaN, so the remaining picks are filled by descending diagonal (ties toward the lower index).

`span_scores` serves the streaming HieraVid, which cannot afford a DPP over a whole segment per
group: it runs the same greedy in feature space on one block of tokens at a time, conditioned on
an orthonormal basis of the segment's earlier picks, which it extends (pruning/hieravid.py,
departure 4, says why and what it costs). Its scores read nothing back from the
device, the greedy's steps included; extending the basis (`SpanPicks.extend`) needs the number
of picks on the host, as the basis's row count shapes every later product, so HieraVid counts
them when it reads back anyway (with the next group's counts, or a round of blocks' at once).
`span_scores_batch` scores independent blocks at once (a question's segments, one block each
per round) with one batched greedy, each block getting the bits it gets alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .host_sync import to_device

MIN_GAIN = 1e-10


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square roots of a float64 tensor (as `math.sqrt`), on its device.
    torch's own float64 sqrt is an ulp off now and then on the CPU (its vectorised math), and
    every later gain of the greedy would move with it; LAPACK's 1x1 Cholesky factors are the
    hardware's roots (one batched call). A GPU's float64 sqrt is correctly rounded, and a solver
    call per greedy step would cost launches of its own there. A non-positive x gives a
    meaningless value (the greedy masks it)."""
    if x.device.type != "cpu":
        return torch.sqrt(x)
    return torch.linalg.cholesky_ex(x.reshape(-1, 1, 1)).L.view(x.shape)


def _greedy(
    kernels: torch.Tensor, steps: list[int], min_gain: float = MIN_GAIN, read_back: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The greedy on a batch of kernels [S, N, N], each zero-padded past its own size: up to
    `steps[s]` picks from kernel s, stopping at its first gain <= min_gain: (picks [S, K], gains
    [S, K], residual d2 [S, N]), K = max(steps), one pick and gain per step run, -1 and 0 from
    a kernel's stop or its last step on.

    Float64, so float32 cosine kernels keep the small gains late picks have. Every step runs on
    the kernels' device and the host never waits for a gain: from the stop on d2 is left as it
    is, so each later step finds the same best gain, below min_gain again, and changes nothing.
    A padded entry's d2 is 0, so it is never a live pick. A step's dot products with the picks
    so far are each summed along one contiguous row (multiply, then sum the last axis), so a
    kernel's values do not depend on the batch or the padding around it: on the CPU a kernel
    gives the same bits alone or batched (BLAS's gemv and gemm sum in an order that depends on
    their shapes). All of a question's segments run as one batch (`span_scores_batch`): a
    step's dozen operations once instead of once per segment.
    `read_back` (offline, where k may be far beyond the kernel's rank) reads each step's gains
    back and ends the loop once no kernel picked.
    """
    s, n, _ = kernels.shape
    k = max(steps, default=0)
    # each kernel row followed by its row of the picks' vectors (c), so that one gather brings both
    rows = kernels.new_zeros(s, n, n + k, dtype=torch.float64)
    rows[:, :, :n] = kernels.detach()
    lk, ct = rows[:, :, :n], rows[:, :, n:]
    d2 = lk.diagonal(dim1=1, dim2=2).clone()
    limit = None if min(steps, default=0) == k else to_device(torch.tensor(steps), lk.device)
    picks, gains, made = [], [], []
    for i in range(k):
        best, j = torch.max(d2, 1)
        live = best > min_gain
        if limit is not None:
            live &= limit > i
        if read_back and not bool(live.any()):
            break
        picked = rows.gather(1, j.view(s, 1, 1).expand(s, 1, n + k))  # row j: its kernel row, then c_j
        e = torch.sub(picked[:, 0, :n], (ct[:, :, :i] * picked[:, :, n:n + i]).sum(2), out=ct[:, :, i])
        e.div_(_sqrt(best)[:, None])
        d2 = torch.where(live[:, None], torch.addcmul(d2, e, e, value=-1.0).scatter_(1, j.view(s, 1), -math.inf), d2)
        picks.append(j)
        gains.append(best)
        made.append(live)
    if not picks:
        return lk.new_zeros(s, 0, dtype=torch.long), lk.new_zeros(s, 0), d2
    live = torch.stack(made, 1)
    return torch.where(live, torch.stack(picks, 1), -1), torch.where(live, torch.stack(gains, 1), 0.0), d2


def greedy_map_gains(kernel: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy MAP on a PSD `kernel` [n, n]: (selection order [k] long, gain of each pick [k]).

    Picks made by the diagonal fill (gain <= 1e-10) report gain 0.
    """
    n = int(kernel.shape[0])
    k = max(0, min(int(k), n))
    picks, gains, _ = _greedy(kernel[None], [k], read_back=True)
    picks, gains = picks[0], gains[0]
    if picks.numel() == k:
        return picks, gains
    diag = kernel.detach().to(torch.float64).diagonal()
    free = torch.ones(n, dtype=torch.bool)
    free[picks] = False
    rest = torch.nonzero(free).flatten()
    fill = rest[torch.sort(diag[rest], descending=True, stable=True).indices[: k - picks.numel()]]
    return torch.cat([picks, fill]), torch.cat([gains, torch.zeros(fill.numel(), dtype=torch.float64)])


def greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """The k items greedy MAP picks from `kernel` [n, n], in selection order (never NaN)."""
    return greedy_map_gains(kernel, k)[0]


def unit_kernel(units: torch.Tensor) -> torch.Tensor:
    """Cosine kernel of unit-norm rows [n, D], diagonal exactly 1 (0 for zero rows).

    Rounding leaves `u @ u` a few ulps off 1, which would decide the ties between equally new
    tokens (every first pick at r = 1) instead of the lower index.
    """
    kernel = units @ units.T
    diag = kernel.diagonal()
    diag.copy_((diag > 0.5).to(kernel.dtype))
    return kernel


SPAN_GAIN = 1e-5


@dataclass(frozen=True)
class SpanPicks:
    """The greedy picks of one `span_scores` block, kept until their count is on the host."""

    units: torch.Tensor  # [n, D] float32, the block
    proj: torch.Tensor  # [n, p] the block on the basis
    basis: torch.Tensor  # [p, D]
    order: torch.Tensor  # [steps] rows picked, in order; -1 from the first pick not made
    made: torch.Tensor  # 0-dim long: how many picks were made (a view into its batch's counts)

    def count(self) -> torch.Tensor:
        """How many picks were made (0-dim, on the device)."""
        return self.made

    def extend(self, made: int) -> torch.Tensor:
        """The basis with the `made` picks' residuals appended, orthonormalised: a size the host
        must know, as every later product of the segment is shaped by it."""
        if made == 0:
            return self.basis
        picked = self.order[:made]
        resid = self.units[picked] - self.proj[picked] @ self.basis
        resid -= (resid @ self.basis.T) @ self.basis  # float32 Gram-Schmidt drifts: re-orthogonalise once
        return torch.cat([self.basis.float(), torch.linalg.qr(resid.T).Q.T])


def _padded(rows: list[torch.Tensor], value: float) -> torch.Tensor:
    """Tensors of one rank, stacked, each padded with `value` to the largest's size."""
    if len(rows) == 1:  # a batch of one (ingest's block): a view, no copy
        return rows[0][None]
    size = [max(r.shape[d] for r in rows) for d in range(rows[0].dim())]
    if all(list(r.shape) == size for r in rows):
        return torch.stack(rows)
    out = rows[0].new_full((len(rows), *size), value)
    for i, r in enumerate(rows):
        out[(i, *(slice(0, n) for n in r.shape))] = r
    return out


def span_scores(
    units: torch.Tensor, basis: torch.Tensor, relevance: torch.Tensor | None, picks: int, rank: int
) -> tuple[torch.Tensor, SpanPicks | None]:
    """Greedy MAP scores [n] (float64) of a block of unit tokens given the picks behind `basis`.

    `basis` [p, D] is an orthonormal basis of the tokens picked before (float32). For a cosine
    kernel, conditioning on them is the Schur complement `C - A A^T`, `A = units @ basis.T`
    (a token's gain is its residual's squared norm), and Eq. 9's relevance scales it as
    `diag(r) (C - A A^T) diag(r)`, exact because scaling a picked token by r > 0 keeps its
    span. Up to `picks` tokens are picked while the basis has fewer than `rank` rows; a pick
    scores its gain, every other token its residual gain after the picks, so sorting by score
    replays the greedy order. A gain <= SPAN_GAIN is float32 rounding of a vector already in
    the span (offline's float64 stops at 1e-10): such a token scores `SPAN_GAIN r^2 / 2`, below
    every pick, so that ranking by score fills by relevance and then by the lower row, as
    `greedy_map_gains` fills by diagonal. Returns (scores, the picks to extend the basis with,
    None when none could be made). Nothing is read back. When no pick can be made (the basis is
    full) only the kernel's diagonal is computed: [n] instead of [n, n], so any number of
    tokens is scored in one call.
    """
    return span_scores_batch([(units, basis, relevance)], picks, rank)[0]


def span_scores_batch(
    blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], picks: int, rank: int
) -> list[tuple[torch.Tensor, SpanPicks | None]]:
    """`span_scores` of independent blocks (units, basis, relevance: given for every block or
    for none) at once: the blocks that pick share one batched greedy, and each block's scores
    are the bits it gets alone (the greedy's sums do not depend on the batch; each block's own
    products keep their shapes)."""
    out: list[tuple[torch.Tensor, SpanPicks | None] | None] = [None] * len(blocks)
    picking = []
    for b, (units, basis, relevance) in enumerate(blocks):
        u = units.float()
        proj = u @ basis.T
        r = None if relevance is None else relevance.to(torch.float64)
        steps = max(0, min(int(picks), int(rank) - basis.shape[0], u.shape[0]))
        if steps == 0:  # nothing to pick: every score is a residual gain, the diagonal alone
            unit = (torch.linalg.vector_norm(u, dim=-1).square() > 0.5).to(torch.float64)  # unit_kernel's diagonal
            d2 = unit - proj.square().sum(-1).to(torch.float64)
            if r is not None:
                d2 = r * d2 * r
            out[b] = (torch.where(d2 <= SPAN_GAIN, _fill(r), d2), None)
            continue
        kernel = unit_kernel(u).to(torch.float64) - (proj @ proj.T).to(torch.float64)
        if r is not None:
            kernel = r[:, None] * kernel * r[None, :]
        picking.append((b, u, proj, basis, r, steps, kernel))
    if picking:
        kernels = _padded([p[6] for p in picking], 0.0)
        order, gains, d2 = _greedy(kernels, [p[5] for p in picking], SPAN_GAIN)
        made = (order >= 0).sum(1)
        n = kernels.shape[1]
        fill = _fill(None) if picking[0][4] is None else _padded([_fill(p[4]) for p in picking], 0.0)
        scores = torch.where(d2 <= SPAN_GAIN, fill, d2)
        slot = torch.where(order >= 0, order, n)  # picks not made land in a spare column
        scores = torch.cat([scores, scores.new_zeros(len(picking), 1)], 1).scatter_(1, slot, gains)
        for i, (b, u, proj, basis, _, steps, _) in enumerate(picking):
            out[b] = (scores[i, :u.shape[0]], SpanPicks(u, proj, basis, order[i, :steps], made[i]))
    return out


def _fill(r: torch.Tensor | None) -> torch.Tensor | float:
    """What a token already in the span scores: below every pick, by relevance."""
    return SPAN_GAIN / 2 if r is None else SPAN_GAIN / 2 * r.square()
