"""Greedy MAP inference for a determinantal point process (docs/PRUNERS.md, "HieraVid", step 4).

HieraVid ("HieraVid: Hierarchical Token Pruning for Fast Video Large Language Models",
Sec. 3.2, Eq. 6-7 and 10) picks each segment's tokens by the MAP of a DPP. `greedy_map` is the
fast greedy MAP of Chen et al. (2018) that HieraVid (via CDPruner) uses: pick `j = argmax d2`,
`e = (L[j] - c[:i, j] @ c[:i]) / sqrt(d2[j])`, `d2 -= e**2`, `d2[j] = -inf`. `d2[j]` at the
moment j is picked is j's gain, det(L_{S+j}) / det(L_S), so gains never increase and a prefix
of the order is the greedy pick for a smaller k. Once the best gain is <= 1e-10 the rest of
the set lies numerically in the span of what was picked; dividing by its square root would give
NaN, so the remaining picks are filled by descending diagonal (ties toward the lower index).

`span_greedy` serves the streaming HieraVid, which cannot afford a DPP over a whole segment per
group: it runs the same greedy in feature space on one block of tokens at a time, conditioned on
an orthonormal basis of the segment's earlier picks, which it extends (pruning/hieravid.py,
departure 4, says why and what it costs).
"""
from __future__ import annotations

import math

import torch

MIN_GAIN = 1e-10


def _greedy(kernel: torch.Tensor, k: int, min_gain: float = MIN_GAIN) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to k greedy picks, stopping at the first gain <= min_gain: (picks, gains, residual d2).

    Float64, so float32 cosine kernels keep the small gains late picks have. Picks and gains
    live in Python lists because per-element tensor writes cost more than the arithmetic here.
    """
    lk = kernel.detach().to(torch.float64)
    n = int(lk.shape[0])
    d2 = lk.diagonal().clone()
    ct = torch.zeros(n, max(0, min(int(k), n)), dtype=torch.float64)
    rows = lk.unbind(0)
    picks: list[int] = []
    gains: list[float] = []
    for i in range(ct.shape[1]):
        best, j = torch.max(d2, 0)
        gain, j = best.item(), j.item()
        if not gain > min_gain:
            break
        picks.append(j)
        gains.append(gain)
        e = torch.addmv(rows[j], ct[:, :i], ct[j, :i], alpha=-1.0).div_(math.sqrt(gain))
        ct[:, i] = e
        d2.addcmul_(e, e, value=-1.0)
        d2[j] = -math.inf
    return torch.tensor(picks, dtype=torch.long), torch.tensor(gains, dtype=torch.float64), d2


def greedy_map_gains(kernel: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy MAP on a PSD `kernel` [n, n]: (selection order [k] long, gain of each pick [k]).

    Picks made by the diagonal fill (gain <= 1e-10) report gain 0.
    """
    n = int(kernel.shape[0])
    k = max(0, min(int(k), n))
    picks, gains, _ = _greedy(kernel, k)
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


def span_greedy(
    units: torch.Tensor, basis: torch.Tensor, relevance: torch.Tensor | None, picks: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
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
    `greedy_map_gains` fills by diagonal. Returns (scores, the basis with the picks appended).
    When no pick can be made (the basis is full) only the kernel's diagonal is computed: [n]
    instead of [n, n], so any number of tokens is scored in one call.
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
        return torch.where(d2 <= SPAN_GAIN, fill, d2), basis
    kernel = unit_kernel(u).to(torch.float64) - (proj @ proj.T).to(torch.float64)
    if r is not None:
        kernel = r[:, None] * kernel * r[None, :]
    picked, gains, d2 = _greedy(kernel, steps, SPAN_GAIN)
    scores = torch.where(d2 <= SPAN_GAIN, fill, d2)
    scores[picked] = gains
    if picked.numel() == 0:
        return scores, basis
    resid = u[picked] - proj[picked] @ basis
    resid -= (resid @ basis.T) @ basis  # float32 Gram-Schmidt drifts: re-orthogonalise once
    return scores, torch.cat([basis.float(), torch.linalg.qr(resid.T).Q.T])
