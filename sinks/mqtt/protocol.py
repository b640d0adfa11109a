"""The MQTT wire format in one place: topic names, and payloads to and from the vocabulary
(stream/events.py).

Payloads are the vocabulary's fields under their own names, with one exception kept from the
first version of the service: an answer's text is "answer". Requests are decoded here into a
`Question` (or a watch change); whatever is wrong with one is a `ProtocolError` carrying the
request's id and reply topic as far as they could be read, so the refusal can be addressed.
Every payload is encoded as UTF-8 JSON; text that UTF-8 cannot carry (a lone surrogate from a
"\\ud800" escape) is refused on the way in and escaped on the way out, never a crash. Numbers are
bounded before anything converts them (a 5000-digit integer is refused, not a crash), NaN and
Infinity are not JSON, and an error message quotes a request only as a short, printable excerpt.
A `reply_to` must match one of the configured filters (`Topics.reply_allow`): a client can make
the service publish only where the operator allowed it.
"""
from __future__ import annotations

import json
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from stream.door import MAX_ID_CHARS, MAX_LLM_BUDGET
from stream.errors import ConfigError, RequestError
from stream.events import Answer, Question, RequestFailed, Status, WatchFired, utc_now
from stream.mqtt_settings import MAX_TOPIC_BYTES
from stream.validation import build
from stream.watches import WatchSpec

MAX_PAYLOAD_BYTES = 268_435_455  # MQTT's limit on one message
INT_RANGE = (-(2**63), 2**63 - 1)  # an integer request id; a string id has at most MAX_ID_CHARS characters
EXCERPT_CHARS = 40
MAX_MESSAGE_CHARS = 300

# the levels under <prefix>/<camera>/
ASK = "ask"
ANSWER = "answer"
ERROR = "error"
EVENT = "event"
SNAPSHOT = "snapshot"
WATCH_SET = "watch/set"
WATCHES = "watches"
STATUS = "status"
REQUESTS = (ASK, WATCH_SET)
CAMERA_LEAVES = (ASK, ANSWER, ERROR, EVENT, SNAPSHOT, WATCH_SET, WATCHES, STATUS)  # each fits in LEAF_ROOM

ONLINE, OFFLINE = "online", "offline"  # <prefix>/status
WATCH_OPS = ("add", "remove", "list")
ORIGIN = "mqtt"  # Question.origin of what comes in here

ANSWER_RENAMED = {"text": "answer"}  # Answer field -> payload key, where they differ
_ANSWER_FIELDS = {ANSWER_RENAMED.get(f.name, f.name): f.name for f in fields(Answer)}
_REQUEST_KEYS = ("id", "reply_to")  # what every request may carry besides its own fields


class ProtocolError(RequestError):
    """A request refused before it reached a camera; `id` and `reply_to` as far as they were read."""

    def __init__(self, code: str, message: str, id: str | int | None = None, reply_to: str | None = None):
        super().__init__(code, message)
        self.id = id
        self.reply_to = reply_to


def excerpt(value: Any) -> str:
    """A short, printable quote of request content for an error message."""
    r = reprlib.Repr()
    r.maxstring = r.maxother = r.maxlong = EXCERPT_CHARS
    r.maxlist = r.maxdict = 3
    return "".join(c if c.isprintable() else "?" for c in r.repr(value))


def filter_matches(pattern: str, topic: str) -> bool:
    """Whether MQTT topic filter `pattern` ('+' one level, a final '#' any rest) matches `topic`."""
    want, have = pattern.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)


def default_reply_allow(prefix: str) -> tuple[str, ...]:
    return (f"{prefix}/reply/#",)


@dataclass(frozen=True)
class Topics:
    """The topic names under `prefix`; `reply_allow` the filters a `reply_to` must match."""

    prefix: str
    reply_allow: tuple[str, ...] = ()  # () = default_reply_allow(prefix)

    @property
    def reply_filters(self) -> tuple[str, ...]:
        return self.reply_allow or default_reply_allow(self.prefix)

    def reply_allowed(self, topic: str) -> bool:
        return self.request(topic) is None and any(filter_matches(f, topic) for f in self.reply_filters)

    @property
    def status(self) -> str:
        """Retained `online`/`offline` of the whole service (also its will)."""
        return f"{self.prefix}/{STATUS}"

    @property
    def error(self) -> str:
        """Errors of requests to a camera this service does not serve."""
        return f"{self.prefix}/{ERROR}"

    def camera(self, camera: str, leaf: str) -> str:
        return f"{self.prefix}/{camera}/{leaf}"

    def requests(self) -> list[str]:
        """The subscription filters of the requests."""
        return [f"{self.prefix}/+/{leaf}" for leaf in REQUESTS]

    def request(self, topic: str) -> tuple[str, str] | None:
        """(camera, leaf) of a request topic, or None when `topic` is not one."""
        if not topic.startswith(self.prefix + "/"):
            return None
        camera, _, leaf = topic[len(self.prefix) + 1:].partition("/")
        return (camera, leaf) if "/" not in camera and leaf in REQUESTS else None


