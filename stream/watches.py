"""Standing questions ("watches") of one camera: asked on a schedule, an event when the answer turns true.

Each watch asks its question every `every_s` seconds and/or when the camera reports a scene
change, reads the answer as yes/no (`parse_yes_no`), and compares it with its `trigger`. A
`WatchFired` event is published on the transition to "matches" only: while the condition stays
true nothing more is sent, an answer that does not match re-arms the watch, an answer that is
neither yes nor no changes nothing, and no event follows another on the same watch within
`cooldown_s` (a match during the cooldown fires at the first check after it if it still holds).
Watches belong to the camera, so they work with any sink (console, JSONL, MQTT); schedules and
cooldowns run on the camera's wall clock. A camera holds at most `MAX_WATCHES` (64) watches.
Every answered check publishes `WatchChecked` (the watch's on/off state for home automation),
and every add or remove `WatchesChanged` (from the scheduler, in order with the checks), so a
front door can announce or withdraw a watch whichever door changed it.

Checks go through the camera's door (stream/door.py) as questions of origin `watch`, which come
after user questions, are preempted by them and get at most the door's `watch_share` of the
LLM's time. A camera has one check in flight at a time (the LLM answers one at a time anyway),
the most overdue watch first, and a late watch is asked once, not once per missed interval. A
watch answered further apart than its `every_s` cannot keep up: its effective interval grows.
It is reported `slowed` (with `effective_every_s`, the running mean of the gaps between its
answers, the first counted from when it was added) once that mean passes `SLOW_FACTOR` x
`every_s`, and recovers below `RECOVER_FACTOR` x `every_s`; counter `watch_slowed` counts the
slow-downs. A preempted check is asked again in its old place in the order (counter
`watch_preempted`).

A watch is refused (`ConfigError`, naming the field) when a field is out of range or not a
finite number, its name is empty, longer than 100 characters, not valid Unicode (it must encode
as UTF-8) or holds control characters, its question is not valid Unicode, or the question with
the `ASK_SUFFIX` the watch appends is longer than the camera's `max_question_chars` (the door
would refuse every check).
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import typing
import unicodedata
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields

from .door import WATCH_ORIGIN, DoorSettings
from .errors import ConfigError, RequestError
from .events import Answer, Event, Question, WatchChecked, WatchesChanged, WatchFired, utc_now
from .validation import bounded, choice, convert

log = logging.getLogger(__name__)

TRIGGERS = ("yes", "no")
MAX_WATCHES = 64  # per camera: a runtime `add` flood cannot grow the schedule without bound
MIN_EVERY_S = 0.1
ASK_SUFFIX = " Answer yes or no first."
MAX_NAME_CHARS = 100
SLOW_FACTOR = 1.5  # answered this many times further apart than every_s: slowed
RECOVER_FACTOR = 1.25  # ... and back below this: no longer slowed
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


def _unicode_problem(text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not valid Unicode text ({e.reason} at character {e.start})"
    return None


def check_watch(spec: WatchSpec, max_question_chars: int | None = None) -> WatchSpec:
    """Each field's type and range, then rules across fields (a schedule, a name, a question, and
    with `max_question_chars` the camera's question limit); raises ConfigError naming the field."""
    hints = typing.get_type_hints(WatchSpec)
    for f in fields(WatchSpec):
        convert(getattr(spec, f.name), hints[f.name], f.name, f.metadata)
    if not spec.name.strip():
        raise ConfigError("must not be empty", "name")
    if len(spec.name) > MAX_NAME_CHARS:
        raise ConfigError(f"at most {MAX_NAME_CHARS} characters", "name")
    if (problem := _unicode_problem(spec.name)) is not None:
        raise ConfigError(problem, "name")
    if control := [c for c in spec.name if unicodedata.category(c) == "Cc"]:
        raise ConfigError(f"must not hold control characters (found {control[0]!r})", "name")
    if not spec.question.strip():
        raise ConfigError("must not be empty", "question")
    if (problem := _unicode_problem(spec.question)) is not None:
        raise ConfigError(problem, "question")
    asked = len((spec.question + ASK_SUFFIX).strip())
    if max_question_chars is not None and asked > max_question_chars:
        limit = max_question_chars - len(ASK_SUFFIX)
        raise ConfigError(f"{asked - len(ASK_SUFFIX)} characters; this camera's limit for a watch question is "
                          f"{limit} (query.max_question_chars {max_question_chars} less the {len(ASK_SUFFIX)} of "
                          f"{ASK_SUFFIX.strip()!r} the watch appends)", "question")
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
    """One watch, where its trigger logic stands, and how often it actually gets answered."""

    spec: WatchSpec
    next_due: float
    active: bool = False  # fired, and no non-matching answer since
    last_fired: float | None = None
    scene_at: float | None = None  # a scene change waits for a check since then
    last_answered: float | None = None  # or when the watch was added
    effective_every_s: float | None = None  # the gaps between answers, smoothed (each new gap weighs half)
    slowed: bool = False
    last_answer: str | None = None  # the last check's answer, None before the first
    matches: bool | None = None  # whether that answer says the condition holds (None: neither yes nor no)
    last_checked: str | None = None  # when it was answered (UTC, ISO 8601)
    task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def due(self) -> float:
        return self.next_due if self.scene_at is None else min(self.next_due, self.scene_at)

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

    def answered(self, now: float) -> str | None:
        """Note an answer at `now`; "slowed" or "recovered" when that changes (timed watches only)."""
        every, last = self.spec.every_s, self.last_answered
        self.last_answered = now
        if every <= 0 or last is None:
            return None
        gap = now - last
        self.effective_every_s = gap if self.effective_every_s is None else (self.effective_every_s + gap) / 2
        if not self.slowed and self.effective_every_s > SLOW_FACTOR * every:
            self.slowed = True
            return "slowed"
        if self.slowed and self.effective_every_s <= RECOVER_FACTOR * every:
            self.slowed = False
            return "recovered"
        return None


