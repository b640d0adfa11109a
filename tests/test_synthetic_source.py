"""SyntheticSource: determinism, scripted ground truth that matches the pixels, pacing, speed."""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.sources import SyntheticSource, make_script
from stream.sources.synthetic import PERIODIC_KINDS, Actor, Flicker, Periodic, Script

EVENT_KINDS = {"enter", "move", "leave", "appear", "brief", "cut"}


async def collect(source):
    return [frame async for frame in source]


def reader_threads(source):
    return [t for t in threading.enumerate() if t.name == f"source:{source.name}"]


def bare(script: Script, **changes) -> Script:
    """The same script with no actors and no flickers (plus `changes`): the empty scene."""
    return dataclasses.replace(script, **{"actors": (), "flickers": (), **changes})


def inside(box, diff_mask):
    x0, y0, x1, y1 = box
    outside = diff_mask.copy()
    outside[y0:y1, x0:x1] = False
    return not outside.any()


def test_same_seed_same_frames_and_different_seed_different():
    a, b, c = SyntheticSource(seed=3), SyntheticSource(seed=3), SyntheticSource(seed=4)
    for t in (0.0, 7.3, 31.0, 59.9):
        assert np.array_equal(a.render(t), b.render(t))
        assert not np.array_equal(a.render(t), c.render(t))
    assert a.events == b.events and a.events != c.events


def test_same_seed_same_frames_in_another_process():
    """Nothing may depend on per-process state such as Python's salted str hash."""
    code = (
        "import hashlib; from stream.sources import SyntheticSource; "
        "s = SyntheticSource(seed=9, width=96, height=64); "
        "print(hashlib.sha256(s.render(12.3).tobytes()).hexdigest(), s.events[3])"
    )
    here = SyntheticSource(seed=9, width=96, height=64)
    expected = f"{hashlib.sha256(here.render(12.3).tobytes()).hexdigest()} {here.events[3]}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_render_is_pure_in_t():
    s = SyntheticSource(seed=1)
    later, earlier = s.render(40.0), s.render(2.0)
    assert np.array_equal(s.render(2.0), earlier)
    assert np.array_equal(s.render(40.0), later)
    frame = s.render(2.0)
    frame[:] = 0  # a caller may scribble on a frame without touching the cached background
    assert np.array_equal(s.render(2.0), earlier)


async def test_iteration_matches_render_and_counts_frames():
    s = SyntheticSource(duration_s=3.0, fps=10.0, seed=2, width=160, height=120)
    frames = await collect(s)
    assert len(frames) == 30 == s.stats.frames
    assert [f.index for f in frames] == list(range(30))
    assert [f.pts for f in frames] == [i / 10.0 for i in range(30)]
    for f in frames[::7]:
        assert f.image.shape == (120, 160, 3) and f.image.dtype == np.uint8
        assert np.array_equal(f.image, s.render(f.pts))
    assert s.closed and not s.live


async def test_frame_count_is_duration_times_fps():
    s = SyntheticSource(duration_s=2.5, fps=4.0, width=64, height=48)
    assert len(await collect(s)) == 10 == s.n_frames


def test_default_script_has_every_kind_inside_the_frame_and_duration():
    s = SyntheticSource(seed=0)
    assert s.duration_s == 60.0
    kinds = {e.kind for e in s.events}
    assert kinds == EVENT_KINDS
    for e in s.events:
        assert 0.0 <= e.start_s <= e.end_s <= 60.0
        x0, y0, x1, y1 = e.box
        assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
    cuts = [e for e in s.events if e.kind == "cut"]
    assert len(cuts) == 1 and 25.0 <= cuts[0].start_s <= 35.0
    briefs = [e for e in s.events if e.kind == "brief"]
    assert briefs and all(1.0 <= e.end_s - e.start_s <= 2.0 for e in briefs)
    assert any(e.kind == "appear" and "OPEN" in e.label for e in s.events)
    assert {d.kind for d in s.distractors} == {"flicker", "lighting"}
    assert [e.start_s for e in s.events] == sorted(e.start_s for e in s.events)


@pytest.mark.parametrize("seed", [0, 5])
def test_each_actor_is_drawn_inside_its_event_box(seed):
    s = SyntheticSource(seed=seed, width=320, height=240)
    empty = SyntheticSource(seed=seed, width=320, height=240, script=bare(s.script))
    actors = {a.label: a for a in s.script.actors}
    checked = 0
    for e in s.events:
        if e.kind == "cut":
            continue
        alone = SyntheticSource(seed=seed, width=320, height=240, script=bare(s.script, actors=(actors[e.label],)))
        for t in (e.start_s + 0.25 * (e.end_s - e.start_s), (e.start_s + e.end_s) / 2):
            diff = np.any(alone.render(t) != empty.render(t), axis=2)
            assert diff.sum() >= 20, (e, t)
            assert inside(e.box, diff), (e, t)
            assert inside(alone.boxes_at(t)[e.label], diff)
        checked += 1
    assert checked >= 8


