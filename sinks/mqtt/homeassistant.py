"""Home Assistant MQTT discovery (device-based, HA 2024.11+): topics and payloads only; the
service (service.py) publishes them.

Each camera is one device, announced by one retained config on
`<discovery_prefix>/device/<object_id>/config`, with the entities "Ask" (text: a question on
`<prefix>/<camera>/ask`), "Last answer" (sensor, its evidence as attributes), "Event snapshot"
(image) and "Memory tokens" (sensor, from the retained status), and per watch a binary sensor
(ON while its condition holds, from its last check) and an event entity (`fired`). Every entity
is available while `<prefix>/status` says `online`.

Names may hold any printable text ('/', '+', '#', spaces, accents), so no name ever goes into a
topic level or an id as it is: a slug carries a readable ASCII part and a short hash of the
exact name, so names that read alike (or differ only in punctuation) never collide. A removed
watch's components stay in the config reduced to their platform, which is how Home Assistant is
told to remove an entity; a device config this service published for a camera it no longer
serves is recognised by its origin and by its object id (a hash of the prefix and the camera).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache

from stream.events import WatchFired
from stream.mqtt_settings import camera_topic_problem
from stream.watches import MAX_WATCHES

from .protocol import ANSWER, ASK, OFFLINE, ONLINE, SNAPSHOT, STATUS, Topics, event_payload

ORIGIN = "streamprune"
SLUG_CHARS = 24  # the readable part of a slug
HASH_CHARS = 8
MAX_STATE_CHARS = 255  # Home Assistant's limit on a state (and on a text entity's length)
ON, OFF = "ON", "OFF"
STATE, EVENT = "state", "event"  # the levels under <prefix>/<camera>/watch/<slug>/
FIRED = "fired"  # the one event type of a watch's event entity
EVIDENCE = ("question", "t_start", "t_end", "groups", "tokens_used", "ttft_s", "timestamp")
PLATFORMS = frozenset({"binary_sensor", "event", "image", "sensor", "text"})
MAX_GONE = 2 * MAX_WATCHES  # removed components kept (reduced to their platform) per camera
_WATCH_STATE_ID = re.compile(rf"watch_([a-z0-9_]{{{HASH_CHARS},{SLUG_CHARS + 1 + HASH_CHARS}}})")


@cache
def version() -> str:
    try:
        return importlib.metadata.version("streamprune")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def _readable(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9]+", "_", folded).strip("_")[:SLUG_CHARS].rstrip("_")


def slug(*parts: str) -> str:
    """[a-z0-9_] only: each part's readable ASCII (for people) and a hash of the exact parts
    (so two different names never give one slug)."""
    exact = "\0".join(parts).encode("utf-8", "surrogatepass")  # no name can hold NUL
    digest = hashlib.sha256(exact).hexdigest()[:HASH_CHARS]
    return "_".join([r for r in map(_readable, parts) if r] + [digest])


def object_id(prefix: str, camera: str) -> str:
    """The device's object id, identifier and the stem of its entities' unique ids."""
    return slug(prefix, camera)


def config_topic(discovery_prefix: str, prefix: str, camera: str) -> str:
    return f"{discovery_prefix}/device/{object_id(prefix, camera)}/config"


def config_filter(discovery_prefix: str) -> str:
    """Every device config under the discovery prefix (to find ours left for gone cameras)."""
    return f"{discovery_prefix}/device/+/config"


def watch_leaf(watch: str, level: str) -> str:
    """`watch/<slug>/state` or `watch/<slug>/event`, under `<prefix>/<camera>/`."""
    return f"watch/{slug(watch)}/{level}"


def watch_state_topic(topics: Topics, camera: str, watch: str) -> str:
    """Retained "ON"/"OFF": whether the watch's last check matched."""
    return topics.camera(camera, watch_leaf(watch, STATE))


def watch_event_topic(topics: Topics, camera: str, watch: str) -> str:
    """{"event_type": "fired", ...} each time the watch fires."""
    return topics.camera(camera, watch_leaf(watch, EVENT))


def _attributes_template() -> str:
    pairs = ", ".join(f"'{k}': value_json.{k}" for k in EVIDENCE)
    return "{{ {" + pairs + "} | tojson }}"


def camera_components(topics: Topics, camera: str, max_question_chars: int) -> dict[str, dict]:
    answer = topics.camera(camera, ANSWER)
    return {
        "ask": {"platform": "text", "name": "Ask", "command_topic": topics.camera(camera, ASK), "retain": False,
                "min": 1, "max": min(max_question_chars, MAX_STATE_CHARS), "icon": "mdi:comment-question-outline"},
        "answer": {"platform": "sensor", "name": "Last answer", "state_topic": answer,
                   "value_template": f"{{{{ value_json.answer[:{MAX_STATE_CHARS}] }}}}",
                   "json_attributes_topic": answer, "json_attributes_template": _attributes_template(),
                   "icon": "mdi:comment-text-outline"},
        "snapshot": {"platform": "image", "name": "Event snapshot", "image_topic": topics.camera(camera, SNAPSHOT),
                     "content_type": "image/jpeg"},
        "memory": {"platform": "sensor", "name": "Memory tokens", "state_topic": topics.camera(camera, STATUS),
                   "value_template": "{{ value_json.memory_tokens }}", "unit_of_measurement": "tokens",
                   "state_class": "measurement", "entity_category": "diagnostic"},
    }


