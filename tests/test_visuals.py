"""The pictures of the memory: kept cells bright, pruned cells dimmed, one tile per held group;
the sink keeps only the thumbnails of groups still held and writes the PNGs when it closes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pruning import FrameTokens, GroupScore, Pruner, TokenMemory, get_pruner
from sinks.visuals import VisualsSink, contact_sheet, dim_pruned, kept_mask, timeline, write_visuals
from stream.events import GroupAdded, SceneChange
from stream.memory_map import memory_map


class _KeepLeftHalf(Pruner):
    """Keeps the left half of every group's grid once it leaves the recent window."""

    name = "left-half"

    def score(self, group):
        h, w = group.grid
        keep = (torch.arange(h * w) % w) < w // 2
        return GroupScore(score=torch.zeros(h * w), keep=keep)


def _thumb(value=200):
    return np.full((20, 40, 3), value, np.uint8)


def _memory():
    mem = TokenMemory(capacity=1000, pruner=_KeepLeftHalf(), recent_groups=1)
    for g in range(3):
        mem.add(FrameTokens(g, g * 0.5, torch.randn(2, 4, 8)))
    return mem


THUMBS = [(g, g * 0.5, _thumb()) for g in range(3)]


def test_memory_map_is_the_layout_as_numpy():
    mem = _memory()
    mm, snap = memory_map(mem), mem.snapshot()
    assert mm.group.dtype == np.int64 and mm.pts.dtype == np.float64
    assert (mm.group == snap.group.numpy()).all() and (mm.col == snap.col.numpy()).all()
    assert mm.grid == (2, 4) and (mm.tokens_seen, mm.groups_seen) == (24, 3)


def test_kept_mask_and_dimming_follow_the_memory():
    mm = memory_map(_memory())
    assert kept_mask(mm, 0).tolist() == [[True, True, False, False]] * 2
    assert kept_mask(mm, 2).all()  # the recent window is dense
    out = dim_pruned(_thumb(), kept_mask(mm, 0))
    assert (out[:, :20] == 200).all() and (out[:, 20:] == 50).all()


def test_sheet_and_timeline_are_drawn(tmp_path):
    mm = memory_map(_memory())
    sheet = np.asarray(contact_sheet(mm, THUMBS, columns=2))
    assert sheet.shape[0] > 2 * 20 and sheet.shape[1] >= 2 * 40
    assert timeline(mm).size == (900, 260)
    paths = write_visuals(mm, THUMBS, tmp_path)
    assert [p.name for p in paths] == ["contact_sheet.png", "timeline.png"] and all(p.stat().st_size for p in paths)


def test_sheet_skips_groups_no_longer_held():
    mm = memory_map(_memory())
    gone = [(-1, 0.0, _thumb(0))]
    assert np.array_equal(np.asarray(contact_sheet(mm, gone + THUMBS)), np.asarray(contact_sheet(mm, THUMBS)))


def test_empty_memory_still_draws():
    mm = memory_map(TokenMemory(capacity=10, pruner=_KeepLeftHalf(), recent_groups=1))
    assert contact_sheet(mm, []).size[0] > 0 and timeline(mm).size[0] > 0


async def _stream(mem, sink, groups, camera="cam"):
    for g in groups:
        mem.add(FrameTokens(g, g * 0.5, torch.randn(2, 4, 8)))
        await sink.handle(GroupAdded(camera, g, g * 0.5, len(mem), _thumb(10 * g)))


async def test_sink_keeps_thumbnails_of_held_groups_and_writes_at_close(tmp_path, caplog):
    mem = TokenMemory(capacity=8, pruner=get_pruner("recent"), recent_groups=1)  # two groups held
    calls = []

    def mapper():
        calls.append(1)
        return memory_map(mem)

    sink = VisualsSink("cam", tmp_path / "cam", mapper, max_thumbnails=100, refresh_every=4)
    await _stream(mem, sink, range(10))
    await _stream(mem, sink, [10], camera="other")
    await sink.handle(SceneChange("cam", 9, 4.5))
    assert len(calls) == 2  # every fourth thumbnail, not every event
    assert [g for g, _, _ in sink.thumbnails()] == [6, 7, 8, 9]  # 0-5 dropped at the refreshes
    caplog.set_level("INFO", logger="sinks.visuals")
    await sink.close()
    await sink.close()
    assert [p.name for p in sink.written] == ["contact_sheet.png", "timeline.png"]
    assert all(str(p) in caplog.text for p in sink.written)
    held = [t for t in sink.thumbnails() if t[0] in (8, 9)]
    expect = np.asarray(contact_sheet(memory_map(mem), held))
    assert np.array_equal(np.asarray(Image.open(sink.written[0])), expect)
    assert np.array_equal(np.asarray(Image.open(sink.written[1])), np.asarray(timeline(memory_map(mem))))


async def test_sink_bounds_its_thumbnails_oldest_first(tmp_path):
    mem = TokenMemory(capacity=1000, pruner=get_pruner("recent"), recent_groups=1)  # everything held
    sink = VisualsSink("cam", tmp_path, lambda: memory_map(mem), max_thumbnails=3, refresh_every=100)
    await _stream(mem, sink, range(5))
    assert [g for g, _, _ in sink.thumbnails()] == [2, 3, 4]


def test_the_sinks_never_import_torch():
    code = "import sys, sinks.visuals; sys.exit(int('torch' in sys.modules or 'pruning' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0
