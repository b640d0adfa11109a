"""RtspSource against a real GStreamer RTSP server: frames into memory, a crash and restart on the
same port, a frozen server, unreachable and wrong URLs, and two cameras with one failing."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from pruning import TokenMemory, get_pruner
from rtsp_fixtures import CLIP_FRAMES, StateLog, free_port, until
from stream.encoder import RollingEncoder
from stream.events import Question
from stream.query import QueryHandler, QuerySettings
from stream.sampler import Sampler
from stream.sources import Backoff, RtspSource, SourceError
from stream.sources.rtsp import redact_url, rtsp_options

QUICK = Backoff(initial_s=0.1, max_s=0.4)


class Camera:
    """One camera's ingest as the pipeline wires it: source -> latest sampler -> encoder -> memory."""

    def __init__(self, vlm, source, fps: float = 4.0):
        self.source = source
        self.memory = TokenMemory(capacity=300, pruner=get_pruner("dtd"), recent_groups=2)
        self.encoder = RollingEncoder(vlm, self.memory)
        self.sampled: list = []
        self.task = asyncio.create_task(self.encoder.run(self._frames(Sampler(source, fps, "latest"))))

    async def _frames(self, sampler):
        async for frame in sampler:
            self.sampled.append(frame)
            yield frame

    async def stop(self) -> None:
        self.source.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.task), 10)
        finally:
            self.encoder.close()


def close_to(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() < 8


async def test_live_frames_flow_end_to_end_into_memory(rtsp_server, vlm):
    log = StateLog()
    source = RtspSource(rtsp_server.url(), open_timeout_s=2, stall_timeout_s=2, on_state=log)
    assert source.live and source.state == "connecting"
    t0 = time.monotonic()
    cam = Camera(vlm, source)
    await until(lambda: cam.memory.groups_seen >= 3, 30, "three groups in memory")
    elapsed = time.monotonic() - t0
    await cam.stop()
    assert source.state == "stopped" and source.stats.errors == 0
    assert log.changes == [("connecting", "streaming"), ("streaming", "stopped")]
    assert log.threads == {threading.get_ident()}
    assert source.stats.frames >= 20 and source.stats.size == (160, 120)
    pts = [f.pts for f in cam.sampled]
    assert all(f.image.shape == (120, 160, 3) and f.image.dtype == np.uint8 for f in cam.sampled)
    assert all(b > a for a, b in zip(pts, pts[1:]))
    assert (len(pts) - 1) / (pts[-1] - pts[0]) <= 4.5  # sampled at 4 fps of wall clock from 30
    assert 0 <= pts[0] < pts[-1] <= elapsed
    snap = cam.memory.snapshot()
    assert len(snap) > 0 and 0 <= float(snap.pts.min()) <= float(snap.pts.max()) <= elapsed


async def test_a_clip_served_over_rtsp_arrives_intact_then_replays(rtsp_server, rtsp_clip):
    _, pictures = rtsp_clip
    log = StateLog()
    source = RtspSource(rtsp_server.url("clip"), stall_timeout_s=2, backoff=QUICK, on_state=log)
    frames = []

    async def read():
        async for frame in source:
            frames.append((source.stats.reconnects, frame))
            if source.stats.reconnects >= 1 and len(frames) >= CLIP_FRAMES + 5:
                return

    await asyncio.wait_for(read(), 15)
    first = [f for n, f in frames if n == 0]
    second = [f for n, f in frames if n == 1]
    assert len(first) >= CLIP_FRAMES - 2 and len(second) >= 3
    assert sum(close_to(f.image, p) for f, p in zip(first, pictures)) >= len(first) - 2
    assert close_to(second[0].image, pictures[0])
    assert 1.5 <= first[-1].pts - first[0].pts <= 3.0  # 60 frames at 30 fps, paced by the server
    assert log.changes[:3] == [("connecting", "streaming"), ("streaming", "reconnecting"), ("reconnecting", "streaming")]
    assert source.stats.last_error == "the stream ended"


async def test_server_killed_and_restarted_on_the_same_port(rtsp_servers, vlm):
    server = rtsp_servers()
    resets: list[float] = []
    cam: Camera

    def reset_on_resume(old, new, stats):  # the hook the pipeline installs
        if old == "reconnecting" and new == "streaming":
            cam.memory.reset_stream()
            resets.append(stats["stream_start_pts"])

    log = StateLog(then=reset_on_resume)
    source = RtspSource(server.url(), open_timeout_s=2, stall_timeout_s=2, backoff=QUICK, on_state=log)
    cam = Camera(vlm, source)
    try:
        await until(lambda: cam.memory.groups_seen >= 2, 30, "two groups before the crash")
        server.kill()
        killed = time.monotonic()
        await until(lambda: source.state == "reconnecting", 5, "the loss to be noticed")
        last_before = cam.sampled[-1].pts
        settings = QuerySettings(max_new_tokens=4)
        answer = await asyncio.wait_for(QueryHandler(vlm, cam.memory, settings).aask(Question("What happened?")), 60)
        assert source.state == "reconnecting", "the answer must come from memory during the outage"
        assert answer.tokens_used > 0 and answer.t_end <= last_before and isinstance(answer.text, str)
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - killed)))
        server.start()
        restarted = time.monotonic()
        took = await until(lambda: source.state == "streaming", 5, "frames after the restart")
        groups = cam.memory.groups_seen
        frames = source.stats.frames
        await until(lambda: source.stats.frames >= frames + 15, 5, "frames to keep flowing")
        await until(lambda: cam.memory.groups_seen >= groups + 2, 30, "new groups in memory")
    finally:
        await cam.stop()
    assert took < 3.0 and time.monotonic() - restarted < 40
    assert log.changes == [("connecting", "streaming"), ("streaming", "reconnecting"),
                           ("reconnecting", "streaming"), ("streaming", "stopped")]
    assert len(resets) == 1 and resets[0] > last_before
    assert source.stats.reconnects >= 1 and source.stats.errors >= 2  # the end, then refused opens
    assert all(b.pts > a.pts for a, b in zip(cam.sampled, cam.sampled[1:]))


