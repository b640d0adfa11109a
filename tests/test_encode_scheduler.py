"""Several cameras on one model share its vision tower (stream/encode_scheduler.py): their groups
are batched into one tower call, yet each memory receives exactly its own groups, in order, equal
to encoding each camera alone; a stalled or failing camera does not hold the others up, and a
live camera's groups that wait past its latency bound are dropped and counted for that camera."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from pruning import TokenMemory, get_pruner
from stream.encode_scheduler import DROPPED, EncodeScheduler
from stream.encoder import RollingEncoder
from stream.types import Frame

FRAMES = 8  # per camera: 4 groups of 2


def camera_frames(seed: int, n: int = FRAMES, size=(120, 160)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


async def feed(images: list[np.ndarray], stall: asyncio.Event | None = None, stall_after: int = 0):
    for i, image in enumerate(images):
        if stall is not None and i == stall_after:
            await stall.wait()  # the camera stops delivering (a frozen source)
        yield Frame(i, i * 0.5, image)
        await asyncio.sleep(0)


def keep_all() -> TokenMemory:
    return TokenMemory(100_000, get_pruner("recent"), recent_groups=0)


def held(memory: TokenMemory) -> tuple[list[int], list[float], torch.Tensor]:
    snap = memory.snapshot()
    groups = torch.unique_consecutive(snap.group).tolist()
    pts = [float(snap.pts[snap.group == g][0]) for g in groups]
    return groups, pts, snap.tokens


def alone(vlm, images: list[np.ndarray]) -> torch.Tensor:
    """What one camera's memory holds when it encodes its groups by itself, one at a time."""
    s = vlm.group_size
    return torch.cat([vlm.encode([images[i:i + s]])[0].reshape(-1, vlm.hidden_size) for i in range(0, len(images), s)])


async def test_cameras_batched_together_each_get_their_own_groups_in_order_equal_to_alone(vlm):
    tower = EncodeScheduler(vlm, max_batch=16)
    frames = {f"cam{k}": camera_frames(k) for k in range(4)}
    memories = {name: keep_all() for name in frames}
    encoders = {name: RollingEncoder(vlm, memories[name], scheduler=tower, drop_when_behind=False, name=name)
                for name in frames}
    try:
        await asyncio.gather(*(encoders[name].run(feed(images)) for name, images in frames.items()))
    finally:
        for enc in encoders.values():
            enc.close()
        tower.close()
    assert tower.stats.shared_batches >= 1  # some tower call carried more than one camera's groups
    assert tower.stats.batches < tower.stats.groups
    for name, images in frames.items():
        groups, pts, tokens = held(memories[name])
        assert groups == [0, 1, 2, 3] and pts == [0.0, 1.0, 2.0, 3.0]
        torch.testing.assert_close(tokens, alone(vlm, images), atol=1e-5, rtol=0)
        assert encoders[name].client.stats.groups_encoded == 4


async def test_a_stalled_camera_does_not_delay_the_others(vlm):
    tower = EncodeScheduler(vlm, max_batch=4)
    stall = asyncio.Event()
    frozen_mem, live_mem = keep_all(), keep_all()
    frozen = RollingEncoder(vlm, frozen_mem, scheduler=tower, drop_when_behind=False, name="frozen")
    live = RollingEncoder(vlm, live_mem, scheduler=tower, drop_when_behind=False, name="live")
    frozen_run = asyncio.create_task(frozen.run(feed(camera_frames(1), stall, stall_after=2)))
    try:
        await asyncio.wait_for(live.run(feed(camera_frames(2, n=16))), 30)
        assert live_mem.groups_seen == 8  # all of them, while the other camera delivers nothing
        assert frozen_mem.groups_seen == 1
    finally:
        stall.set()
        await frozen_run
        frozen.close()
        live.close()
        tower.close()
    assert frozen_mem.groups_seen == 4


class PoisonedTower:
    """The tiny model, whose tower raises on any batch holding a group prepared from an all-black
    frame: a stand-in for an input the tower cannot take."""

    def __init__(self, vlm):
        self.vlm = vlm
        self.name = vlm.name
        self.calls: list[int] = []

    def prepare(self, group):
        return (self.vlm.prepare(group), all(not f.any() for f in group))

    def encode_prepared(self, prepared):
        self.calls.append(len(prepared))
        if any(bad for _, bad in prepared):
            raise ValueError("the tower cannot take this group")
        return self.vlm.encode_prepared([p for p, _ in prepared])


def test_a_failing_cameras_group_fails_only_that_camera(vlm):
    tower = EncodeScheduler(PoisonedTower(vlm), max_batch=16)
    good, bad = tower.client("good"), tower.client("bad")
    images = camera_frames(3, n=2)
    black = [np.zeros_like(images[0])] * 2
    now = time.monotonic()
    prep = tower.vlm.prepare
    tower._cond.acquire()  # hold the worker so that both jobs wait and go out as one batch
    try:
        bad_job = tower.submit(bad, [prep(black)], [now])
        good_job = tower.submit(good, [prep(images)], [now])
    finally:
        tower._cond.release()
    try:
        [grid] = good_job.result(timeout=30)
        with pytest.raises(ValueError, match="cannot take"):
            bad_job.result(timeout=30)
    finally:
        tower.close()
    torch.testing.assert_close(grid, vlm.encode([images])[0], atol=1e-5, rtol=0)
    assert good.stats.groups_encoded == 1 and bad.stats.groups_encoded == 0