def watch_components(topics: Topics, camera: str, watch: str) -> dict[str, dict]:
    key = f"watch_{slug(watch)}"
    return {
        key: {"platform": "binary_sensor", "name": watch, "state_topic": watch_state_topic(topics, camera, watch),
              "payload_on": ON, "payload_off": OFF},
        f"{key}_{FIRED}": {"platform": "event", "name": f"{watch} event",
                           "state_topic": watch_event_topic(topics, camera, watch), "event_types": [FIRED]},
    }


def fired_payload(fired: WatchFired, snapshot_topic: str | None) -> dict:
    """What a watch's event entity gets: `event_type` "fired"; the rest become its attributes."""
    evidence = {k: v for k, v in event_payload(fired, snapshot_topic).items() if k != "type"}
    return {"event_type": FIRED, **evidence}


def state_payload(matches: bool) -> bytes:
    return (ON if matches else OFF).encode()


@dataclass
class Device:
    """What the service announces of one camera: its watches, its model, and the components
    of removed watches (id -> platform), which the config keeps reduced to their platform so
    Home Assistant removes their entities."""

    topics: Topics
    camera: str
    max_question_chars: int
    model: str
    watches: tuple[str, ...] = ()
    gone: dict[str, str] = field(default_factory=dict)

    def components(self) -> dict[str, dict]:
        out = camera_components(self.topics, self.camera, self.max_question_chars)
        for watch in self.watches:
            out.update(watch_components(self.topics, self.camera, watch))
        return out

    def set_watches(self, names: Iterable[str]) -> list[str]:
        """Take the camera's watches now; returns the names removed since the last call."""
        names = tuple(names)
        removed = [w for w in self.watches if w not in names]
        self.watches = names
        live = self.components()
        self.forget({cid: c["platform"] for w in removed
                     for cid, c in watch_components(self.topics, self.camera, w).items()})
        for cid in live:
            self.gone.pop(cid, None)
        return removed

    def forget(self, components: dict[str, str]) -> bool:
        """Mark components gone (kept: the newest MAX_GONE); whether anything changed."""
        new = {cid: p for cid, p in components.items() if self.gone.get(cid) != p}
        self.gone.update(new)
        while len(self.gone) > MAX_GONE:
            del self.gone[next(iter(self.gone))]
        return bool(new)

    def config(self) -> dict:
        oid = object_id(self.topics.prefix, self.camera)
        components = self.components()
        for cid, c in components.items():
            c["unique_id"] = f"{oid}_{cid}"
        for cid, platform in self.gone.items():
            components.setdefault(cid, {"platform": platform})
        return {
            "device": {"identifiers": [oid], "name": self.camera, "manufacturer": ORIGIN, "model": self.model,
                       "sw_version": version()},
            "origin": {"name": ORIGIN, "sw_version": version()},
            "components": components,
            "availability_topic": self.topics.status, "payload_available": ONLINE, "payload_not_available": OFFLINE,
            "qos": 1,
        }


def read_config(topic: str, payload: bytes, discovery_prefix: str, topics: Topics) -> tuple[str, dict[str, str]] | None:
    """(camera, live components as id -> platform) of a device config this service published
    for `topics.prefix`; None for anything else (other integrations' configs, garbage)."""
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict):
        return None
    origin, device, components = body.get("origin"), body.get("device"), body.get("components")
    if not (isinstance(origin, dict) and origin.get("name") == ORIGIN and isinstance(device, dict)
            and isinstance(components, dict)):
        return None
    camera = device.get("name")
    if (not isinstance(camera, str) or camera_topic_problem(topics.prefix, camera) is not None
            or config_topic(discovery_prefix, topics.prefix, camera) != topic):
        return None
    return camera, {cid: c["platform"] for cid, c in components.items()
                    if isinstance(c, dict) and len(c) > 1 and c.get("platform") in PLATFORMS}


def component_state_topic(topics: Topics, camera: str, component_id: str, platform: str) -> str | None:
    """The retained state topic of a watch's binary sensor, from its component id; None for
    every other component."""
    m = _WATCH_STATE_ID.fullmatch(component_id)
    if platform != "binary_sensor" or m is None:
        return None
    return topics.camera(camera, f"watch/{m.group(1)}/{STATE}")
