"""FileSource on real H.264 clips encoded here with PyAV: content, pts, looping, pacing, damage."""
from __future__ import annotations

import asyncio
import random
import threading
import time

import numpy as np
import pytest

from clips import picture, write_h264

from stream.sources import FileSource, SourceError

FPS = 10


def encode(path, n=64, w=160, h=120, first=0, fmt=None, options=None) -> list[np.ndarray]:
    """An H.264 clip of pictures first..first+n-1 (pts from 0); returns what was encoded."""
    return write_h264(path, [picture(first + i, w, h) for i in range(n)], FPS, fmt, options)


async def read(source, limit=None):
    frames = []
    async for frame in source:
        frames.append(frame)
        if limit is not None and len(frames) >= limit:
            break
    return frames


def close_to(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() < 8


@pytest.mark.parametrize("suffix", ["mp4", "mkv", "ts"])
async def test_reads_back_what_was_encoded(tmp_path, suffix):
    path = tmp_path / f"clip.{suffix}"
    pictures = encode(path)
    source = FileSource(path)
    frames = await read(source)
    assert len(frames) == 64 == source.stats.frames and source.stats.errors == 0
    assert [f.index for f in frames] == list(range(64))
    assert [f.pts for f in frames] == pytest.approx([i / FPS for i in range(64)])
    assert all(close_to(f.image, p) for f, p in zip(frames, pictures))
    assert not close_to(frames[0].image, pictures[30])
    assert source.file_position_s == pytest.approx(6.3)
    assert source.duration_s == pytest.approx(6.4, abs=0.05)
    assert not source.live and source.closed


async def test_missing_pts_fall_back_to_index_over_fps(tmp_path):
    path = tmp_path / "clip.h264"  # raw Annex B: no timestamps at all
    pictures = encode(path, n=20, fmt="h264")
    frames = await read(FileSource(path))
    assert [f.pts for f in frames] == pytest.approx([i / FPS for i in range(20)])
    assert all(close_to(f.image, p) for f, p in zip(frames, pictures))


async def test_loop_keeps_pts_increasing_and_repeats_content(tmp_path):
    path = tmp_path / "clip.mp4"
    pictures = encode(path, n=32)
    source = FileSource(path, loop=True)
    frames = await read(source, limit=80)
    assert len(frames) == 80 and source.loops == 2
    assert np.diff([f.pts for f in frames]) == pytest.approx(np.full(79, 1 / FPS))
    assert close_to(frames[32].image, pictures[0]) and close_to(frames[70].image, pictures[6])
    assert source.file_position_s == pytest.approx(1.5) and source.health()["position_s"] == frames[-1].pts


async def test_realtime_paces_to_the_wall_clock(tmp_path):
    path = tmp_path / "clip.mp4"
    encode(path, n=20)
    source = FileSource(path, realtime=True, speed=4.0)
    assert source.live
    start = time.monotonic()
    arrivals = [(f.pts, time.monotonic() - start) async for f in source]
    assert 0.45 <= arrivals[-1][1] <= 0.9  # last pts 1.9 s at 4x
    assert all(wall >= pts / 4.0 - 0.02 for pts, wall in arrivals)


async def test_truncated_files_end_cleanly(tmp_path):
    for suffix, options in (("ts", None), ("mp4", {"movflags": "+faststart"})):
        path = tmp_path / f"clip.{suffix}"
        encode(path, options=options)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        source = FileSource(path)
        frames = await read(source)
        assert 16 <= len(frames) < 64, suffix
        assert all(b.pts > a.pts for a, b in zip(frames, frames[1:]))
    assert source.stats.errors >= 1  # the mp4's cut last packet


async def test_truncated_mp4_without_index_is_a_clear_error(tmp_path):
    path = tmp_path / "clip.mp4"  # moov atom at the end: half the file has no index
    encode(path)
    path.write_bytes(path.read_bytes()[:8000])
    with pytest.raises(SourceError, match="clip.mp4"):
        await read(FileSource(path))


@pytest.mark.parametrize(("suffix", "options"), [("mp4", {"movflags": "+faststart"}), ("ts", None)])
async def test_garbage_in_the_middle_is_skipped_and_counted(tmp_path, suffix, options):
    path = tmp_path / f"clip.{suffix}"
    pictures = encode(path, options=options)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = random.Random(0).randbytes(2000)
    path.write_bytes(bytes(data))
    source = FileSource(path)
    frames = await read(source)
    assert 16 <= len(frames) < 64
    assert source.stats.errors >= 1 and source.stats.last_error
    assert all(b.pts > a.pts for a, b in zip(frames, frames[1:]))
    assert close_to(frames[0].image, pictures[0])


async def test_resolution_change_midway(tmp_path):
    first, second = tmp_path / "a.ts", tmp_path / "b.ts"
    encode(first, n=64, w=160, h=120)
    later = encode(second, n=64, w=320, h=240, first=64)  # its clock restarts at 0
    joined = tmp_path / "joined.ts"
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    frames = await read(FileSource(joined))
    shapes = [f.image.shape for f in frames]
    assert len(frames) == 128
    assert shapes == [(120, 160, 3)] * 64 + [(240, 320, 3)] * 64
    assert all(b.pts > a.pts for a, b in zip(frames, frames[1:]))
    assert close_to(frames[100].image, later[36])


def test_missing_path_and_directory_fail_at_once(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        FileSource(tmp_path / "nope.mp4")
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        FileSource(tmp_path)


async def test_not_a_video_fails_at_start_naming_the_path(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("not a video\n" * 50)
    with pytest.raises(SourceError, match="notes.mp4"):
        await read(FileSource(path))


async def test_leaving_early_stops_the_reader_thread(tmp_path):
    path = tmp_path / "clip.mp4"
    encode(path)
    source = FileSource(path, loop=True)
    assert len(await read(source, limit=5)) == 5
    await asyncio.sleep(0.2)
    assert source.closed
    assert not [t for t in threading.enumerate() if t.name == f"source:{source.name}"]