async def _drain(source) -> None:
    async for _ in source:
        pass


async def test_health_is_current_at_every_read_through_an_outage(rtsp_servers):
    server = rtsp_servers()
    log = StateLog()
    source = RtspSource(server.url(), open_timeout_s=1, stall_timeout_s=1,
                        backoff=Backoff(initial_s=0.1, max_s=0.1, jitter=0.0), on_state=log)
    task = asyncio.create_task(_drain(source))
    try:
        await until(lambda: source.stats.frames >= 10, 10, "frames before the outage")
        before = source.health()
        assert before["state"] == "streaming" and before["reconnects"] == 0
        assert before["last_frame_age_s"] < 0.5 and before["position_s"] > 0
        server.kill()
        await until(lambda: source.state == "reconnecting", 5, "the loss to be noticed")
        samples = []
        for _ in range(8):
            await asyncio.sleep(0.15)
            samples.append(source.health())
        server.start()
        await until(lambda: source.state == "streaming", 5, "streaming after the restart")
        frames = source.stats.frames
        await until(lambda: source.stats.frames >= frames + 5, 5, "frames after the restart")
        after = source.health()
    finally:
        source.close()
        await asyncio.wait_for(task, 2)
    ages = [h["last_frame_age_s"] for h in samples]
    reconnects = [h["reconnects"] for h in samples]
    assert all(h["state"] == "reconnecting" for h in samples)
    assert all(b - a >= 0.1 for a, b in zip(ages, ages[1:])), ages  # rising with the wall clock
    assert reconnects == sorted(reconnects) and reconnects[-1] - reconnects[0] >= 4, reconnects
    # an attempt is counted as it starts, its refusal as it happens: errors = the loss + the attempts refused
    assert all(h["errors"] - 1 <= h["reconnects"] <= h["errors"] for h in samples), samples
    assert len({(h["frames"], h["position_s"]) for h in samples}) == 1  # nothing new during the outage
    assert after["state"] == "streaming" and after["last_frame_age_s"] < 0.5
    assert after["reconnects"] > reconnects[-1] and after["position_s"] > samples[-1]["position_s"]
    resumed = [stats for old, new, stats in log.seen if (old, new) == ("reconnecting", "streaming")]
    assert len(resumed) == 1 and resumed[0]["last_frame_age_s"] < 0.5  # the event sees the outage over
    assert resumed[0]["position_s"] == resumed[0]["stream_start_pts"] > samples[-1]["position_s"]


async def test_frozen_server_times_out_and_recovers_after_sigcont(rtsp_servers):
    server = rtsp_servers()
    log = StateLog()
    source = RtspSource(server.url(), open_timeout_s=1, stall_timeout_s=1, backoff=QUICK, on_state=log)
    arrivals: list[float] = []

    async def read():
        async for _ in source:
            arrivals.append(time.monotonic())

    task = asyncio.create_task(read())
    try:
        await until(lambda: len(arrivals) >= 10, 10, "frames before the freeze")
        server.freeze()
        frozen = time.monotonic()
        noticed = await until(lambda: source.state == "reconnecting", 5, "the stall to be noticed")
        assert "timed out" in source.stats.last_error and noticed < 3.0
        errors = source.stats.errors
        await until(lambda: source.stats.errors > errors, 5, "a reopen to time out while frozen")
        server.thaw()
        await until(lambda: source.state == "streaming", 8, "streaming after SIGCONT")
        n = len(arrivals)
        await until(lambda: len(arrivals) >= n + 10, 5, "frames after SIGCONT")
    finally:
        source.close()
        await asyncio.wait_for(task, 1)
    gaps = np.diff([t for t in arrivals if t > frozen])
    assert gaps.max() > 1.0 and source.stats.reconnects >= 2