def test_whole_frame_changes_are_inside_actor_and_lamp_boxes():
    s = SyntheticSource(seed=2, width=320, height=240)
    empty = SyntheticSource(seed=2, width=320, height=240, script=bare(s.script))
    lamps = [d.box for d in s.distractors if d.kind == "flicker"]
    for t in np.arange(0.0, 60.0, 1.7):
        diff = np.any(s.render(t) != empty.render(t), axis=2)
        for x0, y0, x1, y1 in [*s.boxes_at(t).values(), *lamps]:
            diff[y0:y1, x0:x1] = False
        assert not diff.any(), t


def test_event_spans_match_a_sampled_search():
    """Enter/leave spans are solved in closed form; compare with sampling boxes_at densely."""
    s = SyntheticSource(seed=7, width=320, height=240)
    for e in s.events:
        if e.kind not in ("enter", "leave"):
            continue
        seen = [t for t in np.arange(e.start_s - 0.5, e.end_s + 0.5, 0.002) if e.label in s.boxes_at(t)]
        edge = seen[0] if e.kind == "enter" else seen[-1]
        expected = e.start_s if e.kind == "enter" else e.end_s
        assert abs(edge - expected) < 0.06, (e, edge)


def test_cut_changes_the_background_and_quiet_frames_stay_close():
    s = SyntheticSource(seed=0, width=320, height=240)
    cut = next(e.start_s for e in s.events if e.kind == "cut")
    before, after = s.render(cut - 0.05), s.render(cut + 0.05)
    assert np.abs(before.astype(int) - after.astype(int)).mean() > 20
    empty = SyntheticSource(seed=0, width=320, height=240, script=bare(s.script))
    a, b = empty.render(1.0), empty.render(1.1)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 6  # only noise and drift


def test_flicker_lamp_takes_both_states_and_drift_changes_brightness():
    s = SyntheticSource(seed=0, width=320, height=240)
    lamp = next(d for d in s.distractors if d.kind == "flicker")
    x0, y0, x1, y1 = lamp.box
    levels = {round(float(s.render(t)[y0:y1, x0:x1].mean()) / 50) for t in np.arange(lamp.start_s, lamp.start_s + 4, 0.1)}
    assert len(levels) >= 2
    empty = SyntheticSource(seed=0, width=320, height=240, script=bare(s.script))
    means = [empty.render(t).mean() for t in np.arange(0.0, 20.0, 1.0)]
    assert max(means) - min(means) > 5


def test_render_is_cheap():
    s = SyntheticSource(seed=0)
    s.render(0.0)  # builds the cached background, sprites and noise
    times = []
    for t in np.arange(0.0, 60.0, 1.0):
        start = time.perf_counter()
        s.render(float(t))
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < 0.003


async def test_realtime_pacing_follows_the_wall_clock():
    s = SyntheticSource(duration_s=1.0, fps=20.0, width=64, height=48, realtime=True, speed=2.0)
    assert s.live
    start = time.monotonic()
    arrivals = []
    async for frame in s:
        arrivals.append((frame.pts, time.monotonic() - start))
    elapsed = arrivals[-1][1]
    assert 0.45 <= elapsed <= 0.8  # last pts 0.95 s at 2x speed
    assert all(wall >= pts / 2.0 - 0.02 for pts, wall in arrivals)


async def test_unpaced_iteration_is_fast():
    s = SyntheticSource(duration_s=10.0, fps=10.0, width=160, height=120)
    start = time.monotonic()
    assert len(await collect(s)) == 100
    assert time.monotonic() - start < 1.0


async def test_close_and_single_pass():
    s = SyntheticSource(duration_s=10.0, width=64, height=48)
    frames = []
    async for frame in s:
        frames.append(frame)
        if len(frames) == 3:
            s.close()
    assert len(frames) == 3 and s.closed
    with pytest.raises(RuntimeError, match="already iterated"):
        async for _ in s:
            pass
    await asyncio.sleep(0.2)
    assert not reader_threads(s)


async def test_leaving_the_loop_early_closes_the_source_and_its_thread():
    s = SyntheticSource(duration_s=10.0, width=64, height=48)
    async for _ in s:
        break
    await asyncio.sleep(0.2)
    assert s.closed and not reader_threads(s)
    t = SyntheticSource(duration_s=10.0, width=64, height=48)
    async with t:
        assert not t.closed
    assert t.closed


def test_long_scripts_have_many_events_of_each_kind():
    s = SyntheticSource(script=make_script(600.0, seed=11), width=320, height=240)
    counts = {k: sum(e.kind == k for e in s.events) for k in EVENT_KINDS}
    assert counts["cut"] >= 15
    assert all(counts[k] >= 15 for k in ("enter", "move", "leave", "appear", "brief")), counts
    assert all(0.0 <= e.start_s <= e.end_s <= 600.0 for e in s.events)
    assert make_script(600.0, seed=11) == make_script(600.0, seed=11) != make_script(600.0, seed=12)
    assert len(s.distractors) == counts["cut"] + 2