class Watches:
    """One camera's watches and their scheduler (`run`). Checks go through the camera's door
    (`ask`); a firing publishes `WatchFired` with `snapshot()` (the newest frame as JPEG).
    `max_question_chars` is the door's limit, so a question the door would refuse is refused
    when the watch is added."""

    def __init__(self, camera: str, ask: Callable[[Question], Awaitable[Answer]],
                 publish: Callable[[Event], Awaitable[None]], snapshot: Callable[[], bytes | None],
                 clock: Callable[[], float] = time.monotonic,
                 max_question_chars: int = DoorSettings.max_question_chars):
        self.camera = camera
        self.ask = ask
        self.publish = publish
        self.snapshot = snapshot
        self.clock = clock
        self.max_question_chars = max_question_chars
        self.counters: Counter = Counter()
        self._watches: dict[str, WatchState] = {}
        self._in_flight: WatchState | None = None
        self._wake = asyncio.Event()
        self._changed = False  # the scheduler publishes WatchesChanged

    def __len__(self) -> int:
        return len(self._watches)

    def add(self, spec: WatchSpec) -> None:
        """Add or replace (by name) a spec; the first timed check is due at once. ConfigError
        names a bad field; RequestError(`too_many_watches`) past the per-camera limit."""
        check_watch(spec, self.max_question_chars)
        if spec.name not in self._watches and len(self._watches) >= MAX_WATCHES:
            raise RequestError("too_many_watches", f"camera {self.camera!r} already has {MAX_WATCHES} watches")
        self.remove(spec.name)
        now = self.clock()
        self._watches[spec.name] = WatchState(spec, now if spec.every_s > 0 else math.inf, last_answered=now)
        self._changed = True
        self._wake.set()

    def remove(self, name: str) -> bool:
        state = self._watches.pop(name, None)
        if state is not None:
            if state.task is not None:
                state.task.cancel()
            self._changed = True
            self._wake.set()
        return state is not None

    def describe(self) -> list[dict]:
        """The watches as JSON-ready dicts: spec fields plus `active`, `slowed`,
        `effective_every_s` (None before its first answer, and for a watch not on a timer), and
        the last check's `last_answer`, `matches` and `last_checked` (None before the first)."""
        return [{**asdict(w.spec), "camera": self.camera, "active": w.active, "slowed": w.slowed,
                 "effective_every_s": None if w.effective_every_s is None else round(w.effective_every_s, 3),
                 "last_answer": w.last_answer, "matches": w.matches, "last_checked": w.last_checked}
                for w in self._watches.values()]

    def scene_change(self) -> None:
        """Queue a check of every scene-change watch."""
        now = self.clock()
        for w in self._watches.values():
            if w.spec.on_scene_change and w.scene_at is None:
                w.scene_at = now
                self._wake.set()

    async def run(self) -> None:
        """Start the most overdue check whenever none is in flight, and tell the bus when the
        watches changed, until cancelled."""
        try:
            while True:
                self._wake.clear()
                if self._changed:
                    self._changed = False
                    await self.publish(WatchesChanged(self.camera, self.describe()))
                wait = 1.0
                if self._in_flight is None and self._watches:
                    now = self.clock()
                    w = min(self._watches.values(), key=lambda w: w.due)
                    if w.due <= now:
                        self._start(w, now)
                    else:
                        wait = min(wait, w.due - now)
                try:
                    await asyncio.wait_for(self._wake.wait(), max(wait, 0.0))
                except TimeoutError:
                    pass
        finally:
            w = self._in_flight
            if w is not None and w.task is not None:
                w.task.cancel()
                await asyncio.gather(w.task, return_exceptions=True)

    def _start(self, w: WatchState, now: float) -> None:
        was_due, was_scene = w.next_due, w.scene_at
        w.scene_at = None
        if w.spec.every_s > 0:
            w.next_due = now + w.spec.every_s
        self._in_flight = w
        w.task = asyncio.create_task(self._check(w, was_due, was_scene))
        w.task.add_done_callback(lambda _t, w=w: self._done(w))

    def _done(self, w: WatchState) -> None:
        w.task = None
        if self._in_flight is w:
            self._in_flight = None
        self._wake.set()

    async def _check(self, w: WatchState, was_due: float, was_scene: float | None) -> None:
        spec = w.spec
        self.counters["watch_checks"] += 1
        try:
            answer = await self.ask(Question(spec.question + ASK_SUFFIX, llm_budget=spec.llm_budget or None,
                                             max_new_tokens=spec.max_new_tokens, origin=WATCH_ORIGIN))
        except RequestError as e:
            if e.code == "preempted":  # asked again in its old place
                self.counters["watch_preempted"] += 1
                w.next_due = min(w.next_due, was_due)
                if was_scene is not None:
                    w.scene_at = was_scene if w.scene_at is None else min(w.scene_at, was_scene)
                return
            self.counters["watch_errors"] += 1
            log.info("watch %r on %s: %s (%s)", spec.name, self.camera, e.message, e.code)
            return
        now = self.clock()
        change = w.answered(now)
        if change == "slowed":
            self.counters["watch_slowed"] += 1
            log.warning("watch %r on %s is slowed: answered every %.2f s, not every %.2f s (the LLM is busy or "
                        "the watches' share of it is spent)", spec.name, self.camera, w.effective_every_s, spec.every_s)
        elif change == "recovered":
            log.info("watch %r on %s keeps up again (every %.2f s)", spec.name, self.camera, w.effective_every_s)
        said = parse_yes_no(answer.text)
        matches = None if said is None else said == (spec.trigger == "yes")
        outcome = w.step(matches, now)
        self.counters[f"watch_{outcome}"] += 1
        w.last_answer, w.matches, w.last_checked = answer.text, matches, utc_now()
        await self.publish(WatchChecked(camera=self.camera, watch=spec.name, question=spec.question,
                                        answer=answer.text, matches=matches, outcome=outcome,
                                        t_start=answer.t_start, t_end=answer.t_end))
        if outcome == "fire":
            log.info("watch %r on %s fired: %s", spec.name, self.camera, answer.text)
            await self.publish(WatchFired(
                camera=self.camera, watch=spec.name, question=spec.question, answer=answer.text,
                trigger=spec.trigger, t_start=answer.t_start, t_end=answer.t_end, groups=answer.groups,
                model=answer.model, pruner=answer.pruner, id=uuid.uuid4().hex, snapshot=self.snapshot(),
            ))
