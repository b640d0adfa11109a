"""Shared math for the pruners: cosine similarity and deterministic top-k (docs/PRUNERS.md,
"Notation and shared rules")."""
from __future__ import annotations

import math

import torch

EPS = 1e-6


def normalize(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """L2-normalise the last dim in float32 (eps 1e-6), as every `cos` in docs/PRUNERS.md;
    `inplace` overwrites a float32 `x` (a copy the caller owns) instead of making another."""
    x = x.float()
    norm = x.norm(dim=-1, keepdim=True).clamp_min(EPS)
    return x.div_(norm) if inplace else x / norm


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of two equally shaped [..., D] tensors."""
    return (normalize(a) * normalize(b)).sum(-1)


def topk_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, ties toward the lower index, returned ascending
    (`smallest_rows` of the negated scores). NaN never comes from our pruners; if it does, it
    ranks as +inf."""
    flat = score.flatten()
    n = flat.numel()
    k = max(0, min(int(k), n))
    if k == n:
        return torch.arange(n, device=flat.device)
    return smallest_rows(-flat.nan_to_num(nan=math.inf, posinf=math.inf, neginf=-math.inf), k)


def smallest_rows(key: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of the k smallest of `key` [n], ties toward the lower row, ascending.

    Selection by threshold (the k-th smallest value, then the lowest-row ties at it) is O(n);
    a full sort per evicted group cost a millisecond at store sizes. Every size is known from
    `k`, so nothing is read back from the device."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=key.device)
    tau = torch.kthvalue(key, k).values
    below = key < tau
    tied = key == tau
    return rows_of(below | (tied & (torch.cumsum(tied, 0) <= k - below.sum())), k)


def rows_of(mask: torch.Tensor, k: int) -> torch.Tensor:
    """The rows where `mask` [n] is set, ascending, when exactly k are: `torch.nonzero_static`
    (nothing read back), twice as fast on the CPU."""
    at = torch.where(mask, torch.cumsum(mask, 0), 0)  # 1..k, and 0 for the rows left out
    rows = torch.empty(k + 1, dtype=torch.long, device=mask.device)
    return rows.scatter_(0, at, torch.arange(mask.shape[0], device=mask.device))[1:]


def minmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Min-max normalise along dim; a constant vector becomes 0."""
    lo = x.amin(dim=dim, keepdim=True)
    span = x.amax(dim=dim, keepdim=True) - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), torch.zeros_like(x))
