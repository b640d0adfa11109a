"""Supervision: no task dies silently. The supervisor alone (restart with doubling backoff, give
up after too many failures in the window, a stop is no failure), then a real camera whose ingest
breaks once (an `on_group` callback, a source) or for good (a pruner), with the tiny model."""
from __future__ import annotations

import asyncio
import logging
import time

import pytest

from stream.camera import Camera
from stream.cli import run_pipeline
from stream.config import from_dict, load_config
from stream.errors import SourceError
from stream.events import GroupAdded, SourceState, Status
from stream.sources.synthetic import SyntheticSource
from stream.supervisor import RestartPolicy, Resumable, Supervisor, TaskState
from test_camera import Recorder

FAST = RestartPolicy(initial_s=0.02, max_s=0.08, max_failures=4, window_s=60.0)


class Changes:
    """Every state the supervisor reported, as (name, state, restarts, failures)."""

    def __init__(self):
        self.seen: list[tuple[str, str, int, int]] = []

    def __call__(self, s: TaskState) -> None:
        self.seen.append((s.name, s.state, s.restarts, s.failures))


# -- the supervisor alone --

async def test_a_crashing_task_restarts_with_doubling_capped_backoff_then_fails_for_good(caplog):
    starts: list[float] = []

    async def crash():
        starts.append(time.monotonic())
        raise ValueError(f"boom {len(starts)}")

    changes = Changes()
    sup = Supervisor("cam", changes, FAST)
    with caplog.at_level(logging.INFO, "stream.supervisor"):
        sup.start("ingest", crash)
        final = await asyncio.wait_for(sup.wait("ingest"), 10)
    assert (final.state, final.restarts, final.failures) == ("failed", 4, 5)
    assert final.last_error == "ValueError: boom 5" and isinstance(final.error, ValueError)
    assert sup.states() == {"ingest": {"state": "failed", "restarts": 4, "failures": 5, "last_error": "ValueError: boom 5"}}
    assert sup.failed == ["ingest"]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    for gap, delay in zip(gaps, [0.02, 0.04, 0.08, 0.08]):  # doubling, capped at max_s
        assert gap >= delay * 0.9, (gaps, delay)
    assert changes.seen == [("ingest", "restarting", 0, 1), ("ingest", "running", 1, 1),
                            ("ingest", "restarting", 1, 2), ("ingest", "running", 2, 2),
                            ("ingest", "restarting", 2, 3), ("ingest", "running", 3, 3),
                            ("ingest", "restarting", 3, 4), ("ingest", "running", 4, 4),
                            ("ingest", "failed", 4, 5)]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 5 and all(r.exc_info and r.exc_info[0] is ValueError for r in errors)  # with traceback
    assert "failed for good" in errors[-1].getMessage()


async def test_a_task_that_fails_once_runs_on_and_ends_done():
    runs = []

    async def once():
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("first run breaks")

    sup = Supervisor("svc", policy=FAST)
    sup.start("loop", once)
    final = await asyncio.wait_for(sup.wait("loop"), 5)
    assert final.as_dict() == {"state": "done", "restarts": 1, "failures": 1, "last_error": "RuntimeError: first run breaks"}
    assert final.error is None and len(runs) == 2


async def test_failures_older_than_the_window_neither_add_up_nor_lengthen_the_backoff():
    now = [0.0]

    def clock():  # every failure comes a window after the one before
        now[0] += 100.0
        return now[0]

    runs = []

    async def flaky():
        runs.append(time.monotonic())
        if len(runs) <= 6:
            raise RuntimeError("again")

    sup = Supervisor("svc", policy=RestartPolicy(initial_s=0.01, max_s=10.0, max_failures=1, window_s=50.0), clock=clock)
    sup.start("loop", flaky)
    final = await asyncio.wait_for(sup.wait("loop"), 5)
    assert (final.state, final.failures, final.restarts) == ("done", 6, 6)
    assert runs[-1] - runs[0] < 2.0  # each delay stayed at initial_s instead of doubling to seconds


async def test_a_fatal_error_fails_at_once_without_a_traceback(caplog):
    async def gives_up():
        raise SourceError("cam: gave up after 3 connection attempt(s)")

    changes = Changes()
    sup = Supervisor("cam", changes, FAST)
    with caplog.at_level(logging.INFO, "stream.supervisor"):
        sup.start("ingest", gives_up, fatal=(SourceError,))
        final = await asyncio.wait_for(sup.wait("ingest"), 5)
    assert (final.state, final.restarts, final.failures) == ("failed", 0, 1)
    assert final.last_error == "SourceError: cam: gave up after 3 connection attempt(s)"
    assert changes.seen == [("ingest", "failed", 0, 1)]
    (record,) = caplog.records
    assert record.exc_info is None  # a world error phrased for people, not a bug
    assert record.levelno == logging.INFO  # its owner's status and the end of the run say it