@settings(max_examples=40, deadline=None)
@given(
    duration=st.floats(0.5, 400.0),
    seed=st.integers(0, 2**32),
    size=st.sampled_from([(64, 48), (320, 240), (640, 360), (480, 640)]),
)
def test_any_script_events_stay_inside(duration, seed, size):
    w, h = size
    s = SyntheticSource(script=make_script(duration, seed), width=w, height=h)
    for e in s.events + s.distractors:
        assert e.kind in EVENT_KINDS | {"flicker", "lighting"}
        assert 0.0 <= e.start_s <= e.end_s <= duration
        x0, y0, x1, y1 = e.box
        assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h


def test_invalid_scripts_are_rejected():
    keys = ((0.0, 0.5, 0.5), (1.0, 0.5, 0.5))
    with pytest.raises(ValueError, match="shape"):
        Actor("x", "hexagon", (1, 2, 3), 0.1, keys, ("brief",))
    with pytest.raises(ValueError, match="phase"):
        Actor("x", "circle", (1, 2, 3), 0.1, keys, ("brief", "move"))
    with pytest.raises(ValueError, match="key times"):
        Actor("x", "circle", (1, 2, 3), 0.1, keys[::-1], ("brief",))
    actor = Actor("x", "circle", (1, 2, 3), 0.1, keys, ("brief",))
    with pytest.raises(ValueError, match="unique"):
        Script(5.0, actors=(actor,), flickers=(Flicker("x", (0, 0, 0.1, 0.1), 0.0, 1.0),))
    with pytest.raises(ValueError, match="cuts"):
        Script(5.0, cuts=(3.0, 2.0))
    with pytest.raises(ValueError, match="differs"):
        SyntheticSource(duration_s=10.0, script=Script(5.0))


def test_hand_written_script_ground_truth():
    """A square crossing from off-screen left: enter ends when its centre key is reached, and
    the enter box runs from the left edge to the key position."""
    actor = Actor(
        "box", "square", (255, 0, 0), 0.25,
        ((0.0, -0.5, 0.5), (2.0, 0.5, 0.5), (3.0, 0.5, 0.5)), ("enter", "stay"),
    )
    s = SyntheticSource(script=Script(4.0, actors=(actor,), drift_amplitude=0.0, noise_sigma=0.0), width=100, height=100)
    (enter,) = s.events
    # sprite 25 px, centre x = -50 + 100 t / 2 -> right edge -37.5 + 50 t > 0 from t = 0.75 s
    assert enter.kind == "enter" and enter.start_s == pytest.approx(0.75) and enter.end_s == 2.0
    assert enter.box == (0, 38, 63, 63)
    frame = s.render(2.5)
    assert (frame[38:63, 38:63] == [255, 0, 0]).all(axis=2).mean() > 0.3  # striped red
    assert s.boxes_at(3.0) == {}


def test_periodic_distractors_are_opt_in_and_repeat():
    plain, periodic = make_script(120.0, seed=5), make_script(120.0, seed=5, periodic=True)
    assert plain.periodic == () and dataclasses.replace(periodic, periodic=()) == plain  # same actors, cuts, lamps
    a = SyntheticSource(script=plain, width=320, height=240, seed=5)
    b = SyntheticSource(script=periodic, width=320, height=240, seed=5)
    assert a.events == b.events
    kinds = {d.kind: d for d in b.distractors}
    assert set(kinds) == {"flicker", "lighting", "blink", "sway", "shimmer"}
    area = sum((d.box[2] - d.box[0]) * (d.box[3] - d.box[1]) for d in b.distractors if d.kind in PERIODIC_KINDS)
    assert 0.10 <= area / (320 * 240) <= 0.20
    quiet = bare(periodic, drift_amplitude=0.0, noise_sigma=0.0)
    s = SyntheticSource(script=quiet, width=320, height=240, seed=5)
    off = SyntheticSource(script=dataclasses.replace(quiet, periodic=()), width=320, height=240, seed=5)
    for t in (0.0, 1.0, 2.5, 7.0):
        changed = (s.render(t) != off.render(t)).any(axis=2)
        assert all(changed[d.box[1]:d.box[3], d.box[0]:d.box[2]].any() for d in b.distractors if d.kind in PERIODIC_KINDS)
        union = np.zeros_like(changed)
        for d in b.distractors:
            if d.kind in PERIODIC_KINDS:
                union[d.box[1]:d.box[3], d.box[0]:d.box[2]] = True
        assert not (changed & ~union).any()  # nothing changes outside the distractors' boxes
    for p in periodic.periodic:  # each repeats with its period, and changes within it
        x0, y0, x1, y1 = s._px_box(p.box)
        crop = [s.render(t)[y0:y1, x0:x1] for t in (10.0, 10.0 + p.period_s / 2, 10.0 + p.period_s)]
        assert np.array_equal(crop[0], crop[2]) and not np.array_equal(crop[0], crop[1])
    with pytest.raises(ValueError, match="kind"):
        Periodic("x", "spin", (0.0, 0.0, 0.1, 0.1), 2.0)
    with pytest.raises(ValueError, match="box"):
        Periodic("x", "blink", (0.0, 0.0, 1.1, 0.1), 2.0)
