"""WebcamSource: no /dev/video exists here, so it runs on RTSP URLs and files through the same
PyAV reader a capture device uses; device errors are checked at construction and at open."""
from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest

from rtsp_fixtures import StateLog, write_clip
from stream.sources import Backoff, SourceError, WebcamSource
from stream.sources.webcam import v4l2_options

QUICK = Backoff(initial_s=0.02, max_s=0.05)


def close_to(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() < 8


async def collect(source, limit: int | None = None, timeout: float = 10.0):
    """Frames until `limit`, or until the source ends or fails (then also the error)."""
    frames = []

    async def run():
        async for frame in source:
            frames.append(frame)
            if limit is not None and len(frames) >= limit:
                return

    try:
        await asyncio.wait_for(run(), timeout)
    except SourceError as exc:
        return frames, exc
    return frames, None


@pytest.mark.parametrize("device", [7, "8", "/dev/video9"])
def test_a_missing_device_is_a_clear_error_at_construction(device):
    with pytest.raises(FileNotFoundError, match=r"no camera at this device path.*/dev/video[789]"):
        WebcamSource(device)


def test_other_bad_arguments_fail_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        WebcamSource(str(tmp_path / "missing.mp4"))
    with pytest.raises(IsADirectoryError):
        WebcamSource(str(tmp_path))
    with pytest.raises(TypeError):
        WebcamSource(True)
    with pytest.raises(ValueError, match="device number"):
        WebcamSource(-1)
    with pytest.raises(ValueError, match="width and height"):
        WebcamSource("rtsp://127.0.0.1/live", width=640)
    with pytest.raises(ValueError, match="fps"):
        WebcamSource("rtsp://127.0.0.1/live", fps=0)


def test_capture_mode_maps_to_v4l2_options():
    assert v4l2_options(1280, 720, 30, "mjpeg") == {"video_size": "1280x720", "framerate": "30", "input_format": "mjpeg"}
    assert v4l2_options(None, None, 7.5, None) == {"framerate": "7.5"}
    assert v4l2_options(None, None, None, None) == {}


async def test_a_device_that_is_not_a_camera_fails_at_open_naming_it():
    source = WebcamSource("/dev/null", 640, 480, 30, max_reconnects=0)  # exists, readable, no v4l2
    assert (source.kind, source.format) == ("device", "v4l2")
    assert source.options == {"video_size": "640x480", "framerate": "30"}
    frames, err = await collect(source)
    assert frames == [] and err is not None and "cannot open /dev/null" in str(err)
    assert source.state == "failed"


async def test_webcam_on_an_rtsp_url(rtsp_server):
    log = StateLog()
    source = WebcamSource(rtsp_server.url(), stall_timeout_s=2, on_state=log)
    assert source.kind == "url" and source.options["rtsp_transport"] == "tcp" and source.live
    frames, err = await collect(source, 20)
    await asyncio.sleep(0)
    assert err is None and len(frames) == 20 and all(f.image.shape == (120, 160, 3) for f in frames)
    assert all(b.pts > a.pts for a, b in zip(frames, frames[1:]))
    assert log.changes == [("connecting", "streaming"), ("streaming", "stopped")]


async def test_a_file_stands_in_for_a_camera_paced_and_replayed(tmp_path):
    path = tmp_path / "clip.mp4"
    pictures = write_clip(path, n=15)  # 0.5 s at 30 fps
    log = StateLog()
    source = WebcamSource(str(path), backoff=QUICK, on_state=log)
    assert source.kind == "file" and source.pace
    start = time.monotonic()
    frames, err = await collect(source, 20)
    await asyncio.sleep(0)
    assert err is None
    assert all(close_to(f.image, p) for f, p in zip(frames, pictures + pictures))
    assert frames[14].pts - frames[0].pts == pytest.approx(14 / 30, abs=0.1)  # paced to its clock
    assert time.monotonic() - start >= 14 / 30
    assert source.stats.reconnects == 1 and source.stats.last_error == "the stream ended"
    assert log.changes[:3] == [("connecting", "streaming"), ("streaming", "reconnecting"), ("reconnecting", "streaming")]


async def test_resolution_change_midway_yields_both_sizes(tmp_path):
    first, second, joined = tmp_path / "a.ts", tmp_path / "b.ts", tmp_path / "joined.ts"
    write_clip(first, n=20, size=(160, 120), fps=120)
    later = write_clip(second, n=20, size=(320, 240), fps=120)  # its clock restarts at 0
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    source = WebcamSource(str(joined), max_reconnects=0)
    frames, err = await collect(source)
    shapes = [f.image.shape for f in frames]
    assert isinstance(err, SourceError) and "the stream ended" in str(err)
    assert shapes == [(120, 160, 3)] * 20 + [(240, 320, 3)] * 20
    assert source.stats.size_changes == 1 and source.stats.decode_errors <= 1  # the join breaks TS continuity
    assert close_to(frames[30].image, later[10]) and all(b.pts > a.pts for a, b in zip(frames, frames[1:]))


async def test_corrupt_packets_are_skipped_and_counted(tmp_path):
    path = tmp_path / "clip.ts"
    pictures = write_clip(path, n=60, fps=120)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = random.Random(0).randbytes(2000)
    path.write_bytes(bytes(data))
    source = WebcamSource(str(path), max_reconnects=0)
    frames, err = await collect(source)
    assert isinstance(err, SourceError)
    assert 16 <= len(frames) < 60 and close_to(frames[0].image, pictures[0])
    assert source.stats.decode_errors >= 1 and source.stats.errors > source.stats.decode_errors


async def test_truncated_files_end_or_fail_clearly(tmp_path):
    ts = tmp_path / "clip.ts"
    write_clip(ts, n=60, fps=120)
    ts.write_bytes(ts.read_bytes()[: ts.stat().st_size // 2])
    frames, err = await collect(WebcamSource(str(ts), max_reconnects=0))
    assert 16 <= len(frames) < 60 and "the stream ended" in str(err)

    mp4 = tmp_path / "clip.mp4"  # the index (moov) is at the end: a cut file cannot be opened
    write_clip(mp4, n=60)
    mp4.write_bytes(mp4.read_bytes()[:4000])
    source = WebcamSource(str(mp4), max_reconnects=1, backoff=QUICK)
    frames, err = await collect(source)
    assert frames == [] and source.state == "failed"
    assert "gave up after 2" in str(err) and f"cannot open {mp4}" in str(err)
