"""The memory on the model's device: what a group's add reads back to the host.

On a GPU every read-back stalls the camera's thread until the device catches up. `HostSyncs`
counts them on the CPU (the same Python path dispatches the same operations there), and the
`meta` device, where any read-back raises, proves a path has none at all, `.tolist()` included.
"""
from __future__ import annotations

import pytest
import torch

from pruning import PRUNERS, GroupScore, Pruner, TokenMemory, get_pruner
from pruning import base as pruning_base
from pruning.host_sync import HostSyncs
from pruning.types import FrameTokens

# Host synchronizations per added group once the store evicts, at most, each a count only the
# data determines: HieraVid's DPP candidates and basis picks.
SYNCS_PER_GROUP = {"echoprune": 0, "moprune": 0, "hieravid": 1, "forestprune": 0, "uniform": 0,
                   "recent": 0, "dtd": 0, "random": 0}
# Read late (`HostCopy`, queued and read later): how many tokens DTD's keep-mask keeps (queued when
# a group arrives, read when it leaves the recent window); how many rows a merging group leaves
# (HieraVid: queued an add before it leaves the recent window, read when it does); the oldest
# segment HieraVid's store holds (queued at an eviction, read at the next).
LATE_PER_GROUP = {"dtd": 1, "hieravid": 2}
SYNC_FREE = [name for name, n in SYNCS_PER_GROUP.items() if n == 0 and name not in LATE_PER_GROUP]


def stream(n: int, side: int = 6, seed: int = 0) -> list[FrameTokens]:
    """A side x side grid of 32-dim tokens: a drifting background and a moving bright patch."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(side, side, 32, generator=gen)
    groups = []
    for i in range(n):
        x = base + 0.05 * torch.randn(side, side, 32, generator=gen)
        x[i % side, (2 * i) % side] += 3 * torch.randn(32, generator=gen)
        groups.append(FrameTokens(i, 0.5 * i, x))
    return groups


# (grid side, capacity, evict slack): eviction every other group; eviction every group.
SHAPES = [(6, 120, 40), (8, 200, 0)]


def test_every_pruner_has_a_sync_budget():
    assert set(SYNCS_PER_GROUP) == set(PRUNERS)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(SYNCS_PER_GROUP))
def test_a_groups_add_reads_back_at_most_its_budget(name, shape):
    side, capacity, slack = shape
    mem = TokenMemory(capacity, get_pruner(name), recent_groups=2, evict_slack=slack)
    groups = stream(30, side)
    counts, late = [], []
    for g in groups:
        with HostSyncs() as syncs:
            mem.add(g)
        counts.append(syncs.total)
        late.append(syncs.late)
    assert mem.tokens_evicted > 0
    assert max(counts[10:]) <= SYNCS_PER_GROUP[name], (counts, dict(syncs.counts))
    assert max(late[10:]) <= 2 * LATE_PER_GROUP.get(name, 0), late  # a copy queued, a read later


def _late_counts(mem: TokenMemory, groups: list[FrameTokens]) -> tuple[list[int], list[int], list[int]]:
    """Per add: read-backs that wait, copies queued for the host, and queued copies read."""
    syncs_, queued, read = [], [], []
    for g in groups:
        with HostSyncs() as syncs:
            mem.add(g)
        syncs_.append(syncs.total)
        queued.append(syncs.counts["late Tensor.to"])
        read.append(syncs.counts["late Tensor.tolist"])
    return syncs_, queued, read


@pytest.mark.parametrize("recent", [2, 0])
def test_dtds_count_is_read_when_its_group_leaves_the_recent_window_queued_an_add_before(recent):
    """With a recent window of 2, group k's count is queued at the end of add k + 1 and read when
    group k + 2 arrives and pushes group k into the store: on a GPU it has long arrived by
    then. Without a recent window it is read back at once."""
    mem = TokenMemory(200, get_pruner("dtd"), recent_groups=recent, evict_slack=0)
    syncs_, queued, read = _late_counts(mem, stream(8))
    if recent:
        assert syncs_ == [0] * 8 and queued == [0] + [1] * 7 and read == [0, 0] + [1] * 6
    else:
        assert syncs_ == [1] * 8 and read == [0] * 8


class _MergeEven(Pruner):
    """Tokens at even positions fold into their position's run from the group before."""

    name = "merge-even"

    def score(self, group: FrameTokens) -> GroupScore:
        n = group.grid[0] * group.grid[1]
        into = torch.where(torch.arange(n) % 2 == 0, group.index - 1, -1) if group.index else torch.full((n,), -1)
        return GroupScore(score=torch.zeros(n), merge_into=into)


