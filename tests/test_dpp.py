"""Greedy DPP MAP (docs/PRUNERS.md, "HieraVid" step 4; HieraVid Sec. 3.2, Eq. 6-7) against
brute-force greedy log-det."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pruning.dpp import (SPAN_GAIN, _greedy, _sqrt, greedy_map, greedy_map_gains, span_scores,
                         span_scores_batch, unit_kernel)
from pruning.host_sync import HostSyncs
from pruning.similarity import normalize


def span_greedy(units, basis, relevance, picks, rank):
    """`span_scores` and the basis it leaves, the picks appended (as HieraVid's ingest does)."""
    scores, picked = span_scores(units, basis, relevance, picks, rank)
    return scores, basis if picked is None else picked.extend(int(picked.count()))


def brute_greedy(kernel: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
    """Greedy log-det written out: each step adds the item maximising det(L_{S+j}) (ties to
    the lower index); once the best ratio det(L_{S+j}) / det(L_S) is <= 1e-10, the rest is
    filled by descending diagonal."""
    lk = kernel.double()
    n = lk.shape[0]
    picked: list[int] = []
    gains: list[float] = []
    prev_det = 1.0
    while len(picked) < k:
        best_j, best_det = -1, -float("inf")
        for j in range(n):
            if j in picked:
                continue
            s = picked + [j]
            det = float(torch.linalg.det(lk[s][:, s]))
            if det > best_det:
                best_j, best_det = j, det
        if best_det / prev_det <= 1e-10:
            break
        picked.append(best_j)
        gains.append(best_det / prev_det)
        prev_det = best_det
    rest = sorted((j for j in range(n) if j not in picked), key=lambda j: (-float(lk[j, j]), j))
    fill = rest[: k - len(picked)]
    return picked + fill, gains + [0.0] * len(fill)


def psd(seed: int, n: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, rank, generator=g, dtype=torch.float64)
    scale = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    return scale[:, None] * (b @ b.T) * scale[None, :]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 7), k=st.integers(0, 8))
def test_greedy_map_matches_brute_force_on_full_rank_kernels(seed, n, k):
    kernel = psd(seed, n, n + 2)
    order, gains = greedy_map_gains(kernel, k)
    want, want_gains = brute_greedy(kernel, min(k, n))
    assert order.tolist() == want
    assert torch.allclose(gains, torch.tensor(want_gains, dtype=torch.float64), rtol=1e-6, atol=1e-9)
    assert torch.equal(greedy_map(kernel, k), order)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 9), rank=st.integers(0, 3), dup=st.booleans())
def test_singular_kernels_never_nan_never_duplicate(seed, n, rank, dup):
    kernel = psd(seed, n, rank)
    if dup:
        kernel[1], kernel[:, 1] = kernel[0], kernel[:, 0]
        kernel[1, 1] = kernel[0, 0]
    for lk in (kernel.float(), kernel * 1e6):
        order, gains = greedy_map_gains(lk, n)
        assert sorted(order.tolist()) == list(range(n))
        assert not torch.isnan(gains).any()
    order, gains = greedy_map_gains(kernel, n)
    real = int((gains > 0).sum())
    assert real <= rank
    assert bool((gains[:real] > 1e-10).all()) and bool((gains[real:] == 0).all())
    diag = kernel.diagonal()[order[real:]]
    assert bool((diag[:-1] >= diag[1:]).all())


def test_known_answers():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.6, 0.8, 0.0])
    units = torch.stack([a, a, b, torch.zeros(3)])
    kernel = units @ units.T
    order, gains = greedy_map_gains(kernel, 4)
    # both a's tie at gain 1: the lower index goes first; b adds 1 - 0.6^2; the copy of a and
    # the zero vector add nothing and are filled by descending diagonal (1 then 0).
    assert order.tolist() == [0, 2, 1, 3]
    assert torch.allclose(gains, torch.tensor([1.0, 0.64, 0.0, 0.0], dtype=torch.float64))
    assert greedy_map(torch.zeros(3, 3), 2).tolist() == [0, 1]
    assert greedy_map(kernel, 0).numel() == 0


