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
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MIN_GAIN = 1e-10


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root of a 0-dim float64 tensor (as `math.sqrt`), on its
    device. torch's own float64 sqrt is an ulp off now and then on the CPU (its vectorised
    math), and every later gain of the greedy would move with it; LAPACK's 1x1 Cholesky factor
    is the hardware's root. A GPU's float64 sqrt is correctly rounded, and a solver call per
    greedy step would cost a launch of its own there. A non-positive x gives a meaningless
    value (the greedy masks it)."""
    if x.device.type != "cpu":
        return torch.sqrt(x)
    return torch.linalg.cholesky_ex(x.view(1, 1)).L.view(())


def _greedy(
    kernel: torch.Tensor, k: int, min_gain: float = MIN_GAIN, read_back: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to k greedy picks, stopping at the first gain <= min_gain: (picks, gains, residual d2),
    one pick and gain per step run, -1 and 0 from the stop on.

    Float64, so float32 cosine kernels keep the small gains late picks have. Every step runs on
    the kernel's device and the host never waits for a gain: from the stop on d2 is left as it
    is, so each later step finds the same best gain, below min_gain again, and changes nothing.
    `read_back` (offline, where k may be far beyond the kernel's rank) reads each gain back and
    ends the loop at the stop instead.
    """
    lk = kernel.detach().to(torch.float64)
    n = int(lk.shape[0])
    k = max(0, min(int(k), n))
    d2 = lk.diagonal().clone()
    ct = lk.new_zeros(n, k)
    picks, gains = [], []
    for i in range(k):
        best, j = torch.max(d2, 0)
        live = best > min_gain
        if read_back and not live:
            break
        j = j.view(1)  # a 0-dim index would be read back as a Python int
        e = torch.addmv(lk.index_select(0, j)[0], ct[:, :i], ct.index_select(0, j)[0, :i], alpha=-1.0)
        e.div_(_sqrt(best))
        ct[:, i] = e
        d2 = torch.where(live, torch.addcmul(d2, e, e, value=-1.0).index_fill_(0, j, -math.inf), d2)
        picks.append(j)
        gains.append(best)
    if not picks:
        return torch.zeros(0, dtype=torch.long, device=lk.device), lk.new_zeros(0), d2
    gains = torch.stack(gains)
    live = gains > min_gain
    return torch.where(live, torch.cat(picks), -1), torch.where(live, gains, 0.0), d2


def greedy_map_gains(kernel: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy MAP on a PSD `kernel` [n, n]: (selection order [k] long, gain of each pick [k]).

    Picks made by the diagonal fill (gain <= 1e-10) report gain 0.
    """
    n = int(kernel.shape[0])
    k = max(0, min(int(k), n))
    picks, gains, _ = _greedy(kernel, k, read_back=True)
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

    def count(self) -> torch.Tensor:
        """How many picks were made (0-dim, on the device)."""
        return (self.order >= 0).sum()

    def extend(self, made: int) -> torch.Tensor:
        """The basis with the `made` picks' residuals appended, orthonormalised: a size the host
        must know, as every later product of the segment is shaped by it."""
        if made == 0:
            return self.basis
        picked = self.order[:made]
        resid = self.units[picked] - self.proj[picked] @ self.basis
        resid -= (resid @ self.basis.T) @ self.basis  # float32 Gram-Schmidt drifts: re-orthogonalise once
        return torch.cat([self.basis.float(), torch.linalg.qr(resid.T).Q.T])


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
    u = units.float()
    proj = u @ basis.T
    r = None if relevance is None else relevance.to(torch.float64)
    steps = max(0, min(int(picks), int(rank) - basis.shape[0], u.shape[0]))
    fill = SPAN_GAIN / 2 if r is None else SPAN_GAIN / 2 * r.square()
    if steps == 0:  # nothing to pick: every score is a residual gain, the diagonal alone
        unit = (torch.linalg.vector_norm(u, dim=-1).square() > 0.5).to(torch.float64)  # unit_kernel's diagonal
        d2 = unit - proj.square().sum(-1).to(torch.float64)
        if r is not None:
            d2 = r * d2 * r
        return torch.where(d2 <= SPAN_GAIN, fill, d2), None
    kernel = unit_kernel(u).to(torch.float64) - (proj @ proj.T).to(torch.float64)
    if r is not None:
        kernel = r[:, None] * kernel * r[None, :]
    order, gains, d2 = _greedy(kernel, steps, SPAN_GAIN)
    n = u.shape[0]
    scores = torch.where(d2 <= SPAN_GAIN, fill, d2)
    slot = torch.where(order >= 0, order, n)  # picks not made land in a spare slot
    scores = torch.cat([scores, scores.new_zeros(1)]).index_copy_(0, slot, gains)[:n]
    return scores, SpanPicks(u, proj, basis, order)
