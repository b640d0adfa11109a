"""Source health: states and their events, counters, backoff, and the live reconnect loop driven
by scripted connections (the real RTSP server is in test_rtsp_source.py)."""
from __future__ import annotations

import asyncio
import random
import threading
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtsp_fixtures import StateLog, write_clip
from stream.sources import Backoff, Disconnected, FileSource, LiveSource, SourceError, SyntheticSource
from stream.sources.health import NEXT_STATES, STATES

FAST = Backoff(initial_s=0.01, max_s=0.04)


def img(value: int, w: int = 8, h: int = 6) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


class Scripted(LiveSource):
    """Connection n plays `plan(n)`: an array is a frame, None a packet without a frame, a float
    a pause (s), "refuse" fails the open, "drop" loses the connection; the end of the list ends
    the stream; "hold" streams frames until closed."""

    def __init__(self, plan, **kw):
        super().__init__("scripted", **{"backoff": FAST, **kw})
        self.plan = plan
        self.opened = 0
        self.threads = set()

    def _connect(self):
        steps = self.plan(self.opened)
        self.opened += 1
        self.threads.add(threading.get_ident())
        if steps and isinstance(steps[0], str) and steps[0] == "refuse":
            raise Disconnected("refused")
        yield None
        for step in steps:
            if isinstance(step, str) and step == "drop":
                raise Disconnected("dropped")
            if isinstance(step, str) and step == "hold":
                while True:
                    yield img(200)
            if isinstance(step, float):
                time.sleep(step)
            else:
                yield step


async def take(source, n: int, timeout: float = 5.0):
    frames = []

    async def run():
        async for frame in source:
            frames.append(frame)
            if len(frames) >= n:
                break

    await asyncio.wait_for(run(), timeout)
    return frames


async def settle():
    """Let callbacks scheduled with call_soon_threadsafe run."""
    for _ in range(3):
        await asyncio.sleep(0)


async def test_a_reconnect_moves_through_the_states_with_events_on_the_loop():
    plans = {0: [img(1), img(2), img(3)], 1: ["refuse"], 2: [img(4), "hold"]}
    events = StateLog()
    source = Scripted(lambda n: plans[n], on_state=events)
    assert source.state == "connecting" and source.live
    t0 = time.monotonic()
    frames = await take(source, 6)
    elapsed = time.monotonic() - t0
    await settle()
    assert [int(f.image[0, 0, 0]) for f in frames] == [1, 2, 3, 4, 200, 200]
    assert [f.index for f in frames] == list(range(6))
    pts = [f.pts for f in frames]
    assert all(b > a for a, b in zip(pts, pts[1:])) and 0 <= pts[0] and pts[-1] <= elapsed
    assert events.changes == [("connecting", "streaming"), ("streaming", "reconnecting"),
                              ("reconnecting", "streaming"), ("streaming", "stopped")]
    assert events.threads == {threading.get_ident()}  # the loop's thread, not the reader's
    assert threading.get_ident() not in source.threads
    resumed = events.seen[2][2]
    assert resumed["stream_start_pts"] == pytest.approx(frames[3].pts)
    assert resumed["state"] == "streaming" and resumed["reconnects"] == 2
    s = source.stats
    assert (s.frames, s.reconnects, s.errors, s.decode_errors) == (6, 2, 2, 0)
    assert s.last_error == "refused" and source.state == "stopped" and source.closed
    assert 0 <= s.last_frame_age_s() < 1.0


async def test_gives_up_after_max_reconnects_refused_in_a_row():
    events = StateLog()
    source = Scripted(lambda n: ["refuse"], max_reconnects=2, on_state=events)
    with pytest.raises(SourceError, match=r"gave up after 3 .*max_reconnects=2.*refused"):
        await take(source, 1)
    await settle()
    assert events.changes == [("connecting", "failed")]
    assert source.state == "failed" and "refused" in source.stats.last_error
    assert (source.opened, source.stats.reconnects, source.stats.errors) == (3, 2, 3)


async def test_max_reconnects_zero_makes_the_first_loss_final():
    events = StateLog()
    source = Scripted(lambda n: [img(1), img(2)], max_reconnects=0, on_state=events)
    frames = []
    with pytest.raises(SourceError, match="the stream ended"):
        async for frame in source:
            frames.append(frame)
    await settle()
    assert len(frames) == 2 and source.opened == 1
    assert events.changes == [("connecting", "streaming"), ("streaming", "reconnecting"), ("reconnecting", "failed")]