def topic_problem(topic: Any) -> str | None:
    """Why `topic` cannot be published to, or None."""
    if not isinstance(topic, str) or not topic:
        return "must be a non-empty string"
    if topic.startswith("$") or any(c in topic for c in "+#\0"):
        return "must not start with '$' or contain '+', '#' or NUL"
    try:
        size = len(topic.encode())
    except UnicodeEncodeError:
        return "is not valid Unicode text"
    if size > MAX_TOPIC_BYTES:
        return f"has {size} bytes; the limit is {MAX_TOPIC_BYTES}"
    return None


def encode(value: Any) -> bytes:
    """JSON as UTF-8; text UTF-8 cannot carry (lone surrogates) goes out as \\u escapes."""
    try:
        return json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(value).encode()


# -- requests --

def decode(payload: bytes, max_bytes: int, not_object: str = "bad_request") -> dict | str:
    """A JSON object, or the stripped text when the payload does not start with '{' or '['; JSON
    that is not an object is refused with code `not_object`."""
    if len(payload) > max_bytes:
        raise ProtocolError("payload_too_large", f"the payload has {len(payload)} bytes; the limit is {max_bytes}")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ProtocolError("bad_encoding", "the payload is not UTF-8 text") from None
    if not text.startswith(("{", "[")):
        return text
    try:
        body = json.loads(text, parse_constant=_not_json)
    except (ValueError, RecursionError) as e:  # ValueError: also an integer of more than 4300 digits
        raise ProtocolError("bad_json", f"the payload is not valid JSON: {str(e)[:120]}") from None
    if not isinstance(body, dict):
        raise ProtocolError(not_object, "expected a JSON object" + (" (or the question as plain text)"
                                                                     if not_object == "bad_request" else ""))
    return body


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


def _encodable(value: Any) -> bool:
    """False when a string anywhere in `value` is not encodable as UTF-8."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode()
            except UnicodeEncodeError:
                return False
        elif isinstance(v, dict):
            stack.extend(v)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return True


def _id_and_reply_to(body: dict, topics: Topics, code: str) -> tuple[str | int | None, str | None]:
    """The request's id and reply topic, checked; then every other string in it (refused with
    `code`: the request kind's own code)."""
    rid = body.get("id")
    if rid is not None and not _good_id(rid):
        raise ProtocolError("bad_request", f"id must be a string of at most {MAX_ID_CHARS} characters (valid "
                            f"Unicode text) or an integer in {INT_RANGE[0]}..{INT_RANGE[1]}")
    reply_to = body.get("reply_to")
    if reply_to is not None:
        if (problem := topic_problem(reply_to)) is not None:
            raise ProtocolError("bad_request", f"reply_to must be a topic name: it {problem}", rid)
        if not topics.reply_allowed(reply_to):
            raise ProtocolError("reply_to_not_allowed", "reply_to must match one of "
                                f"{', '.join(topics.reply_filters)} (mqtt.reply_to_allow)", rid)
    if not _encodable(body):
        raise ProtocolError(code, "the payload has text that is not valid Unicode (a lone surrogate)", rid, reply_to)
    return rid, reply_to


def _good_id(rid: Any) -> bool:
    if isinstance(rid, str):
        return len(rid) <= MAX_ID_CHARS and _encodable(rid)
    return isinstance(rid, int) and not isinstance(rid, bool) and INT_RANGE[0] <= rid <= INT_RANGE[1]


def request_id(payload: bytes, max_bytes: int) -> str | int | None:
    """The id of a request, when it has a readable, valid one (for refusing it as a whole)."""
    try:
        body = decode(payload, max_bytes)
    except ProtocolError:
        return None
    rid = body.get("id") if isinstance(body, dict) else None
    return rid if rid is not None and _good_id(rid) else None


@dataclass(frozen=True)
class Ask:
    question: Question
    reply_to: str | None = None


