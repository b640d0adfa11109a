"""A question ranks the memory in place (`TokenMemory.frozen`): the same picks and the same
rows as ranking a copy of everything held (`snapshot`), with no held vector copied."""
from __future__ import annotations

import threading

import pytest
import torch

from pruning import PRUNERS, TokenMemory, get_pruner
from pruning.base import RowView
from pruning.types import FrameTokens


def stream(n: int, side: int = 6, d: int = 32, seed: int = 0) -> list[FrameTokens]:
    """A drifting background, a moving bright patch, and two side vectors per token (deepstack)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(side, side, d, generator=gen)
    groups = []
    for i in range(n):
        x = base + 0.05 * torch.randn(side, side, d, generator=gen)
        x[i % side, (2 * i) % side] += 3 * torch.randn(d, generator=gen)
        extras = {"deepstack": torch.randn(2, side, side, d, generator=gen)}
        groups.append(FrameTokens(i, 0.5 * i, x, extras))
    return groups


def filled(name: str, groups: int = 30) -> TokenMemory:
    mem = TokenMemory(120, get_pruner(name), recent_groups=3, evict_slack=20)
    for g in stream(groups):
        mem.add(g)
    return mem


def assert_same_rows(a, b):
    assert torch.equal(a.tokens, b.tokens)
    for col in ("group", "pts", "row", "col", "score", "recent", "run"):
        assert torch.equal(getattr(a, col), getattr(b, col)), col
    assert a.meta.keys() == b.meta.keys() and all(torch.equal(a.meta[k], b.meta[k]) for k in a.meta)
    assert a.extras.keys() == b.extras.keys() and all(torch.equal(a.extras[k], b.extras[k]) for k in a.extras)


@pytest.mark.parametrize("name", sorted(PRUNERS))
@pytest.mark.parametrize("budget", [40, 130])
def test_ranking_in_place_equals_ranking_a_copy(name, budget):
    mem = filled(name)
    question = torch.randn(5, 32, generator=torch.Generator().manual_seed(7))
    snap = mem.snapshot()
    assert len(snap) > budget
    want = mem.pruner.rank_for_query(snap, question, budget)
    with mem.frozen() as view:
        assert len(view) == len(snap)
        got = mem.pruner.rank_for_query(view, question, budget)
        assert torch.equal(got, want)
        assert_same_rows(view.select(got), snap.select(want))


def test_the_view_of_a_memory_without_a_store_or_without_a_recent_window():
    mem = TokenMemory(120, get_pruner("echoprune"), recent_groups=3)
    groups = stream(4)
    for g in groups[:2]:
        mem.add(g)
    snap = mem.snapshot()
    with mem.frozen() as view:  # the recent window alone
        assert_same_rows(view.select(torch.arange(len(view))), snap)
    no_window = TokenMemory(120, get_pruner("echoprune"), recent_groups=0)
    for g in groups:
        no_window.add(g)
    snap = no_window.snapshot()
    with no_window.frozen() as view:  # the store alone
        assert_same_rows(view.select(torch.arange(len(view))), snap)


def test_a_row_view_with_a_tail_reads_like_its_rows_gathered():
    gen = torch.Generator().manual_seed(0)
    buf, tail = torch.randn(10, 4, generator=gen), torch.randn(3, 4, generator=gen)
    view = RowView(buf, torch.tensor([7, 2, 5]), tail)
    whole = view.materialize()
    assert whole.shape == view.shape == (6, 4)
    assert torch.equal(whole, torch.cat([buf[[7, 2, 5]], tail]))
    picks = torch.tensor([0, 2, 3, 5])
    assert torch.equal(view[picks], whole[picks])
    assert torch.equal(view._where(picks, 3), whole[picks])  # the path off the CPU, no read-back
    assert torch.equal(view.rowwise(lambda x: x.sum(1)), whole.sum(1))


def test_ingest_waits_while_a_question_ranks():
    mem = filled("echoprune", groups=10)
    nxt = stream(11)[10]
    done = threading.Event()
    worker = threading.Thread(target=lambda: (mem.add(nxt), done.set()))
    with mem.frozen() as view:
        held = len(view)
        worker.start()
        assert not done.wait(0.3)  # the group waits: the view stays what it was
        assert len(view) == held
    worker.join(5)
    assert done.is_set() and mem.groups_seen == 11


def test_a_row_view_reads_rows_in_any_order_and_of_any_part():
    gen = torch.Generator().manual_seed(1)
    buf, tail = torch.randn(12, 2, 3, generator=gen), torch.randn(4, 2, 3, generator=gen)
    view = RowView(buf, torch.tensor([9, 0, 4, 11, 6]), tail)
    whole = view.materialize()
    for picks in ([0, 1, 2], [5, 6, 8], [1, 3, 5, 7], [7, 2, 5, 0], [8, 8, 1]):
        picks = torch.tensor(picks)
        assert torch.equal(view[picks], whole[picks])
        assert torch.equal(view._where(picks, 5), whole[picks])