def test_groups_past_a_live_cameras_latency_bound_are_dropped_and_counted_for_it(vlm):
    tower = EncodeScheduler(vlm)
    live, recorded = tower.client("live", max_latency_s=0.5), tower.client("file")  # a file never drops
    images = camera_frames(4, n=4)
    stale = time.monotonic() - 2.0  # complete two seconds ago: the tower is that far behind
    try:
        late = tower.encode(live, [images[:2], images[2:]], [stale, time.monotonic()])
        kept = tower.encode(recorded, [images[:2]], [stale])
    finally:
        tower.close()
    assert late[0] is DROPPED and late[1] is not DROPPED
    assert kept[0] is not DROPPED
    assert (live.stats.groups_dropped, live.stats.groups_encoded) == (1, 1)
    assert (recorded.stats.groups_dropped, recorded.stats.groups_encoded) == (0, 1)
    assert live.stats.max_wait_ms >= 2000


async def test_a_dropped_group_counts_as_dropped_in_the_cameras_encoder(vlm):
    tower = EncodeScheduler(vlm)
    memory = keep_all()
    enc = RollingEncoder(vlm, memory, scheduler=tower, drop_when_behind=True, max_latency_s=0.1, name="live")
    images = camera_frames(5, n=4)
    try:
        enc._encode_batch([([Frame(0, 0.0, images[0]), Frame(1, 0.5, images[1])], time.monotonic() - 1.0),
                           ([Frame(2, 1.0, images[2]), Frame(3, 1.5, images[3])], time.monotonic())])
    finally:
        enc.close()
        tower.close()
    assert (enc.stats.groups_dropped, enc.stats.groups_encoded) == (1, 1)
    assert held(memory)[1] == [1.0]
    assert enc.stats.prune_ms == enc.stats.prune_ms_total > 0  # per pruned group: the dropped one is not averaged in


def test_a_closed_scheduler_refuses_new_work(vlm):
    tower = EncodeScheduler(vlm)
    tower.close()
    with pytest.raises(RuntimeError, match="closed"):
        tower.encode(tower.client("late"), [camera_frames(6, n=2)])


async def test_cameras_of_one_run_share_the_models_tower(vlm):
    """Two camera services on one model, as `streamprune run` starts them: both streams go through
    the one tower queue, each memory holds its own stream, and each camera's status shows its
    ingest latency."""
    from stream.camera import Camera
    from stream.config import from_dict

    tower = EncodeScheduler(vlm, max_batch=16)
    cameras = [Camera(from_dict({
        "name": name, "source": {"kind": "synthetic", "fps": 4.0, "duration_s": 8.0, "seed": seed},
        "sampler": {"fps": 2.0}, "memory": {"pruner": "recent", "capacity": 100_000, "recent_groups": 0},
        "output": {"status_interval_s": 0.0}}), vlm, scheduler=tower) for name, seed in (("door", 1), ("yard", 2))]
    try:
        for cam in cameras:
            await cam.__aenter__()
        await asyncio.wait_for(asyncio.gather(*(cam.finished.wait() for cam in cameras)), 60)
        statuses = [cam.status() for cam in cameras]
    finally:
        for cam in cameras:
            await cam.stop()
        tower.close()
    assert [s.groups_encoded for s in statuses] == [8, 8] and all(s.dropped == 0 for s in statuses)
    assert all(s.ingest_latency_ms > 0 for s in statuses)
    assert [s.tower["groups_encoded"] for s in statuses] == [8, 8] and all(s.tower["groups_dropped"] == 0 for s in statuses)
    assert tower.stats.groups == 16
    door, yard = (cam.memory.snapshot() for cam in cameras)
    assert torch.unique_consecutive(door.group).tolist() == list(range(8)) == torch.unique_consecutive(yard.group).tolist()
    assert not torch.equal(door.tokens, yard.tokens)  # two different scenes, each in its own memory


class RecordingTower:
    """The tiny model, recording which camera's groups rode in each tower call."""

    def __init__(self, vlm):
        self.vlm, self.name, self.batches = vlm, vlm.name, []

    def prepare(self, group):
        return group

    def encode_prepared(self, prepared):
        self.batches.append([owner for owner, _ in prepared])
        return self.vlm.encode([g for _, g in prepared])


def test_jobs_go_oldest_first_so_a_quiet_camera_never_waits_behind_a_busy_ones_backlog(vlm):
    rec = RecordingTower(vlm)
    tower = EncodeScheduler(rec, max_batch=4)
    busy, quiet = tower.client("busy"), tower.client("quiet")
    images = camera_frames(7, n=2)
    now = time.monotonic()
    tower._cond.acquire()  # let all three jobs queue up before the worker looks
    try:
        first = tower.submit(busy, [("busy", images)] * 4, [now] * 4)
        lone = tower.submit(quiet, [("quiet", images)], [now])
        second = tower.submit(busy, [("busy", images)] * 4, [now] * 4)
    finally:
        tower._cond.release()
    try:
        for job in (first, lone, second):
            job.result(timeout=30)
    finally:
        tower.close()
    assert rec.batches == [["busy"] * 4, ["quiet"], ["busy"] * 4]  # the quiet group did not wait for the second