def parse_ask(payload: bytes, max_bytes: int, topics: Topics) -> Ask:
    """The question of an `ask` payload (JSON, or plain text), or the ProtocolError it deserves.
    Limits on the question itself are the camera door's."""
    body = decode(payload, max_bytes)
    if isinstance(body, str):
        body = {"question": body}
    rid, reply_to = _id_and_reply_to(body, topics, "bad_request")
    text = body.get("question")
    if text is not None and not isinstance(text, str):
        raise ProtocolError("bad_request", f"question must be a string, got {excerpt(text)}", rid, reply_to)
    for key, hi in (("llm_budget", MAX_LLM_BUDGET), ("max_new_tokens", MAX_LLM_BUDGET)):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError("bad_request", f"{key} must be an integer, got {excerpt(value)}", rid, reply_to)
        if not 1 <= value <= hi:  # compared, never converted: a 4000-digit integer is just too large
            raise ProtocolError(f"bad_{key}", f"{key} must be in 1..{hi}", rid, reply_to)
    return Ask(Question(text or "", rid, body.get("llm_budget"), body.get("max_new_tokens"), ORIGIN), reply_to)


@dataclass(frozen=True)
class WatchChange:
    """A `watch/set` request: `op` is add, remove or list; `fields` the rest of the payload."""

    op: str
    fields: dict
    id: str | int | None = None
    reply_to: str | None = None

    def spec(self, camera: str) -> WatchSpec:
        """The watch an `add` describes, for `camera`; fields are checked by the watch itself."""
        if self.fields.get("camera", camera) != camera:
            raise ProtocolError("bad_watch", f"camera: this is the topic of camera {camera!r}", self.id, self.reply_to)
        try:
            return build(WatchSpec, {**self.fields, "camera": camera})
        except ConfigError as e:
            raise ProtocolError("bad_watch", str(e), self.id, self.reply_to) from None

    @property
    def name(self) -> Any:
        return self.fields.get("name")


def parse_watch_change(payload: bytes, max_bytes: int, topics: Topics) -> WatchChange:
    """{"op": "add", "name", "question", ...} | {"op": "remove", "name"} | {"op": "list"}."""
    body = decode(payload, max_bytes, not_object="bad_watch")
    if not isinstance(body, dict):
        raise ProtocolError("bad_watch", 'expected a JSON object {"op": "add" | "remove" | "list", ...}')
    rid, reply_to = _id_and_reply_to(body, topics, "bad_watch")
    op = body.get("op")
    if op not in WATCH_OPS:
        raise ProtocolError("bad_watch", f"op must be \"add\", \"remove\" or \"list\", got {excerpt(op)}",
                            rid, reply_to)
    rest = {k: v for k, v in body.items() if k != "op" and k not in _REQUEST_KEYS}
    return WatchChange(op, rest, rid, reply_to)


# -- payloads from the vocabulary --

def _fields(event: Any) -> dict:
    out = event.to_dict()
    del out["type"]
    return out


def answer_payload(answer: Answer) -> dict:
    """What `<camera>/answer` (and `reply_to`) carries: the Answer's fields, its text as "answer"."""
    return {ANSWER_RENAMED.get(k, k): v for k, v in _fields(answer).items()}


def answer_from_payload(payload: Mapping[str, Any]) -> Answer:
    """The Answer an answer payload was made from (the inverse of `answer_payload`)."""
    return Answer(**{_ANSWER_FIELDS[k]: v for k, v in payload.items() if k in _ANSWER_FIELDS})


def refusal(camera: str, error: RequestError, id: str | int | None = None, question: str = "") -> RequestFailed:
    """The RequestFailed for a request this front door refused itself (its message cut short:
    it may quote the request)."""
    message = error.message if len(error.message) <= MAX_MESSAGE_CHARS else error.message[:MAX_MESSAGE_CHARS] + "…"
    return RequestFailed(camera, error.code, message, id, question, ORIGIN)


def error_payload(failed: RequestFailed) -> dict:
    """What `<camera>/error`, `<prefix>/error` and `reply_to` carry for a request not answered."""
    return _fields(failed)


def event_payload(fired: WatchFired, snapshot_topic: str | None) -> dict:
    """What `<camera>/event` carries: the event without its JPEG, naming the topic that holds it."""
    return {**fired.to_dict(), "snapshot": snapshot_topic}


def status_payload(status: Status, counters: Mapping[str, int]) -> dict:
    """What the retained `<camera>/status` carries: the camera's Status and the service's counters."""
    return {**_fields(status), "mqtt": dict(sorted(counters.items()))}


def watches_payload(camera: str, watches: list[dict]) -> dict:
    """The retained `<camera>/watches` listing (spec fields and `active` per watch)."""
    return {"camera": camera, "watches": watches, "timestamp": utc_now()}


def with_id(payload: dict, id: str | int | None) -> dict:
    """A payload's copy for `reply_to`, carrying the request's id."""
    return {**payload, "id": id}