async def test_a_connection_that_brought_frames_resets_the_count():
    source = Scripted(lambda n: [img(n), "drop"], max_reconnects=1)
    frames = await take(source, 6)
    assert [int(f.image[0, 0, 0]) for f in frames] == list(range(6))
    assert source.stats.errors >= 5  # one per dropped connection, yet it never gave up
    assert source.stats.last_error == "dropped"


async def test_backoff_grows_between_failed_attempts():
    marks = []

    def plan(n):
        marks.append(time.monotonic())
        return ["refuse"] if n < 4 else ["hold"]

    source = Scripted(plan, backoff=Backoff(initial_s=0.05, max_s=0.2, jitter=0.0))
    await take(source, 1)
    gaps = np.diff(marks)
    assert gaps == pytest.approx([0.05, 0.1, 0.2, 0.2], abs=0.04)


async def test_no_frame_for_stall_timeout_is_a_disconnect():
    def plan(n):
        return [img(1)] + [None, 0.02] * 100 if n == 0 else ["hold"]

    events = StateLog()
    source = Scripted(plan, stall_timeout_s=0.2, on_state=events)
    t0 = time.monotonic()
    frames = await take(source, 3)
    await settle()
    assert 0.2 <= time.monotonic() - t0 < 1.5
    assert source.stats.errors == 1 and source.stats.last_error.startswith("stalled: no frame for 0.2")
    assert ("streaming", "reconnecting") in events.changes and int(frames[1].image[0, 0, 0]) == 200


async def test_waiting_for_a_slow_consumer_is_not_a_stall():
    def plan(n):
        return [item for i in range(40) for item in (None, img(i))]

    source = Scripted(plan, stall_timeout_s=0.1)
    got = 0
    async for _ in source:
        await asyncio.sleep(0.15)  # the reader thread waits on its read-ahead slots meanwhile
        got += 1
        if got == 5:
            break
    assert source.stats.errors == 0 and source.opened == 1


async def test_a_bug_in_our_code_is_raised_not_retried():
    def plan(n):
        raise ValueError("bug")

    events = StateLog()
    source = Scripted(plan, on_state=events)
    with pytest.raises(ValueError, match="bug"):
        await take(source, 1)
    await settle()
    assert source.opened == 0 and source.state == "failed" and events.changes == [("connecting", "failed")]


async def test_close_during_a_long_backoff_ends_at_once():
    source = Scripted(lambda n: ["refuse"], backoff=Backoff(initial_s=30.0, max_s=30.0))
    task = asyncio.create_task(take(source, 1, timeout=60))
    while source.stats.errors == 0:
        await asyncio.sleep(0.01)
    t0 = time.monotonic()
    source.close()
    await asyncio.wait_for(task, 2.0)
    assert time.monotonic() - t0 < 0.5 and source.state == "stopped"
    for _ in range(50):
        if not [t for t in threading.enumerate() if t.name == "source:scripted"]:
            break
        await asyncio.sleep(0.01)
    assert not [t for t in threading.enumerate() if t.name == "source:scripted"]


async def test_async_callbacks_run_as_tasks_in_order():
    seen = []

    async def on_state(name, old, new, stats):
        await asyncio.sleep(0)
        seen.append(new)

    source = Scripted(lambda n: [img(1), "drop"] if n == 0 else ["hold"], on_state=on_state)
    await take(source, 3)
    for _ in range(10):
        await asyncio.sleep(0)
    assert seen == ["streaming", "reconnecting", "streaming", "stopped"]


async def test_size_changes_are_counted_and_frames_pass_unchanged():
    source = Scripted(lambda n: [img(1, 8, 6), img(2, 8, 6), img(3, 16, 12), img(4, 16, 12), "hold"])
    frames = await take(source, 4)
    assert [f.image.shape for f in frames] == [(6, 8, 3)] * 2 + [(12, 16, 3)] * 2
    assert source.stats.size_changes == 1 and source.stats.size == (16, 12)
    assert source.health()["size"] == [16, 12]


