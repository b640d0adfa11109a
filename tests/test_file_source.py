"""FileSource on real clips encoded here with PyAV: content, pts (also where the decoder hands
frames out of pts order), looping, pacing, damage."""
from __future__ import annotations

import asyncio
import random
import threading
import time

import av
import numpy as np
import pytest

from clips import picture, write_h264, write_mp4_pts_as_dts, write_packed_avi, write_video

from stream.sources import FileSource, SourceError
from stream.sources.file import presentation_times

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


REORDERED = [pytest.param(write_packed_avi, "avi", id="avi-packed-b-frames"),
             pytest.param(write_mp4_pts_as_dts, "mp4", id="mp4-pts-written-as-dts")]


def decoder_pts(path) -> list[int]:
    with av.open(str(path)) as container:
        return [f.pts for f in container.decode(video=0)]


@pytest.mark.parametrize(("write", "suffix"), REORDERED)
async def test_times_follow_presentation_order_when_the_decoder_reorders(tmp_path, write, suffix):
    """These files' frames come out of the decoder labelled with their neighbours' times; when
    each step back pushed a permanent offset, 6.0 s were stamped up to 11.8 s (AVI) and 14.4 s
    (MP4)."""
    path = tmp_path / f"clip.{suffix}"
    pictures = write(path, [picture(i, 160, 120) for i in range(60)], FPS)
    raw = decoder_pts(path)
    assert len(raw) == 60 and any(b < a for a, b in zip(raw, raw[1:]))  # the breakage is there
    source = FileSource(path)
    frames = await read(source)
    pts = [f.pts for f in frames]
    assert len(frames) == 60 and source.stats.errors == 0
    assert np.diff(pts) == pytest.approx(np.full(59, 1 / FPS))
    assert source.duration_s == pytest.approx(6.0) and pts[-1] == pytest.approx(6.0, abs=1 / FPS + 1e-9)
    assert all(close_to(f.image, p) for f, p in zip(frames, pictures))


@pytest.mark.parametrize(("write", "suffix"), REORDERED)
async def test_loop_over_a_reordered_file_continues_each_pass(tmp_path, write, suffix):
    path = tmp_path / f"clip.{suffix}"
    pictures = write(path, [picture(i, 160, 120) for i in range(30)], FPS)
    source = FileSource(path, loop=True)
    frames = await read(source, limit=75)
    assert source.loops == 2
    assert np.diff([f.pts for f in frames]) == pytest.approx(np.full(74, 1 / FPS))
    assert close_to(frames[30].image, pictures[0]) and close_to(frames[74].image, pictures[14])


def test_presentation_times_sort_within_the_window_and_restart_on_a_long_jump_back():
    step = 0.1
    decoded = [0.0, 0.3, 0.1, 0.2, 0.6, 0.4, 0.5, 0.5, None, 0.2, 0.1, 0.3]
    out = list(presentation_times(zip(decoded, range(12)), step, depth=2))
    assert [i for _, i in out] == list(range(12))  # the decoder's order is the display order
    times = [t for t, _ in out]
    assert times[:9] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.5001, 0.6, 0.7])  # None: newest + step
    assert times[9:] == pytest.approx([0.1, 0.2, 0.3])  # back beyond 2 steps: a new clock
    assert list(presentation_times(zip([None] * 3, "abc"), step)) == [(0.0, "a"), (0.1, "b"), (pytest.approx(0.2), "c")]


async def test_frames_the_decoder_flags_corrupt_are_counted_once_each(tmp_path):
    plain, damaged = tmp_path / "plain.avi", tmp_path / "damaged.avi"
    write_video(plain, [picture(i, 160, 120) for i in range(40)], FPS, codec="mpeg4")
    with av.open(str(plain)) as src, av.open(str(damaged), "w") as out:
        stream = out.add_stream_from_template(src.streams.video[0])
        for i, packet in enumerate(p for p in src.demux(video=0) if p.size):
            if i in (10, 25):  # the second half of the picture's data is noise: concealed, flagged
                data = bytearray(bytes(packet))
                data[len(data) // 2 :] = random.Random(i).randbytes(len(data) - len(data) // 2)
                noisy = av.Packet(bytes(data))
                noisy.pts, noisy.dts, noisy.time_base = packet.pts, packet.dts, packet.time_base
                packet = noisy
            packet.stream = stream
            out.mux(packet)
    source = FileSource(damaged)
    frames = await read(source)
    assert len(frames) == 40 and source.stats.decode_errors == 2 == source.stats.errors
    assert "flagged corrupt" in source.stats.last_error


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
