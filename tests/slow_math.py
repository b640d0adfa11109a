"""Slow, loop-level float64 references the equation tests compare the pruners against, each
written from its docs/PRUNERS.md step with plain loops."""
from __future__ import annotations

import torch


def f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def cosv(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two vectors in float64, norms clamped at 1e-6 as docs/PRUNERS.md says."""
    a, b = a.double(), b.double()
    return float(a @ b) / (max(float(a.norm()), 1e-6) * max(float(b.norm()), 1e-6))


def mean_rows(rows) -> torch.Tensor:
    """Mean of a list of [D] vectors, summed one by one in float64."""
    total = torch.zeros(rows[0].shape[-1], dtype=torch.float64)
    for r in rows:
        total += r.double()
    return total / len(rows)
