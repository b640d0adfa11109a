"""Standing questions ("watches") of one camera: asked on a schedule, an event when the answer turns true.

Each watch asks its question every `every_s` seconds and/or when the camera reports a scene
change, reads the answer as yes/no (`parse_yes_no`), and compares it with its `trigger`. A
`WatchFired` event is published on the transition to "matches" only: while the condition stays
true nothing more is sent, an answer that does not match re-arms the watch, an answer that is
neither yes nor no changes nothing, and no event follows another on the same watch within
`cooldown_s` (a match during the cooldown fires at the first check after it if it still holds).
Watches belong to the camera, so they work with any sink (console, JSONL, MQTT); schedules and
cooldowns run on the camera's wall clock.
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

from .door import WATCH_ORIGIN
from .errors import ConfigError, RequestError
from .events import Answer, Event, Question, WatchFired
from .validation import bounded, choice

log = logging.getLogger(__name__)

TRIGGERS = ("yes", "no")
MAX_WATCHES = 64  # per camera: a runtime `add` flood cannot grow the schedule without bound
MIN_EVERY_S = 0.1
ASK_SUFFIX = " Answer yes or no first."
_YES_NO = re.compile(r"\b(yes|yeah|yep|true|no|nope|false)\b", re.IGNORECASE)


@dataclass(frozen=True)
class WatchSpec:
    """A standing question: asked on a schedule, it fires an event when its answer turns to `trigger`."""

    name: str = ""
    question: str = ""
    camera: str = ""  # "" = every camera
    every_s: float = bounded(0.0, 0.0, 86_400.0)  # ask every N seconds; 0 = not on a timer
    on_scene_change: bool = False  # ask when the camera reports a scene change
    trigger: str = choice(*TRIGGERS, default="yes")  # the answer that fires the event
    cooldown_s: float = bounded(60.0, 0.0, 7 * 86_400.0)  # no second event sooner than this
    max_new_tokens: int = bounded(16, 1, 1024)
    llm_budget: int = bounded(0, 0, 10_000_000)  # 0 = the camera's default


def check_watch(spec: WatchSpec) -> WatchSpec:
    """Rules across a watch's fields (a schedule, a name, a question); raises ConfigError."""
    if not spec.name.strip():
        raise ConfigError("must not be empty", "name")
    if len(spec.name) > 100:
        raise ConfigError("at most 100 characters", "name")
    if not spec.question.strip():
        raise ConfigError("must not be empty", "question")
    if spec.every_s == 0 and not spec.on_scene_change:
        raise ConfigError("the watch has no schedule: set every_s > 0 and/or on_scene_change = true", "every_s")
    if 0 < spec.every_s < MIN_EVERY_S:
        raise ConfigError(f"{spec.every_s!r} is too often; 0 (off) or at least {MIN_EVERY_S}", "every_s")
    return spec


def parse_yes_no(text: str) -> bool | None:
    """True/False from the first yes-like or no-like word of an answer; None when there is none."""
    m = _YES_NO.search(text)
    return None if m is None else m.group(1).lower() in ("yes", "yeah", "yep", "true")


@dataclass
class WatchState:
    """One watch and where its trigger logic stands."""

    spec: WatchSpec
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


class Watches:
    """One camera's watches and their scheduler (`run`). Checks go through the camera's door
    (`ask`); a firing publishes `WatchFired` with `snapshot()` (the newest frame as JPEG)."""

    def __init__(self, camera: str, ask: Callable[[Question], Awaitable[Answer]],
                 publish: Callable[[Event], Awaitable[None]], snapshot: Callable[[], bytes | None],
                 clock: Callable[[], float] = time.monotonic):
        self.camera = camera
        self.ask = ask
        self.publish = publish
        self.snapshot = snapshot
        self.clock = clock
        self.counters: Counter = Counter()
        self._watches: dict[str, WatchState] = {}
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._watches)

    def add(self, spec: WatchSpec) -> None:
        """Add or replace (by name) a spec; the first timed check is due at once. ConfigError
        names a bad field; RequestError(`too_many_watches`) past the per-camera limit."""
        check_watch(spec)
        if spec.name not in self._watches and len(self._watches) >= MAX_WATCHES:
            raise RequestError("too_many_watches", f"camera {self.camera!r} already has {MAX_WATCHES} watches")
        self.remove(spec.name)
        due = self.clock() if spec.every_s > 0 else math.inf
        self._watches[spec.name] = WatchState(spec, due)
        self._wake.set()

    def remove(self, name: str) -> bool:
        state = self._watches.pop(name, None)
        if state is not None and state.task is not None:
            state.task.cancel()
        return state is not None

    def describe(self) -> list[dict]:
        """The watches as JSON-ready dicts (spec fields plus `active`)."""
        return [{**asdict(w.spec), "camera": self.camera, "active": w.active} for w in self._watches.values()]

    def scene_change(self) -> None:
        """Queue a check of every scene-change watch."""
        for w in self._watches.values():
            if w.spec.on_scene_change:
                w.scene_pending = True
                self._wake.set()

    async def run(self) -> None:
        """Start due checks (at most one in flight per watch) until cancelled."""
        try:
            while True:
                self._wake.clear()
                now, wait = self.clock(), 1.0
                for w in list(self._watches.values()):
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
            tasks = [w.task for w in self._watches.values() if w.task is not None]
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
        spec = w.spec
        self.counters["watch_checks"] += 1
        try:
            answer = await self.ask(Question(spec.question + ASK_SUFFIX, llm_budget=spec.llm_budget or None,
                                             max_new_tokens=spec.max_new_tokens, origin=WATCH_ORIGIN))
        except RequestError as e:
            self.counters["watch_errors"] += 1
            log.info("watch %r on %s: %s (%s)", spec.name, self.camera, e.message, e.code)
            return
        said = parse_yes_no(answer.text)
        outcome = w.step(None if said is None else said == (spec.trigger == "yes"), self.clock())
        self.counters[f"watch_{outcome}"] += 1
        if outcome == "fire":
            log.info("watch %r on %s fired: %s", spec.name, self.camera, answer.text)
            await self.publish(WatchFired(
                camera=self.camera, watch=spec.name, question=spec.question, answer=answer.text,
                trigger=spec.trigger, t_start=answer.t_start, t_end=answer.t_end, groups=answer.groups,
                model=answer.model, pruner=answer.pruner, id=uuid.uuid4().hex, snapshot=self.snapshot(),
            ))
