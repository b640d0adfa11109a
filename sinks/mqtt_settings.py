"""Settings of the MQTT service (`[mqtt]`) and of standing questions (`[[watches]]`).

Plain frozen dataclasses built by the torch-free validator in `stream/validation.py`: the config
loader validates them like every other table, and a watch added at runtime over MQTT goes
through the same `build`.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path

from stream.validation import bounded as _bounded
from stream.validation import choice as _choice

TRIGGERS = ("yes", "no")
MAX_WATCHES = 64  # per camera: a runtime `add` flood cannot grow the schedule without bound
MIN_EVERY_S = 0.1


@dataclass(frozen=True)
class MqttSettings:
    enabled: bool = False
    host: str = "localhost"
    port: int = _bounded(1883, 1, 65535)
    client_id: str = ""  # "" = streamprune-<host>-<pid>
    username: str = ""  # "" = anonymous
    password: str = ""
    tls: bool = False
    ca_file: str = ""  # with tls: CA bundle (PEM); "" = the system's
    cert_file: str = ""  # with tls: client certificate (PEM)
    key_file: str = ""  # with tls: its private key, if not inside cert_file
    keepalive: int = _bounded(30, 5, 65535)  # seconds
    prefix: str = "streamprune"
    max_payload_bytes: int = _bounded(65536, 256, 268_435_455)  # larger requests get `payload_too_large`
    max_question_chars: int = _bounded(500, 1, 100_000)
    queue_size: int = _bounded(4, 1, 10_000)  # waiting questions per camera; beyond it: `busy`
    outbox_size: int = _bounded(1000, 1, 1_000_000)  # messages kept while the broker is away
    dedup_window_s: float = _bounded(600.0, 0.0, 86_400.0)  # a repeated request id in it is answered once
    reconnect_min_s: float = _bounded(0.5, 0.01, 60.0)  # first retry delay; doubles per failure
    reconnect_max_s: float = _bounded(30.0, 0.1, 3600.0)  # cap of that delay


@dataclass(frozen=True)
class WatchSpec:
    """A standing question: asked on a schedule, it fires an event when its answer turns to `trigger`."""

    name: str = ""
    question: str = ""
    camera: str = ""  # "" = every camera the service serves
    every_s: float = _bounded(0.0, 0.0, 86_400.0)  # ask every N seconds; 0 = not on a timer
    on_scene_change: bool = False  # ask when the pruner reports a scene change
    trigger: str = _choice(*TRIGGERS, default="yes")  # the answer that fires the event
    cooldown_s: float = _bounded(60.0, 0.0, 7 * 86_400.0)  # no second event sooner than this
    max_new_tokens: int = _bounded(16, 1, 1024)
    llm_budget: int = _bounded(0, 0, 10_000_000)  # 0 = the camera's default


class SettingsError(ValueError):
    """A bad field, `path` being its dotted name (relative to the table)."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def topic_level_problem(value: str) -> str | None:
    """Why `value` cannot be one level of an MQTT topic name, or None."""
    if not value:
        return "must not be empty"
    if any(c in value for c in "/+#\0"):
        return "must not contain '/', '+', '#' or NUL (it is one MQTT topic level)"
    return None


def check_watch(spec: WatchSpec) -> WatchSpec:
    """Rules across a watch's fields (a schedule, a name, a question); raises SettingsError."""
    if not spec.name.strip():
        raise SettingsError("name", "must not be empty")
    if len(spec.name) > 100:
        raise SettingsError("name", "at most 100 characters")
    if not spec.question.strip():
        raise SettingsError("question", "must not be empty")
    if spec.every_s == 0 and not spec.on_scene_change:
        raise SettingsError("every_s", "the watch has no schedule: set every_s > 0 and/or on_scene_change = true")
    if 0 < spec.every_s < MIN_EVERY_S:
        raise SettingsError("every_s", f"{spec.every_s!r} is too often; 0 (off) or at least {MIN_EVERY_S}")
    return spec


def check_settings(s: MqttSettings) -> MqttSettings:
    """Rules across `[mqtt]` fields: a usable prefix, TLS files that exist; raises SettingsError."""
    if not s.prefix or s.prefix.startswith("/") or s.prefix.endswith("/") or any(c in s.prefix for c in "+#\0"):
        raise SettingsError("prefix", f"{s.prefix!r} is not a topic prefix "
                            "(non-empty, no '+' or '#', no leading or trailing '/')")
    if s.prefix.startswith("$"):
        raise SettingsError("prefix", "must not start with '$' (reserved for broker topics)")
    if s.reconnect_max_s < s.reconnect_min_s:
        raise SettingsError("reconnect_max_s", "must be >= reconnect_min_s")
    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(s, name)
        if path and not s.tls:
            raise SettingsError(name, "set only with tls = true")
        if path and not Path(path).expanduser().is_file():
            raise SettingsError(name, f"no such file: {path}")
    if s.key_file and not s.cert_file:
        raise SettingsError("key_file", "needs cert_file")
    if s.password and not s.username:
        raise SettingsError("password", "needs username")
    return s


def check_service(s: MqttSettings, watches: typing.Sequence[WatchSpec], cameras: typing.Sequence[str]) -> None:
    """Everything the config loader checks for `[mqtt]` and `[[watches]]`, as a SettingsError whose
    path is dotted from the top of the config ("mqtt.prefix", "watches[1].every_s", "name")."""
    try:
        check_settings(s)
    except SettingsError as e:
        raise SettingsError(f"mqtt.{e.path}", e.message) from None
    if watches and not s.enabled:
        raise SettingsError("watches", "standing questions run in the MQTT service: set mqtt.enabled = true")
    if s.enabled:
        for camera in cameras:
            if (problem := topic_level_problem(camera)) is not None:
                raise SettingsError("name", f"{camera!r} {problem}")
    names: dict[str, set[str]] = {c: set() for c in cameras}
    for i, w in enumerate(watches):
        try:
            check_watch(w)
        except SettingsError as e:
            raise SettingsError(f"watches[{i}].{e.path}", e.message) from None
        if w.camera and w.camera not in cameras:
            raise SettingsError(f"watches[{i}].camera", f"no camera named {w.camera!r}; cameras: {', '.join(cameras)}")
        for camera in [w.camera] if w.camera else cameras:
            if w.name in names[camera]:
                raise SettingsError(f"watches[{i}].name", f"{w.name!r} is used twice for camera {camera!r}")
            names[camera].add(w.name)
            if len(names[camera]) > MAX_WATCHES:
                raise SettingsError(f"watches[{i}]", f"more than {MAX_WATCHES} watches for camera {camera!r}")
