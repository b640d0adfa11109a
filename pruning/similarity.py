"""Shared math for the pruners: cosine similarity and deterministic top-k (PRUNERS.md notation)."""
from __future__ import annotations

import torch

EPS = 1e-6


def normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dim in float32 (eps 1e-6), as every `cos` in PRUNERS.md."""
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

    A stable descending sort keeps equal scores in index order, which is the tie rule.
    NaN never reaches here from our pruners; it would sort first and is treated as a bug.
    """
    k = max(0, min(int(k), score.numel()))
    order = torch.sort(score.flatten(), descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def minmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Min-max normalise along dim; a constant vector becomes 0."""
    lo = x.amin(dim=dim, keepdim=True)
    span = x.amax(dim=dim, keepdim=True) - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), torch.zeros_like(x))