def conditional_gain(kernel: torch.Tensor, given: list[int], j: int) -> float:
    """det(L_{G+j}) / det(L_G): the gain of j once `given` is picked."""
    s = given + [j]
    den = float(torch.linalg.det(kernel[given][:, given])) if given else 1.0
    return float(torch.linalg.det(kernel[s][:, s])) / den


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 6), b=st.integers(0, 3), with_r=st.booleans())
def test_span_greedy_scores_are_greedy_gains_conditioned_on_earlier_picks(seed, n, b, with_r):
    g = torch.Generator().manual_seed(seed)
    ref = normalize(torch.randn(b, 12, generator=g))
    units = normalize(torch.randn(n, 12, generator=g))
    r = torch.rand(n, generator=g) + 0.1 if with_r else None
    picks = n // 2 + 1
    basis = torch.linalg.qr(ref.T).Q.T if b else torch.zeros(0, 12)
    scores, grown = span_greedy(units, basis, r, picks, rank=b + picks)
    picked = torch.sort(scores, descending=True, stable=True).indices[:picks].tolist()
    # slow: the joint kernel of [ref; units] (ref relevance 1), gains conditioned on ref
    allv = torch.cat([ref, units]).double()
    rr = torch.cat([torch.ones(b), r if r is not None else torch.ones(n)]).double()
    kernel = rr[:, None] * (allv @ allv.T) * rr[None, :]
    given = list(range(b))
    for j in picked:
        want = max(conditional_gain(kernel, given, b + i) for i in range(n) if b + i not in given)
        assert abs(conditional_gain(kernel, given, b + j) - want) < 1e-5
        assert abs(float(scores[j]) - want) < 1e-5
        given.append(b + j)
    for i in set(range(n)) - set(picked):
        assert abs(float(scores[i]) - max(conditional_gain(kernel, given, b + i), 0.0)) < 1e-5
    assert grown.shape == (b + picks, 12)
    assert torch.allclose(grown @ grown.T, torch.eye(b + picks), atol=1e-5)
    assert torch.equal(grown[:b], basis)


def test_span_greedy_stops_at_its_rank_and_fills_what_the_span_holds_by_relevance():
    g = torch.Generator().manual_seed(4)
    units = normalize(torch.randn(6, 4, generator=g))
    scores, basis = span_greedy(units, torch.zeros(0, 4), None, picks=6, rank=3)
    assert basis.shape == (3, 4) and int((scores > SPAN_GAIN).sum()) == 6  # rank 3 of 4: residuals stay
    scores, basis = span_greedy(units, torch.zeros(0, 4), None, picks=6, rank=8)
    assert basis.shape == (4, 4)  # the span is full after 4: the rest lie in it
    assert scores.tolist().count(SPAN_GAIN / 2) == 2
    r = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.2, 0.6])
    scores, _ = span_greedy(units, basis, r, picks=6, rank=8)
    assert torch.allclose(scores, SPAN_GAIN / 2 * r.double() ** 2)


def test_unit_kernel_diagonal_is_exact():
    units = torch.cat([normalize(torch.randn(5, 7)), torch.zeros(1, 7)])
    assert unit_kernel(units).diagonal().tolist() == [1.0] * 5 + [0.0]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 40), b=st.integers(1, 8), with_r=st.booleans())
