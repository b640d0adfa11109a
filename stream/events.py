"""The vocabulary: plain, torch-free data for everything that goes into or leaves a camera.

Every output (console, JSONL, MQTT, HTTP) carries these same shapes; a wire format only renames
fields in one place. `to_dict()` gives the JSON-ready form with a `type` naming the event; binary
or bulky fields (a JPEG snapshot, a thumbnail) are left out of it.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar


def utc_now() -> str:
    """An ISO-8601 UTC timestamp with milliseconds, as every event carries."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


class Event:
    """Base of the typed events on a camera's bus."""

    type: ClassVar[str] = "event"
    binary: ClassVar[tuple[str, ...]] = ()  # fields left out of to_dict()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        for f in fields(self):  # type: ignore[arg-type]
            if f.name not in self.binary:
                value = getattr(self, f.name)
                out[f.name] = dict(value) if isinstance(value, dict) else value
        return out


@dataclass(frozen=True)
class Question:
    """A question to one camera. `origin` says which door it came through (cli, mqtt, script, watch, ...)."""

    text: str
    id: str | int | None = None
    llm_budget: int | None = None  # visual tokens the LLM may see; None = the camera's setting
    max_new_tokens: int | None = None
    origin: str = "cli"


@dataclass(frozen=True)
class Answer(Event):
    """An answer and its evidence: the span of video the LLM saw and what it cost.

    `tokens_used` counts the visual tokens the LLM saw, from `groups` groups whose pts run from
    `t_start` to `t_end` (seconds since stream start); `memory_tokens` what the memory held.
    `prompt_tokens` is the prompt's length and `prefilled_tokens` the part of it prefilled for this
    question; `prompt_path` says how: "cached" (on the camera's prompt cache: the question and at
    most the newest groups) or "full" (the whole prompt: the cache is off, or a question budget
    picked a question-dependent subset). `layer_visual_tokens` is what the LLM's deepest layers
    attended to when `query.layer_pruning` dropped visual tokens inside it (the full path only;
    `tokens_used` entered its first layer), 0 when it did not. `ttft_s` runs from when the LLM
    took the question to the first new token.
    """

    type: ClassVar[str] = "answer"

    text: str
    question: str
    t_start: float
    t_end: float
    groups: int
    tokens_used: int
    memory_tokens: int
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    total_s: float
    prefilled_tokens: int = 0
    prompt_path: str = "full"
    layer_visual_tokens: int = 0
    camera: str = ""
    id: str | int | None = None
    model: str = ""
    pruner: str = ""
    origin: str = "cli"
    timestamp: str = field(default_factory=utc_now)


@dataclass(frozen=True)
class RequestFailed(Event):
    """A question or request that was not answered, with the error's stable code."""

    type: ClassVar[str] = "error"

    camera: str
    code: str
    message: str
    id: str | int | None = None
    question: str = ""
    origin: str = "cli"
    timestamp: str = field(default_factory=utc_now)


@dataclass(frozen=True)
class SourceState(Event):
    """A source moved from state `old` to `new` (connecting, streaming, reconnecting, stopped, failed)."""

    type: ClassVar[str] = "source_state"

    camera: str
    old: str
    new: str
    health: dict = field(default_factory=dict)
    timestamp: str = field(default_factory=utc_now)


@dataclass(frozen=True)
class SceneChange(Event):
    """A group whose mean token is far from the previous group's: the scene changed."""

    type: ClassVar[str] = "scene_change"

    camera: str
    group: int
    pts: float
    timestamp: str = field(default_factory=utc_now)


@dataclass(frozen=True)
class WatchFired(Event):
    """A standing question's answer turned to its trigger; `snapshot` is the newest frame (JPEG)."""

    type: ClassVar[str] = "event"
    binary: ClassVar[tuple[str, ...]] = ("snapshot",)

    camera: str
    watch: str
    question: str
    answer: str
    trigger: str
    t_start: float
    t_end: float
    groups: int
    model: str
    pruner: str
    id: str
    snapshot: bytes | None = field(default=None, repr=False)
    timestamp: str = field(default_factory=utc_now)


@dataclass(frozen=True)
class WatchesChanged(Event):
    """A camera's watches were added, replaced or removed (through any door); `watches` is the
    listing now (`Watches.describe()`), so a front door can announce or withdraw them."""

    type: ClassVar[str] = "watches"

    camera: str
    watches: list = field(default_factory=list)
    timestamp: str = field(default_factory=utc_now)


@dataclass(frozen=True)
class WatchChecked(Event):
    """A watch's check was answered: `matches` is whether its condition holds now (the answer
    read as its trigger; None when the answer was neither yes nor no), `outcome` what the watch
    did with it (fire, duplicate, cooldown, clear, unclear). Home automation shows it as the
    watch's on/off state; the web page as its last result."""

    type: ClassVar[str] = "watch_check"

    camera: str
    watch: str
    question: str
    answer: str
    matches: bool | None
    outcome: str
    t_start: float
    t_end: float
    timestamp: str = field(default_factory=utc_now)


@dataclass(frozen=True)
class GroupAdded(Event):
    """A group entered the memory; `thumbnail` (H x W x 3 uint8 RGB) is its first frame, small."""

    type: ClassVar[str] = "group"
    binary: ClassVar[tuple[str, ...]] = ("thumbnail",)

    camera: str
    group: int
    pts: float
    memory_tokens: int
    thumbnail: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class Status(Event):
    """A camera's live counters. `source` is the source's health now (state, frames,
    last_frame_age_s, reconnects, ...), never a copy kept from its last state change. `tasks`
    is how its supervised tasks fare (stream/supervisor.py): {name: {"state": running |
    restarting | failed | done | stopped, "restarts", "failures", "last_error"}}, so a reader
    of the retained status sees a task that failed and why."""

    type: ClassVar[str] = "status"

    camera: str
    stream_s: float
    fps_in: float
    fps_out: float
    frames_in: int
    frames_out: int
    dropped: int
    groups_encoded: int
    memory_tokens: int
    tokens_seen: int
    encode_ms: float
    prune_ms: float
    backlog: int
    queued: int
    answers: int
    errors: dict = field(default_factory=dict)  # request errors by code
    watches: int = 0
    watch_counters: dict = field(default_factory=dict)  # watch_checks, watch_fire, watch_cooldown, ...
    last_answer_s: float | None = None
    source: dict = field(default_factory=dict)
    tasks: dict = field(default_factory=dict)
    prompt_cache: dict = field(default_factory=dict)  # tokens, bytes, kv_bytes_per_token, appended/reprefilled tokens, ...
    ingest_latency_ms: float = 0.0  # from a group's last frame to the group in memory, last group
    tower: dict = field(default_factory=dict)  # its share of the model's vision tower: groups_encoded, groups_dropped (late), wait_ms, max_wait_ms, batch_groups
    timestamp: str = field(default_factory=utc_now)
