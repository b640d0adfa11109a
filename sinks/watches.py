"""Standing questions ("watches"): asked on a schedule, an event when the answer turns true.

Each watch asks its question every `every_s` seconds and/or when the pipeline reports a scene
change, reads the answer as yes/no (`parse_yes_no`), and compares it with its `trigger`. An
event fires on the transition to "matches" only: while the condition stays true nothing more
is sent (de-duplication), an answer that does not match re-arms the watch, an answer that is
neither yes nor no changes nothing, and no event follows another on the same watch within
`cooldown_s` (a match during the cooldown is held back and fires at the first check after it
if the condition still holds). Schedules and cooldowns run on the service's wall clock.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Protocol

from stream.answer import QueryError

from .mqtt_settings import MAX_WATCHES, WatchSpec

log = logging.getLogger(__name__)

ASK_SUFFIX = " Answer yes or no first."
_YES_NO = re.compile(r"\b(yes|yeah|yep|true|no|nope|false)\b", re.IGNORECASE)


class Camera(Protocol):
    """What the MQTT service and the watches need from a camera (CameraPipeline offers it)."""

    name: str

    async def answer(self, question: str, llm_budget: int | None = None, max_new_tokens: int | None = None,
                     request_id: str | None = None) -> dict: ...

    def status_record(self) -> dict: ...

    def latest_jpeg(self) -> bytes | None: ...


def parse_yes_no(text: str) -> bool | None:
    """True/False from the first yes-like or no-like word of an answer; None when there is none."""
    m = _YES_NO.search(text)
    return None if m is None else m.group(1).lower() in ("yes", "yeah", "yep", "true")


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class WatchState:
    """One watch on one camera and where its trigger logic stands."""

    spec: WatchSpec
    camera: str
    next_due: float
    active: bool = False  # fired, and no non-matching answer since
    last_fired: float | None = None
    scene_pending: bool = False
    task: asyncio.Task | None = field(default=None, repr=False)

    def step(self, matched: bool | None, now: float) -> str:
        """Apply one answer; the outcome is "fire", "duplicate", "cooldown", "clear" or "unclear"."""
        if matched is None:
            return "unclear"
        if not matched:
            self.active = False
            return "clear"
        if self.active:
            return "duplicate"
        if self.last_fired is not None and now - self.last_fired < self.spec.cooldown_s:
            return "cooldown"
        self.active, self.last_fired = True, now
        return "fire"


EventHandler = Callable[[str, dict, "bytes | None"], Awaitable[None]]


class Watches:
    """The watches of every camera and their scheduler (`run`); `on_event(camera, event, jpeg)`
    receives each event with the newest frame as JPEG at the moment it fired."""

    def __init__(self, cameras: Mapping[str, Camera], on_event: EventHandler, counters: Counter | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.cameras = cameras
        self.on_event = on_event
        self.counters = counters if counters is not None else Counter()
        self.clock = clock
        self._watches: dict[str, dict[str, WatchState]] = {name: {} for name in cameras}
        self._wake = asyncio.Event()

    def add(self, camera: str, spec: WatchSpec) -> None:
        """Add or replace (by name) a checked spec; the first timed check is due at once."""
        watches = self._watches[camera]
        if spec.name not in watches and len(watches) >= MAX_WATCHES:
            raise ValueError(f"camera {camera!r} already has {MAX_WATCHES} watches")
        self.remove(camera, spec.name)
        due = self.clock() if spec.every_s > 0 else math.inf
        watches[spec.name] = WatchState(spec, camera, due)
        self._wake.set()

    def remove(self, camera: str, name: str) -> bool:
        state = self._watches[camera].pop(name, None)
        if state is not None and state.task is not None:
            state.task.cancel()
        return state is not None

    def describe(self, camera: str) -> list[dict]:
        """The camera's watches as JSON-ready dicts (spec fields plus `active`)."""
        return [{**asdict(w.spec), "camera": camera, "active": w.active} for w in self._watches[camera].values()]

    def scene_change(self, camera: str) -> None:
        """Queue a check of every scene-change watch of `camera`."""
        for w in self._watches.get(camera, {}).values():
            if w.spec.on_scene_change:
                w.scene_pending = True
                self._wake.set()

    async def run(self) -> None:
        """Start due checks (at most one in flight per watch) until cancelled."""
        try:
            while True:
                self._wake.clear()
                now, wait = self.clock(), 1.0
                for w in [w for watches in self._watches.values() for w in watches.values()]:
                    if w.task is not None:
                        continue
                    if w.scene_pending or now >= w.next_due:
                        self._start(w, now)
                    else:
                        wait = min(wait, w.next_due - now)
                try:
                    await asyncio.wait_for(self._wake.wait(), max(wait, 0.0))
                except TimeoutError:
                    pass
        finally:
            tasks = [w.task for watches in self._watches.values() for w in watches.values() if w.task is not None]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, w: WatchState, now: float) -> None:
        w.scene_pending = False
        if w.spec.every_s > 0:
            w.next_due = now + w.spec.every_s
        w.task = asyncio.create_task(self._check(w))
        w.task.add_done_callback(lambda _t, w=w: self._done(w))

    def _done(self, w: WatchState) -> None:
        w.task = None
        self._wake.set()

    async def _check(self, w: WatchState) -> None:
        cam = self.cameras[w.camera]
        spec = w.spec
        self.counters["watch_checks"] += 1
        try:
            record = await cam.answer(spec.question + ASK_SUFFIX, llm_budget=spec.llm_budget or None,
                                      max_new_tokens=spec.max_new_tokens, request_id=f"watch:{spec.name}")
        except QueryError as e:
            self.counters["watch_errors"] += 1
            log.info("watch %r on %s: %s (%s)", spec.name, w.camera, e.message, e.code)
            return
        except Exception:
            self.counters["watch_errors"] += 1
            log.exception("watch %r on %s failed", spec.name, w.camera)
            return
        said = parse_yes_no(record.get("text", ""))
        outcome = w.step(None if said is None else said == (spec.trigger == "yes"), self.clock())
        self.counters[f"watch_{outcome}"] += 1
        if outcome == "fire":
            event = {
                "type": "event", "id": uuid.uuid4().hex, "camera": w.camera, "watch": spec.name,
                "question": spec.question, "answer": record.get("text", ""), "trigger": spec.trigger,
                "t_start": record.get("t_start"), "t_end": record.get("t_end"),
                "groups": record.get("groups_covered"), "model": record.get("model"),
                "pruner": record.get("pruner"), "timestamp": utc_now(),
            }
            log.info("watch %r on %s fired: %s", spec.name, w.camera, event["answer"])
            await self.on_event(w.camera, event, cam.latest_jpeg())
