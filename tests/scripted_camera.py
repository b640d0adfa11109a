"""A real `CameraService` without a model, for front-door tests: the camera's own `Door`,
`Watches` and `Bus` around an answerer that reads the ground truth of a synthetic scene.

It answers "Yes, it is in view." exactly when `says_yes(stream time)` (the tiny random model
cannot judge a scene), after `delay` seconds. Stream time runs at `speed` x wall clock from
construction; `latest_jpeg()` renders the scene's frame at that time when there is a source.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import cv2
import numpy as np

from stream.bus import Bus, Sink
from stream.camera_api import MemoryMap
from stream.door import Door, DoorSettings, OnText
from stream.events import Answer, Question, SceneChange, SourceState, Status
from stream.sources.synthetic import SyntheticSource
from stream.watches import Watches


class ScriptedCamera:
    def __init__(self, name: str, says_yes: Callable[[float], bool] = lambda t: True,
                 source: SyntheticSource | None = None, speed: float = 1.0, delay: float = 0.0,
                 door: DoorSettings = DoorSettings()):
        self.name, self.says_yes, self.source, self.speed, self.delay = name, says_yes, source, speed, delay
        self.model = "scripted"
        self.t0 = time.monotonic()
        self.bus = Bus()
        self.door = Door(name, self._answer, self.bus.publish, door)
        self.watches = Watches(name, self.ask, self.bus.publish, self.latest_jpeg,
                               max_question_chars=door.max_question_chars)
        self.answers: list[Answer] = []  # every answer it gave, in order
        self.state = "streaming"
        self._state_since = time.monotonic()

    def stream_s(self) -> float:
        return (time.monotonic() - self.t0) * self.speed

    async def ask(self, question: Question, on_text: OnText | None = None) -> Answer:
        return await self.door.ask(question, on_text)

    async def _answer(self, q: Question, on_text: OnText | None) -> Answer:
        await asyncio.sleep(self.delay)
        t = self.stream_s()
        text = "Yes, it is in view." if self.says_yes(t) else "No."
        if on_text is not None:
            on_text(text)
        answer = Answer(text=text, question=q.text, t_start=max(0.0, t - 1.0), t_end=t, groups=2, tokens_used=12,
                        memory_tokens=24, prompt_tokens=40, new_tokens=5, ttft_s=0.001, total_s=self.delay + 0.001,
                        camera=self.name, id=q.id, model="scripted", pruner="none", origin=q.origin)
        self.answers.append(answer)
        return answer

    def status(self) -> Status:
        """Live: the source block says how long ago the state last changed, as of this call."""
        return Status(camera=self.name, stream_s=self.stream_s(), fps_in=0.0, fps_out=0.0, frames_in=0,
                      frames_out=0, dropped=0, groups_encoded=0, memory_tokens=24, tokens_seen=24, encode_ms=0.0,
                      prune_ms=0.0, backlog=0, queued=self.door.queued, answers=self.door.answers,
                      errors=dict(self.door.errors), watches=len(self.watches), watch_counters=dict(self.watches.counters),
                      source={"state": self.state, "state_age_s": time.monotonic() - self._state_since})

    def latest_jpeg(self) -> bytes | None:
        if self.source is None:
            return None
        image = self.source.render(min(self.stream_s(), self.source.duration_s))
        return cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()

    def memory_map(self) -> MemoryMap:
        empty = np.zeros(0, np.int64)
        return MemoryMap(group=empty, pts=np.zeros(0), row=empty, col=empty, grid=(1, 1), tokens_seen=24,
                         groups_seen=2)

    async def scene_change(self, group: int, pts: float) -> None:
        """What the camera does when its encoder sees a new scene."""
        await self.bus.publish(SceneChange(self.name, group, pts))
        self.watches.scene_change()

    async def source_state(self, new: str) -> None:
        old, self.state, self._state_since = self.state, new, time.monotonic()
        await self.bus.publish(SourceState(self.name, old, new, self.status().source))


@contextlib.asynccontextmanager
async def running(*cameras: ScriptedCamera, sink: Sink | None = None):
    """The cameras' watches scheduled for the block, `sink` subscribed to their buses; at the end
    the cameras stop (questions still waiting get `unavailable`)."""
    for cam in cameras:
        if sink is not None:
            cam.bus.subscribe(sink)
    tasks = [asyncio.create_task(cam.watches.run()) for cam in cameras]
    try:
        yield cameras
    finally:
        for cam in cameras:
            cam.door.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
