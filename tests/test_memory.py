"""TokenMemory: the dense recent window, the bounded store, order, extras, merging, version, layout."""
from __future__ import annotations

import threading

import torch

from pruning import FrameTokens, GroupScore, Pruner, TokenMemory, get_pruner


def _group(i, h=3, w=4, d=8, extras=False):
    tok = torch.full((h, w, d), float(i)) + torch.arange(h * w, dtype=torch.float32).view(h, w, 1) / 100
    ex = {"deep": torch.stack([tok, -tok])} if extras else {}
    return FrameTokens(i, i * 0.5, tok, ex)


def test_recent_window_is_dense_and_store_is_bounded():
    mem = TokenMemory(capacity=20, pruner=get_pruner("recent"), recent_groups=2)
    for i in range(30):
        mem.add(_group(i))
        assert len(mem) <= 20 + 2 * 12
    snap = mem.snapshot()
    assert len(snap) == 44
    assert snap.recent.sum() == 24 and set(snap.group[snap.recent].tolist()) == {28, 29}
    key = snap.group * 10000 + snap.row * 100 + snap.col
    assert torch.equal(key, torch.sort(key).values)
    assert snap.group[~snap.recent].min() == 26  # the 'recent' pruner keeps the newest
    assert mem.tokens_seen == 360 and mem.groups_seen == 30


def test_snapshot_is_an_immutable_copy():
    mem = TokenMemory(capacity=12, pruner=get_pruner("recent"), recent_groups=1)
    for i in range(3):
        mem.add(_group(i))
    snap = mem.snapshot()
    before = snap.tokens.clone()
    for i in range(3, 10):
        mem.add(_group(i))
    assert torch.equal(snap.tokens, before)


def test_extras_travel_and_are_evicted_with_their_tokens():
    mem = TokenMemory(capacity=12, pruner=get_pruner("recent"), recent_groups=1)
    for i in range(5):
        mem.add(_group(i, extras=True))
    snap = mem.snapshot()
    assert snap.extras["deep"].shape == (len(snap), 2, 8)
    assert torch.equal(snap.extras["deep"][:, 0], snap.tokens)
    assert torch.equal(snap.extras["deep"][:, 1], -snap.tokens)


class _MergeAll(Pruner):
    """Every token after group 0 folds into group 0's token at its position."""

    name = "merge-all"

    def score(self, group):
        n = group.grid[0] * group.grid[1]
        into = torch.full((n,), -1 if group.index == 0 else 0, dtype=torch.long)
        return GroupScore(score=torch.zeros(n), merge_into=into)


def test_merge_into_keeps_a_running_mean_at_the_run_head():
    mem = TokenMemory(capacity=100, pruner=_MergeAll(), recent_groups=0)
    for i in range(4):
        mem.add(_group(i))
    snap = mem.snapshot()
    assert len(snap) == 12 and set(snap.group.tolist()) == {0}
    expect = torch.stack([_group(i).tokens for i in range(4)]).mean(0).reshape(12, -1)
    torch.testing.assert_close(snap.tokens, expect)


def test_capacity_zero_keeps_only_the_recent_window():
    mem = TokenMemory(capacity=0, pruner=get_pruner("recent"), recent_groups=1)
    for i in range(4):
        mem.add(_group(i))
    assert len(mem) == 12 and mem.snapshot().recent.all()


def test_version_changes_with_what_is_held_and_not_with_reads():
    mem = TokenMemory(capacity=12, pruner=get_pruner("recent"), recent_groups=1)
    seen = [mem.version]
    mem.add(_group(0))  # append only
    seen.append(mem.version)
    mem.add(_group(1))  # group 0 moves to the store
    seen.append(mem.version)
    before = mem.tokens_evicted
    mem.add(_group(2))  # the store is over capacity: group 0 is evicted
    assert mem.tokens_evicted > before
    seen.append(mem.version)
    mem.snapshot()
    mem.layout()
    len(mem)
    seen.append(mem.version)
    mem.reset_stream()
    seen.append(mem.version)
    assert seen[4] == seen[3]
    del seen[4]
    assert len(set(seen)) == len(seen), seen


def test_version_changes_on_a_merge_into_a_held_token():
    mem = TokenMemory(capacity=100, pruner=_MergeAll(), recent_groups=0)
    mem.add(_group(0))
    v, n = mem.version, len(mem)
    mem.add(_group(1))
    assert len(mem) == n and mem.version != v


def test_layout_is_the_snapshots_columns_without_vectors():
    mem = TokenMemory(capacity=20, pruner=get_pruner("uniform"), recent_groups=2)
    empty = mem.layout()
    assert empty.group.numel() == 0 and empty.grid == (0, 0) and empty.tokens_seen == 0
    for i in range(9):
        mem.add(_group(i))
    lay, snap = mem.layout(), mem.snapshot()
    for name in ("group", "pts", "row", "col"):
        assert torch.equal(getattr(lay, name), getattr(snap, name)), name
        assert getattr(lay, name).dtype == getattr(snap, name).dtype
    assert lay.grid == snap.grid == (3, 4)
    assert (lay.tokens_seen, lay.groups_seen, lay.version) == (mem.tokens_seen, mem.groups_seen, mem.version)
    held = lay.group.clone()
    mem.add(_group(9))
    assert torch.equal(lay.group, held)  # a copy, not a view of the store


def test_snapshots_are_consistent_while_ingest_runs():
    mem = TokenMemory(capacity=24, pruner=get_pruner("recent"), recent_groups=2)
    stop = threading.Event()

    def ingest():
        i = 0
        while not stop.is_set():
            mem.add(_group(i))
            i += 1

    t = threading.Thread(target=ingest)
    t.start()
    try:
        for _ in range(200):
            snap = mem.snapshot()
            assert len(snap) <= 24 + 24
            if len(snap):
                assert torch.equal(snap.tokens[:, 0].floor(), snap.group.float())
    finally:
        stop.set()
        t.join()