async def test_cancellation_is_not_a_failure_even_during_the_backoff():
    async def forever():
        await asyncio.Event().wait()

    async def crash():
        raise RuntimeError("x")

    changes = Changes()
    sup = Supervisor("svc", changes, RestartPolicy(initial_s=30.0, max_s=30.0))
    sup.start("serve", forever)
    sup.start("flaky", crash)
    while sup.state("flaky").state != "restarting":
        await asyncio.sleep(0.01)
    assert sup.state("serve").state == "running"
    t0 = time.monotonic()
    await sup.stop()
    assert time.monotonic() - t0 < 5  # the 30 s backoff was cut short
    assert sup.states()["serve"] == {"state": "stopped", "restarts": 0, "failures": 0, "last_error": None}
    assert sup.states()["flaky"]["state"] == "stopped" and sup.states()["flaky"]["failures"] == 1
    assert ("serve", "stopped", 0, 0) not in changes.seen and sup.failed == []


async def test_a_reporter_that_raises_does_not_stop_the_restarts():
    runs = []

    async def once():
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("x")

    def broken_reporter(_state):
        raise KeyError("reporter bug")

    sup = Supervisor("svc", broken_reporter, FAST)
    sup.start("loop", once)
    assert (await asyncio.wait_for(sup.wait("loop"), 5)).state == "done"


async def test_a_task_name_runs_once_at_a_time():
    async with Supervisor("svc") as sup:
        sup.start("a", asyncio.Event().wait)
        with pytest.raises(RuntimeError, match="already running"):
            sup.start("a", asyncio.Event().wait)
    assert sup.state("a").state == "stopped"


async def test_resumable_keeps_its_place_when_the_consumer_is_cancelled():
    gate = asyncio.Event()

    async def numbers():
        for i in range(5):
            if i == 2:
                await gate.wait()
            yield i

    it = Resumable(numbers())
    got = []

    async def consume():
        async for n in it:
            got.append(n)

    first = asyncio.create_task(consume())
    while len(got) < 2:
        await asyncio.sleep(0.01)
    first.cancel()  # cancelled while the step that yields 2 waits
    await asyncio.gather(first, return_exceptions=True)
    assert not it.ended
    gate.set()
    await consume()
    assert got == [0, 1, 2, 3, 4] and it.ended


async def test_resumable_ends_when_its_stream_raises():
    async def broken():
        yield 1
        raise OSError("gone")

    it = Resumable(broken())
    assert await it.__anext__() == 1
    with pytest.raises(OSError):
        await it.__anext__()
    assert it.ended
    with pytest.raises(StopAsyncIteration):
        await it.__anext__()


# -- a real camera --

class FastCamera(Camera):
    """Restarts within a test's patience."""

    restart_policy = RestartPolicy(initial_s=0.05, max_s=0.1, max_failures=2, window_s=60.0)


def _config(**over):
    base = {
        "name": "cam",
        "source": {"kind": "synthetic", "fps": 4.0, "duration_s": 16.0, "seed": 1},
        "sampler": {"fps": 2.0},
        "memory": {"pruner": "recent", "capacity": 300, "recent_groups": 1},
        "output": {"status_interval_s": 0.0},
    }
    base.update(over)
    return from_dict(base)


def _camera(cls, cfg, vlm):
    cam = cls(cfg, vlm)
    rec = Recorder()
    cam.bus.subscribe(rec)
    return cam, rec


@pytest.mark.parametrize("realtime", [True, False])  # False: the clip is read to its end before the failure
async def test_an_on_group_callback_that_raises_once_restarts_ingest_on_the_same_stream(vlm, caplog, realtime):
    cfg = _config(source={"kind": "synthetic", "fps": 4.0, "duration_s": 16.0, "seed": 1, "realtime": realtime, "speed": 8.0})
    cam, rec = _camera(FastCamera, cfg, vlm)
    report = cam.encoder.on_group

    def breaks_at_group_3(group, frames):
        report(group, frames)
        if group.index == 3 and cam.supervisor.state("ingest").failures == 0:
            raise RuntimeError("on_group broke")

    cam.encoder.on_group = breaks_at_group_3
    with caplog.at_level(logging.ERROR, "stream.supervisor"):
        async with cam:
            await asyncio.wait_for(cam.done(), 60)
    status = cam.status()
    assert status.tasks["ingest"] == {"state": "done", "restarts": 1, "failures": 1, "last_error": "RuntimeError: on_group broke"}
    assert status.tasks["status"]["failures"] == 0 and status.tasks["watches"]["failures"] == 0
    assert cam.error is None
    # the same source iterator went on: read once, to its end, and groups kept coming after the failure
    assert status.frames_in == 64 and status.source["frames"] == 64
    assert [(e.old, e.new) for e in rec.of(SourceState)] == [("connecting", "streaming"), ("streaming", "stopped")]
    groups = [e.group for e in rec.of(GroupAdded)]
    assert len([g for g in groups if g > 3]) >= 5 and groups == sorted(groups) and cam.stream_s >= 14.0
    e = cam.encoder.stats
    assert e.groups_encoded == cam.memory.groups_seen == len(groups)
    assert e.groups_encoded + e.groups_failed + e.groups_dropped <= 16
    restarting = [s for s in rec.of(Status) if s.tasks["ingest"]["state"] == "restarting"]
    assert restarting and restarting[0].to_dict()["tasks"]["ingest"]["last_error"] == "RuntimeError: on_group broke"
    assert any(r.exc_info and "on_group broke" in str(r.exc_info[1]) for r in caplog.records)


