"""The sampler's fps grid and its two drop policies, on a scripted in-test source."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from stream.sampler import Sampler
from stream.types import Frame


class Scripted:
    """Frames at `fps` with optional real-time gaps between them."""

    def __init__(self, n, fps, live=False, delay=0.0):
        self.n, self.fps, self.live, self.delay = n, fps, live, delay

    async def __aiter__(self):
        img = np.zeros((4, 4, 3), np.uint8)
        for i in range(self.n):
            if self.delay:
                await asyncio.sleep(self.delay)
            yield Frame(i, i / self.fps, img)


async def test_every_policy_keeps_the_fps_grid():
    s = Sampler(Scripted(300, 30.0), fps=2.0)
    assert s.policy == "every"
    pts = [f.pts async for f in s]
    assert len(pts) == 20 and pts[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert [f for f in range(len(pts))] == list(range(20))
    assert s.stats.frames_in == 300 and s.stats.frames_out == 20 and s.stats.dropped == 0


async def test_irregular_source_takes_the_next_frame_in_each_slot():
    class Jitter(Scripted):
        async def __aiter__(self):
            img = np.zeros((4, 4, 3), np.uint8)
            for i, t in enumerate([0.0, 0.3, 0.61, 0.7, 1.9, 2.05, 2.6]):
                yield Frame(i, t, img)

    pts = [f.pts async for f in Sampler(Jitter(0, 1), fps=2.0)]
    assert pts == [0.0, 0.61, 1.9, 2.05, 2.6]


async def test_latest_policy_drops_old_frames_for_a_slow_consumer():
    s = Sampler(Scripted(60, 20.0, live=True, delay=0.005), fps=20.0, queue_size=2)
    assert s.policy == "latest"
    got = []
    async for f in s:
        got.append(f.pts)
        await asyncio.sleep(0.03)  # the consumer is six times slower than the camera
    assert s.stats.dropped > 20
    assert got == sorted(got) and got[-1] == pytest.approx(59 / 20)
    assert s.stats.frames_out + s.stats.dropped == 60


@pytest.mark.parametrize("kw, msg", [({"fps": 0}, "fps"), ({"fps": 1, "policy": "x"}, "policy"),
                                     ({"fps": 1, "queue_size": 0}, "queue_size")])
def test_bad_settings_are_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Sampler(Scripted(1, 1), **kw)
