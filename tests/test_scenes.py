"""The camera's scene detector: a cut is reported at the group it happens in, once, in order,
and its verdict is read through a `HostCopy`, so on a GPU the camera's thread never waits for it."""
from __future__ import annotations

import torch

from pruning.host_sync import HostCopy, HostSyncs
from pruning.types import FrameTokens
from stream.scenes import SceneDetector


def groups(n: int, cut_at: int, d: int = 16) -> list[FrameTokens]:
    """A scene with a little noise per group, and another scene from `cut_at` on."""
    gen = torch.Generator().manual_seed(0)
    scenes = torch.randn(2, 4, 5, d, generator=gen)
    return [FrameTokens(i, 0.5 * i, scenes[int(i >= cut_at)] + 0.05 * torch.randn(4, 5, d, generator=gen))
            for i in range(n)]


def test_a_cut_is_reported_at_its_group_and_nowhere_else():
    det = SceneDetector()
    reported = [det.update(g) for g in groups(8, cut_at=5)]
    assert reported == [[], [], [], [], [], [(5, 2.5)], [], []]


def test_the_first_group_starts_no_scene():
    det = SceneDetector()
    assert det.update(groups(1, cut_at=0)[0]) == []


def test_a_verdict_is_read_only_through_a_host_copy():
    """On the CPU a plain copy; on a GPU the same read is a pinned copy queued behind the
    device's work and an event (`pruning.host_sync.HostCopy`)."""
    det = SceneDetector()
    stream = groups(4, cut_at=2)
    det.update(stream[0])
    for g in stream[1:]:
        with HostSyncs() as syncs:
            det.update(g)
        assert syncs.total == 0 and dict(syncs.counts) == {"late Tensor.to": 1, "late Tensor.tolist": 1}


def test_a_host_copy_on_the_cpu_is_a_copy_and_ready_at_once():
    x = torch.arange(3)
    copy = HostCopy(x)
    x += 1
    assert copy.ready() and copy.get().tolist() == [0, 1, 2]