class BreaksAfter20Frames(SyntheticSource):
    """A synthetic clip whose producer hits a bug at its 21st frame."""

    async def _produce(self):
        n = 0
        async for item in super()._produce():
            if n == 20:
                raise RuntimeError("decoder bug")
            n += 1
            yield item


class CameraWithABrokenSource(FastCamera):
    opened = 0

    def open_source(self):
        type(self).opened += 1
        if type(self).opened > 1:
            return super().open_source()
        source = BreaksAfter20Frames.from_config(self.cfg.source, self.name)
        source.on_state = self._on_source_state
        return source


async def test_a_source_that_raises_is_reopened_and_ingest_continues_after_its_last_frame(vlm):
    CameraWithABrokenSource.opened = 0
    cam, rec = _camera(CameraWithABrokenSource, _config(), vlm)
    async with cam:
        await asyncio.wait_for(cam.done(), 60)
    status = cam.status()
    assert CameraWithABrokenSource.opened == 2
    assert status.tasks["ingest"] == {"state": "done", "restarts": 1, "failures": 1, "last_error": "RuntimeError: decoder bug"}
    assert cam.error is None
    # 20 frames from the first source, the other 44 from the reopened one: none twice, none lost
    assert status.frames_in == 64 and status.frames_out == 32
    assert [e.pts for e in rec.of(GroupAdded)] == [float(i) for i in range(16)]
    assert cam.memory.groups_seen == 16
    states = [(e.old, e.new) for e in rec.of(SourceState)]
    assert ("streaming", "failed") in states and states[-1] == ("streaming", "stopped")


async def test_a_reopened_live_source_continues_after_the_last_pts_with_a_fresh_pruner_state(vlm):
    CameraWithABrokenSource.opened = 0
    cfg = _config(source={"kind": "synthetic", "fps": 4.0, "duration_s": 16.0, "seed": 1, "realtime": True, "speed": 8.0})
    cam, rec = _camera(CameraWithABrokenSource, cfg, vlm)
    resets = []
    reset_stream = cam.memory.reset_stream
    cam.memory.reset_stream = lambda: (resets.append(cam.memory.groups_seen), reset_stream())
    async with cam:
        await asyncio.wait_for(cam.done(), 60)
    status = cam.status()
    assert status.tasks["ingest"]["state"] == "done" and status.tasks["ingest"]["restarts"] == 1
    assert status.frames_in == 20 + 64  # a live source is not rewound: the new one streams from its start
    pts = [e.pts for e in rec.of(GroupAdded)]
    assert pts == sorted(set(pts)) and pts[-1] > 4.75 + 14.0  # after the old stream's last frame (4.75 s)
    assert len(resets) == 1 and pts[resets[0]] > 4.75  # the first group of the new stream has no predecessor


async def test_ingest_that_keeps_failing_is_failed_for_good_and_the_camera_says_so(vlm):
    cam, rec = _camera(FastCamera, _config(source={"kind": "synthetic", "fps": 4.0, "duration_s": 60.0,
                                                   "realtime": True, "speed": 4.0}), vlm)

    def score(_group):
        raise ValueError("pruner bug")

    cam.memory.pruner.score = score
    async with cam:
        await asyncio.wait_for(cam.done(), 30)
        status = cam.status()
        assert status.tasks["ingest"] == {"state": "failed", "restarts": 2, "failures": 3, "last_error": "ValueError: pruner bug"}
        assert isinstance(cam.error, ValueError)
        assert status.source["state"] == "stopped"  # the camera let go of its source
        assert status.tasks["watches"]["state"] == "running"  # the memory still answers; the rest runs on
    assert rec.of(Status)[-1].tasks["ingest"]["state"] == "failed"
    assert cam.memory.groups_seen == 0


async def test_run_pipeline_exits_non_zero_only_when_every_camera_failed(tmp_path, model_cache, capsys):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    broken = f'[[cameras]]\nname = "broken"\n[cameras.source]\nkind = "file"\npath = "{junk}"\n'
    yard = '[[cameras]]\nname = "yard"\n[cameras.source]\nkind = "synthetic"\nduration_s = 2.0\nfps = 4.0\n'
    cfg = tmp_path / "run.toml"
    cfg.write_text('[output]\nstatus_interval_s = 0.0\n' + broken)
    assert await run_pipeline(load_config(cfg), interactive=False) == 1
    assert "camera broken stopped: cannot open video file" in capsys.readouterr().err
    cfg.write_text('[output]\nstatus_interval_s = 0.0\n' + broken + yard)
    assert await run_pipeline(load_config(cfg), interactive=False) == 0  # a finished file is no failure
    out = capsys.readouterr()
    assert "camera broken stopped" in out.err and "[yard] summary: frames in 8" in out.out