async def test_close_while_the_server_is_frozen_does_not_hang(rtsp_servers):
    server = rtsp_servers()
    source = RtspSource(server.url(), stall_timeout_s=5)
    count = 0

    async def read():
        nonlocal count
        async for _ in source:
            count += 1

    task = asyncio.create_task(read())
    await until(lambda: count >= 3, 10, "frames")
    server.freeze()
    await asyncio.sleep(0.3)  # the reader is now blocked inside a read
    t0 = time.monotonic()
    source.close()
    await asyncio.wait_for(task, 1)
    assert time.monotonic() - t0 < 0.5 and source.state == "stopped"


async def test_unreachable_url_fails_clearly_after_max_reconnects():
    log = StateLog()
    url = f"rtsp://127.0.0.1:{free_port()}/live"
    source = RtspSource(url, max_reconnects=2, backoff=Backoff(0.02, 0.05), on_state=log)
    with pytest.raises(SourceError, match=r"gave up after 3 .*Connection refused") as err:
        await asyncio.wait_for(anext(aiter(source)), 5)
    assert url in str(err.value)
    await asyncio.sleep(0)
    assert log.changes == [("connecting", "failed")] and source.stats.errors == 3


async def test_wrong_path_is_a_clear_error(rtsp_server):
    source = RtspSource(rtsp_server.url("nope"), max_reconnects=1, backoff=Backoff(0.02, 0.05))
    with pytest.raises(SourceError, match="404 Not Found"):
        await asyncio.wait_for(anext(aiter(source)), 5)
    assert source.state == "failed"


async def test_credentials_never_reach_names_logs_or_errors(rtsp_server, caplog):
    url = rtsp_server.url("nope").replace("rtsp://", "rtsp://admin:hunter2@")
    source = RtspSource(url, max_reconnects=0)
    with pytest.raises(SourceError) as err:
        await asyncio.wait_for(anext(aiter(source)), 5)
    assert "hunter2" not in str(err.value) + source.name + caplog.text + str(source.health())
    assert "***@127.0.0.1" in str(err.value)
    assert redact_url("rtsp://u:p@cam.local:554/a?x=1") == "rtsp://***@cam.local:554/a?x=1"
    assert redact_url("rtsp://cam.local/a") == "rtsp://cam.local/a"
    assert redact_url("rtsp://u:p@[fe80::1]:8554/a") == "rtsp://***@[fe80::1]:8554/a"


def test_bad_settings_fail_at_construction():
    with pytest.raises(ValueError, match="rtsp://"):
        RtspSource("http://127.0.0.1/live")
    with pytest.raises(ValueError, match="transport"):
        RtspSource("rtsp://127.0.0.1/live", transport="carrier-pigeon")
    with pytest.raises(ValueError, match="open_timeout_s"):
        RtspSource("rtsp://127.0.0.1/live", open_timeout_s=0)
    opts = RtspSource("rtsp://127.0.0.1/live", "udp", stall_timeout_s=3, options={"probesize": "5000"}).options
    assert opts == {**rtsp_options("udp", 3), "probesize": "5000"}
    assert opts["timeout"] == "1500000" and opts["analyzeduration"] == "0"


async def test_two_cameras_one_failing_the_other_keeps_streaming(rtsp_server, rtsp_servers, vlm):
    doomed = rtsp_servers()
    good = Camera(vlm, RtspSource(rtsp_server.url(), stall_timeout_s=2, name="good"))
    bad = Camera(vlm, RtspSource(doomed.url(), stall_timeout_s=2, max_reconnects=2,
                                 backoff=Backoff(0.05, 0.1), name="bad"))
    try:
        await until(lambda: good.memory.groups_seen >= 1 and bad.memory.groups_seen >= 1, 30, "both cameras")
        doomed.kill()
        with pytest.raises(SourceError, match="bad: gave up"):
            await asyncio.wait_for(asyncio.shield(bad.task), 10)
        assert bad.source.state == "failed" and good.source.state == "streaming"
        groups, frames = good.memory.groups_seen, good.source.stats.frames
        await until(lambda: good.memory.groups_seen >= groups + 3, 30, "the good camera to keep encoding")
        assert good.source.stats.frames > frames + 20 and good.source.stats.errors == 0
        assert len(bad.memory) > 0  # the failed camera's memory is still there to answer from
    finally:
        await good.stop()
        bad.encoder.close()
