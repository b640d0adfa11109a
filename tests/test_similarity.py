"""Shared math (docs/PRUNERS.md, "Notation and shared rules"): top-k by threshold equals a stable
descending sort, ties to the lower index."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pruning.similarity import cos, minmax, topk_indices


def _by_sort(score, k):
    k = max(0, min(int(k), score.numel()))
    return torch.sort(torch.sort(score.flatten(), descending=True, stable=True).indices[:k]).values


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0, float("inf"), -float("inf")]) | st.floats(-3, 3, width=32),
                min_size=1, max_size=40), st.integers(-2, 45))
def test_topk_equals_a_stable_sort(values, k):
    score = torch.tensor(values, dtype=torch.float32)
    assert torch.equal(topk_indices(score, k), _by_sort(score, k))


def test_ties_go_to_the_lower_index_and_nan_ranks_first():
    assert topk_indices(torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0]), 2).tolist() == [1, 2]
    assert topk_indices(torch.tensor([1.0, float("nan"), 3.0]), 1).tolist() == [1]


def test_cos_and_minmax_handle_degenerate_inputs():
    assert float(cos(torch.zeros(4), torch.ones(4))) == 0.0
    assert minmax(torch.full((5,), 3.0)).tolist() == [0.0] * 5