def test_transitions_follow_the_table_and_final_states_absorb():
    source = Scripted(lambda n: [])
    with pytest.raises(RuntimeError, match="no transition from connecting to reconnecting"):
        source._set_state("reconnecting")
    source._set_state("streaming")
    with pytest.raises(RuntimeError, match="no transition from streaming to connecting"):
        source._set_state("connecting")
    source._set_state("failed")
    source._set_state("streaming")
    source.close()
    assert source.state == "failed"
    assert set(NEXT_STATES) == set(STATES)


def test_events_without_a_loop_are_called_directly():
    events = StateLog()
    source = Scripted(lambda n: [])
    source.on_state = events  # the pipeline may attach its hook after construction
    source.close()
    assert events.changes == [("connecting", "stopped")] and events.seen[0][2]["state"] == "stopped"


def test_live_source_rejects_bad_settings():
    with pytest.raises(ValueError, match="stall_timeout_s"):
        Scripted(lambda n: [], stall_timeout_s=0)
    with pytest.raises(ValueError, match="max_reconnects"):
        Scripted(lambda n: [], max_reconnects=-1)


async def test_file_source_reports_states_and_progress(tmp_path):
    path = tmp_path / "clip.mp4"
    write_clip(path, n=12)
    events = StateLog()
    source = FileSource(path, on_state=events)
    frames = await take(source, 100)
    await settle()
    assert len(frames) == 12
    assert events.changes == [("connecting", "streaming"), ("streaming", "stopped")]
    health = source.health()
    assert health["frames"] == 12 and health["position_s"] == pytest.approx(11 / 30)
    assert health["duration_s"] == pytest.approx(0.4, abs=0.05) and health["loops"] == 0


async def test_a_file_that_cannot_be_read_fails_with_an_event(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("not a video\n" * 50)
    events = StateLog()
    source = FileSource(path)
    source.on_state = events
    with pytest.raises(SourceError, match="notes.mp4"):
        await take(source, 1)
    await settle()
    assert events.changes == [("connecting", "failed")] and "notes.mp4" in source.stats.last_error


async def test_synthetic_source_streams_then_stops():
    events = StateLog()
    source = SyntheticSource(duration_s=1.0, fps=4, width=32, height=32)
    source.on_state = events
    assert len(await take(source, 100)) == 4
    await settle()
    assert events.changes == [("connecting", "streaming"), ("streaming", "stopped")]


def test_backoff_ceiling_doubles_up_to_the_cap():
    b = Backoff(initial_s=0.5, max_s=4.0, factor=2.0, jitter=0.0)
    assert [b.ceiling(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert b.delay(3) == 2.0 and b.ceiling(10**9) == 4.0
    with pytest.raises(ValueError):
        b.ceiling(0)


@pytest.mark.parametrize("kw", [{"initial_s": 0}, {"initial_s": 2, "max_s": 1}, {"factor": 0.5},
                                {"jitter": 1.0}, {"jitter": -0.1}])
def test_backoff_rejects_bad_settings(kw):
    with pytest.raises(ValueError):
        Backoff(**kw)


@given(
    initial=st.floats(0.01, 5), cap=st.floats(0.01, 60), factor=st.floats(1, 4),
    jitter=st.floats(0, 0.99), attempt=st.integers(1, 200), seed=st.integers(0, 2**32),
)
def test_backoff_delay_is_jittered_below_a_capped_exponential(initial, cap, factor, jitter, attempt, seed):
    b = Backoff(initial_s=initial, max_s=max(initial, cap), factor=factor, jitter=jitter)
    expected = min(b.max_s, initial * factor ** (attempt - 1))
    ceiling = b.ceiling(attempt)
    assert ceiling == pytest.approx(expected, rel=1e-9)
    assert ceiling <= b.max_s and (attempt == 1 or ceiling >= b.ceiling(attempt - 1))
    delay = b.delay(attempt, random.Random(seed))
    assert (1 - jitter) * ceiling - 1e-12 <= delay <= ceiling


async def test_close_while_the_reader_is_blocked_releases_the_consumer_at_once():
    source = Scripted(lambda n: [img(1), 1.0, img(2), "hold"])
    task = asyncio.create_task(take(source, 2, timeout=10))
    while source.stats.frames == 0:
        await asyncio.sleep(0.01)
    t0 = time.monotonic()
    source.close()  # the reader is inside a 1 s blocking step, like a read from a frozen camera
    await asyncio.wait_for(task, 0.5)
    assert time.monotonic() - t0 < 0.2 and source.stats.frames == 1 and source.state == "stopped"
