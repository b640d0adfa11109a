"""Greedy MAP inference for a determinantal point process (docs/PRUNERS.md, "HieraVid", step 4).

HieraVid ("HieraVid: Hierarchical Token Pruning for Fast Video Large Language Models",
Sec. 3.2, Eq. 6-7 and 10) picks each segment's tokens by the MAP of a DPP. `greedy_map` is the
fast greedy MAP of Chen et al. (2018) that HieraVid (via CDPruner) uses: pick `j = argmax d2`,
`e = (L[j] - c[:i, j] @ c[:i]) / sqrt(d2[j])`, `d2 -= e**2`, `d2[j] = -inf`. `d2[j]` at the
moment j is picked is j's gain, det(L_{S+j}) / det(L_S), so gains never increase and a prefix
of the order is the greedy pick for a smaller k. Once the best gain is <= 1e-10 the rest of
the set lies numerically in the span of what was picked; dividing by its square root would give
NaN, so the remaining picks are filled by descending diagonal (ties toward the lower index).

`block_scores` and `span_of` serve the streaming HieraVid, which cannot afford a DPP over a
whole segment per group: it runs the same greedy on one block of tokens at a time, conditioned
on the tokens picked in the block before (pruning/hieravid.py, departure 4, says why and what
it costs).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

MIN_GAIN = 1e-10


def _greedy(kernel: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to k greedy picks, stopping at the first gain <= MIN_GAIN: (picks, gains, residual d2).

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
        if not gain > MIN_GAIN:
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


class Span(NamedTuple):
    """The span of linearly independent unit rows `vectors` [p, D], with the Cholesky factor
    `chol` [p, p] (float64) of their Gram matrix: projecting onto it needs no orthonormal basis."""

    vectors: torch.Tensor
    chol: torch.Tensor


def span_of(units: torch.Tensor) -> Span:
    """The span of unit rows [p, D], keeping the longest prefix whose Gram matrix is
    numerically positive definite (greedy picks are independent, but rounding may say not)."""
    gram = (units @ units.T).to(torch.float64)
    p = units.shape[0]
    while True:  # a shorter prefix can round differently again, so re-check each one
        chol, info = torch.linalg.cholesky_ex(gram[:p, :p])
        if int(info) == 0:
            return Span(units[:p], chol)
        p = int(info) - 1


def block_scores(
    units: torch.Tensor, given: Span | None, relevance: torch.Tensor | None, picks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPP ranking scores [n] of a block of tokens and the greedy picks that set them.

    `units` [n, D] are unit-norm tokens, so their cosine kernel is `units @ units.T`. Having
    already picked the tokens of `given` conditions the DPP to the Schur complement
    `C - A G^-1 A^T`, `A = units @ given.vectors.T`, G their Gram matrix; Eq. 9's relevance
    scales it as `diag(r) (C - A G^-1 A^T) diag(r)`, exact because scaling a picked token by
    r > 0 keeps its span. The first `picks` greedy picks score their gain; every other token
    scores its residual gain after them, which is below the last pick's gain, so sorting by
    score replays the greedy order for the picks and ranks the rest by what they would add.
    """
    kernel = unit_kernel(units).to(torch.float64)
    if given is not None and given.vectors.shape[0]:
        cross = (given.vectors @ units.T).to(torch.float64)
        w = torch.linalg.solve_triangular(given.chol, cross, upper=False)
        kernel = kernel - w.T @ w
    if relevance is not None:
        r = relevance.to(torch.float64)
        kernel = r[:, None] * kernel * r[None, :]
    picked, gains, d2 = _greedy(kernel, picks)
    scores = d2.clamp_min(0.0)
    scores[picked] = gains
    return scores, picked