@pytest.mark.parametrize("recent", [2, 0])
def test_a_merging_groups_counts_are_read_when_it_leaves_the_recent_window_queued_an_add_before(recent):
    """The runs a group folds into are found, and its counts queued for the host, at the end of
    the add before the one it leaves the recent window in (only a graduation changes the store
    in between): read then, they have long arrived on a GPU. The first graduation (no store
    yet) and a memory without a recent window read them back at once."""
    mem = TokenMemory(200, _MergeEven(), recent_groups=recent, evict_slack=0)
    syncs_, queued, read = _late_counts(mem, stream(8))
    assert mem.snapshot().run.max() > 1  # runs merged
    if recent:
        assert syncs_ == [0, 0, 1, 0, 0, 0, 0, 0] and read == [0, 0, 0, 1, 1, 1, 1, 1]
        assert queued == [0, 0, 2, 1, 1, 1, 1, 1]  # the first graduation's own, then the next one's
    else:
        assert syncs_ == [1] * 8 and read == [0] * 8


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", SYNC_FREE)
def test_sync_free_pruners_run_the_whole_stream_on_the_meta_device(name, shape):
    """Meta tensors have no values: any read-back (item, tolist, a boolean mask, nonzero) and
    any tensor left on the CPU raise, so finishing proves the path is device-only; and no copy
    of host data to the device blocks (which on a GPU waits for its queue like a read-back)."""
    side, capacity, slack = shape
    mem = TokenMemory(capacity, get_pruner(name), recent_groups=2, evict_slack=slack, device="meta")
    with HostSyncs() as syncs:
        for g in stream(30, side):
            mem.add(g)
    assert syncs.total == 0, dict(syncs.counts)
    assert mem.tokens_evicted > 0 and len(mem) <= capacity + 2 * side * side
    snap = mem.snapshot()
    assert snap.tokens.device.type == "meta" and snap.group.device.type == "meta"


def test_layout_is_on_the_host_and_gather_on_the_memorys_device():
    mem = TokenMemory(60, get_pruner("echoprune"), recent_groups=2, evict_slack=6)
    for g in stream(12):
        mem.add(g)
    lay = mem.layout()
    assert all(c.device.type == "cpu" for c in (lay.group, lay.pts, lay.row, lay.col, lay.stamp, lay.run))
    rows = torch.arange(0, len(mem), 3)
    toks, _ = mem.gather(rows, lay.version)
    assert torch.equal(toks, mem.snapshot().tokens[rows])


class _Miscounts(pruning_base.Pruner):
    """Keeps half of each group but says it keeps one token more."""

    name = "miscounts"

    def score(self, group: FrameTokens) -> pruning_base.GroupScore:
        n = group.grid[0] * group.grid[1]
        keep = torch.arange(n) % 2 == 0
        return pruning_base.GroupScore(score=torch.zeros(n), keep=keep, kept=int(keep.sum()) + 1)


def test_a_pruner_that_miscounts_what_it_keeps_fails_loudly():
    mem = TokenMemory(200, _Miscounts(), recent_groups=1)
    with pytest.raises(RuntimeError, match="miscounts"):
        for g in stream(3):
            mem.add(g)
