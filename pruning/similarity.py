"""Shared math for the pruners: cosine similarity and deterministic top-k (docs/PRUNERS.md,
"Notation and shared rules")."""
from __future__ import annotations

import math

import torch

EPS = 1e-6


def normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dim in float32 (eps 1e-6), as every `cos` in docs/PRUNERS.md."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of two equally shaped [..., D] tensors."""
    return (normalize(a) * normalize(b)).sum(-1)


def cos_matrix(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise cosine [n, m] of rows of a [n, D] and b [m, D] (b defaults to a)."""
    na = normalize(a)
    nb = na if b is None else normalize(b)
    return na @ nb.T


def topk_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, ties toward the lower index, returned ascending.

    Selection by threshold (the k-th largest value, then the lowest-index ties at it) is O(n);
    a full sort per evicted group cost a millisecond at store sizes. Every size is known from
    `k`, so nothing is read back from the device. NaN never comes from our pruners; if it
    does, it ranks as +inf.
    """
    flat = score.flatten()
    n = flat.numel()
    k = max(0, min(int(k), n))
    if k == n:
        return torch.arange(n, device=flat.device)
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=flat.device)
    key = flat.nan_to_num(nan=math.inf, posinf=math.inf, neginf=-math.inf)
    thr = torch.kthvalue(key, n - k + 1).values
    above = key > thr
    tied = key == thr
    take = tied & (torch.cumsum(tied, 0) <= k - above.sum())
    return torch.nonzero_static(above | take, size=k).flatten()


def minmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Min-max normalise along dim; a constant vector becomes 0."""
    lo = x.amin(dim=dim, keepdim=True)
    span = x.amax(dim=dim, keepdim=True) - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), torch.zeros_like(x))
