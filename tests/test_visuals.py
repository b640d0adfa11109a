"""The pictures of the memory: kept cells bright, pruned cells dimmed, one tile per held group."""
from __future__ import annotations

import numpy as np
import torch

from pruning import FrameTokens, GroupScore, Pruner, TokenMemory
from stream.visuals import contact_sheet, dim_pruned, kept_mask, timeline, write_visuals


class _KeepLeftHalf(Pruner):
    """Keeps the left half of every group's grid once it leaves the recent window."""

    name = "left-half"

    def score(self, group):
        h, w = group.grid
        keep = (torch.arange(h * w) % w) < w // 2
        return GroupScore(score=torch.zeros(h * w), keep=keep)


def _memory():
    mem = TokenMemory(capacity=1000, pruner=_KeepLeftHalf(), recent_groups=1)
    for g in range(3):
        mem.add(FrameTokens(g, g * 0.5, torch.randn(2, 4, 8)), thumbnail=np.full((20, 40, 3), 200, np.uint8))
    return mem


def test_kept_mask_and_dimming_follow_the_memory():
    mem = _memory()
    snap = mem.snapshot()
    assert kept_mask(snap, 0).tolist() == [[True, True, False, False]] * 2
    assert kept_mask(snap, 2).all()  # the recent window is dense
    out = dim_pruned(np.full((20, 40, 3), 200, np.uint8), kept_mask(snap, 0))
    assert (out[:, :20] == 200).all() and (out[:, 20:] == 50).all()


def test_sheet_and_timeline_are_drawn(tmp_path):
    mem = _memory()
    sheet = np.asarray(contact_sheet(mem, columns=2))
    assert sheet.shape[0] > 2 * 20 and sheet.shape[1] >= 2 * 40
    assert timeline(mem).size == (900, 260)
    paths = write_visuals(mem, tmp_path)
    assert [p.name for p in paths] == ["contact_sheet.png", "timeline.png"] and all(p.stat().st_size for p in paths)


def test_empty_memory_still_draws():
    mem = TokenMemory(capacity=10, pruner=_KeepLeftHalf(), recent_groups=1)
    assert contact_sheet(mem).size[0] > 0 and timeline(mem).size[0] > 0