def test_span_greedy_with_a_full_basis_scores_the_conditioned_kernels_diagonal(seed, n, b, with_r):
    """No pick left to make: the fast path (the diagonal alone) gives the residual gains the whole
    conditioned kernel has on its diagonal, and the basis comes back unchanged."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(16, b, generator=g)).Q.T.contiguous()
    units = normalize(torch.randn(n, 16, generator=g))
    units[0] = basis[0]  # one token already in the span
    r = torch.rand(n, generator=g, dtype=torch.float64) + 0.1 if with_r else None
    scores, same = span_greedy(units, basis, r, picks=4, rank=b)
    proj = units @ basis.T
    d2 = (unit_kernel(units).double() - (proj @ proj.T).double()).diagonal()
    if r is not None:
        d2 = r * d2 * r
    fill = SPAN_GAIN / 2 if r is None else SPAN_GAIN / 2 * r.square()
    torch.testing.assert_close(scores, torch.where(d2 <= SPAN_GAIN, fill, d2), atol=1e-6, rtol=0)
    assert float(scores[0]) == float(fill if r is None else fill[0])
    assert same is basis


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 9), rank=st.integers(1, 9), k=st.integers(0, 10))
def test_the_greedy_on_the_device_runs_every_step_and_matches_the_one_that_stops(seed, n, rank, k):
    """Steps after the first small gain change nothing: the same picks and gains, -1 and 0 after
    them, the same residual diagonal, and nothing read back."""
    kernel = psd(seed, n, rank)
    stopped = [x[0] for x in _greedy(kernel[None], [min(k, n)], read_back=True)]
    with HostSyncs() as syncs:
        picks, gains, d2 = (x[0] for x in _greedy(kernel[None], [min(k, n)]))
    assert syncs.total == 0, dict(syncs.counts)
    made = stopped[0].numel()
    assert picks.numel() == min(k, n) and bool((picks[made:] == -1).all()) and bool((gains[made:] == 0).all())
    assert torch.equal(picks[:made], stopped[0]) and torch.equal(gains[:made], stopped[1])
    assert torch.equal(d2, stopped[2])


def test_span_scores_read_nothing_back_and_extend_the_basis_as_span_greedy():
    g = torch.Generator().manual_seed(5)
    units = normalize(torch.randn(30, 8, generator=g))
    r = torch.rand(30, generator=g, dtype=torch.float64)
    with HostSyncs() as syncs:
        scores, picked = span_scores(units, torch.zeros(0, 8), r, picks=6, rank=7)
    assert syncs.total == 0, dict(syncs.counts)
    want, basis = span_greedy(units, torch.zeros(0, 8), r, picks=6, rank=7)
    assert torch.equal(scores, want) and int(picked.count()) == 6
    assert torch.equal(picked.extend(6), basis)
    assert span_scores(units, basis, r, picks=6, rank=6)[1] is None  # the basis is full: nothing to pick


def test_the_greedys_square_root_is_correctly_rounded():
    """Its value divides every later step: it must be math.sqrt's, not an ulp off."""
    g = torch.Generator().manual_seed(6)
    x = torch.rand(2000, generator=g, dtype=torch.float64)
    x *= torch.exp(8 * torch.randn(2000, generator=g, dtype=torch.float64))
    assert [float(_sqrt(v)) for v in x] == [math.sqrt(v) for v in x.tolist()]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5),
       d=st.integers(2, 48), k=st.integers(1, 12))
def test_a_batch_of_padded_kernels_gives_each_kernel_the_bits_it_gets_alone(seed, sizes, d, k):
    """What lets a question's segments share one greedy: neither the batch nor the padding
    around a kernel changes a bit of its picks, gains or residuals (a kernel may stop early)."""
    g = torch.Generator().manual_seed(seed)
    kernels = [unit_kernel(normalize(torch.randn(n, d, generator=g))).double() for n in sizes]
    steps = [min(k + i, n) for i, n in enumerate(sizes)]
    width = max(sizes) + 3
    batch = torch.zeros(len(sizes), width, width, dtype=torch.float64)
    for b, kernel in enumerate(kernels):
        batch[b, :sizes[b], :sizes[b]] = kernel
    picks, gains, d2 = _greedy(batch, steps, SPAN_GAIN)
    for b, kernel in enumerate(kernels):
        alone = _greedy(kernel[None], [steps[b]], SPAN_GAIN)
        assert torch.equal(picks[b, :steps[b]], alone[0][0]) and torch.equal(gains[b, :steps[b]], alone[1][0])
        assert bool((picks[b, steps[b]:] == -1).all()) and torch.equal(d2[b, :sizes[b]], alone[2][0])


@pytest.mark.parametrize("with_r", [False, True])
def test_span_scores_of_a_batch_of_blocks_are_each_blocks_own(with_r):
    """Blocks of different sizes, one with a full basis (its diagonal alone): each gets the
    scores, picks and extended basis it gets alone, and nothing is read back."""
    g = torch.Generator().manual_seed(8)
    blocks = []
    for n, p in ((30, 0), (17, 3), (9, 0), (25, 6)):
        units = normalize(torch.randn(n, 12, generator=g))
        basis = torch.linalg.qr(torch.randn(12, p, generator=g)).Q.T if p else torch.zeros(0, 12)
        blocks.append((units, basis, torch.rand(n, generator=g, dtype=torch.float64) if with_r else None))
    with HostSyncs() as syncs:
        batched = span_scores_batch(blocks, picks=5, rank=6)
    assert syncs.total == 0, dict(syncs.counts)
    assert batched[3][1] is None  # its basis is full
    for (units, basis, r), (scores, picked) in zip(blocks, batched):
        want, want_picked = span_scores(units, basis, r, picks=5, rank=6)
        assert torch.equal(scores, want)
        if picked is not None:
            made = int(picked.count())
            assert made == int(want_picked.count()) and torch.equal(picked.extend(made), want_picked.extend(made))
