"""Settings of the MQTT front door (`[mqtt]`): a plain frozen dataclass for the torch-free
validator (stream/validation.py), and the rules across its fields, as `ConfigError`s.

Limits on questions (length, queue, de-duplication) are the camera door's (`[query]`), whichever
front door a question comes through; these settings are only about the broker and the topics.
"""
from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .validation import bounded

MAX_TOPIC_BYTES = 65535  # MQTT's limit: a topic is a UTF-8 string with a 16-bit length
LEAF_ROOM = 48  # bytes kept under `<prefix>/<camera>/` for the service's own levels ("watch/<slug>/state")
DISCOVERY_ROOM = 80  # bytes kept under `discovery_prefix` for "/device/<object id>/config"


@dataclass(frozen=True)
class MqttSettings:
    enabled: bool = False
    host: str = "localhost"
    port: int = bounded(1883, 1, 65535)
    client_id: str = ""  # "" = streamprune-<host>-<prefix>: stable, so the broker keeps our session
    username: str = ""  # "" = anonymous
    password: str = ""
    tls: bool = False
    ca_file: str = ""  # with tls: CA bundle (PEM); "" = the system's
    cert_file: str = ""  # with tls: client certificate (PEM)
    key_file: str = ""  # with tls: its private key, if not inside cert_file
    keepalive: int = bounded(30, 5, 65535)  # seconds
    prefix: str = "streamprune"
    max_payload_bytes: int = bounded(65536, 256, 268_435_455)  # larger requests get `payload_too_large`
    outbox_size: int = bounded(1000, 1, 1_000_000)  # messages kept while the broker is away
    reconnect_min_s: float = bounded(0.5, 0.01, 60.0)  # first retry delay; doubles per failure
    reconnect_max_s: float = bounded(30.0, 0.1, 3600.0)  # cap of that delay
    session_expiry_s: int = bounded(3600, 0, 7 * 86_400)  # broker keeps our requests this long while we are away; 0 = off
    reply_to_allow: list[str] = field(default_factory=list)  # topic filters a reply_to must match; [] = <prefix>/reply/#
    max_in_flight: int = bounded(16, 1, 1000)  # QoS 1 messages awaiting acknowledgement at once
    error_rate_per_s: float = bounded(10.0, 0.1, 10_000.0)  # error replies per destination topic, after the burst
    error_burst: int = bounded(50, 1, 100_000)  # error replies per destination topic at once
    homeassistant: bool = False  # announce each camera and watch to Home Assistant (MQTT discovery)
    discovery_prefix: str = "homeassistant"  # Home Assistant's discovery prefix


def _utf8_bytes(value: str) -> int | None:
    try:
        return len(value.encode())
    except UnicodeEncodeError:
        return None


def topic_level_problem(value: str) -> str | None:
    """Why `value` cannot be one level of an MQTT topic name, or None."""
    if not value:
        return "must not be empty"
    if any(c in value for c in "/+#\0"):
        return "must not contain '/', '+', '#' or NUL (it is one MQTT topic level)"
    if _utf8_bytes(value) is None:
        return "is not valid Unicode text"
    return None


def camera_topic_problem(prefix: str, camera: str) -> str | None:
    """Why `camera` cannot name a camera's topics under `prefix`, or None."""
    if (problem := topic_level_problem(camera)) is not None:
        return problem
    size = _utf8_bytes(f"{prefix}/{camera}/")
    if size is None or size + LEAF_ROOM > MAX_TOPIC_BYTES:
        return f"is too long for an MQTT topic (with the prefix, at most {MAX_TOPIC_BYTES - LEAF_ROOM - 2} bytes)"
    return None


def topic_filter_problem(pattern: str) -> str | None:
    """Why `pattern` cannot be a `reply_to_allow` filter, or None."""
    if not pattern or pattern.startswith("$") or "\0" in pattern or _utf8_bytes(pattern) is None:
        return "is not a topic filter (non-empty text, not starting with '$')"
    levels = pattern.split("/")
    if any(("+" in v and v != "+") or ("#" in v and v != "#") for v in levels) or "#" in levels[:-1]:
        return "is not a topic filter ('+' and '#' stand alone in a level, '#' only last)"
    if levels[0] in ("+", "#"):
        return "must start with a fixed level (a reply topic never matches every topic)"
    return None


def _prefix_problem(prefix: str, room: int) -> str | None:
    """Why `prefix` cannot be the first levels of topics that need `room` more bytes, or None."""
    if not prefix or prefix.startswith("/") or prefix.endswith("/") or any(c in prefix for c in "+#\0"):
        return f"{prefix!r} is not a topic prefix (non-empty, no '+' or '#', no leading or trailing '/')"
    if prefix.startswith("$"):
        return "must not start with '$' (reserved for broker topics)"
    size = _utf8_bytes(prefix)
    if size is None or size + room > MAX_TOPIC_BYTES:
        return "must be valid Unicode text and leave room for the topics under it"
    return None


def _check_ca_file(path: str) -> None:
    """Load the CA bundle as the TLS connection will: a bad one is a config error now, not a
    handshake that fails on every reconnect attempt."""
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(Path(path).expanduser()))
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"{path} is not a usable CA bundle (PEM certificates): {e}", "ca_file") from None


def check_settings(s: MqttSettings) -> MqttSettings:
    """Rules across `[mqtt]` fields (usable prefixes, TLS files that exist); raises ConfigError
    with the field's name as its path."""
    for name, room in (("prefix", LEAF_ROOM + 2), ("discovery_prefix", DISCOVERY_ROOM)):
        if (problem := _prefix_problem(getattr(s, name), room)) is not None:
            raise ConfigError(problem, name)
    for i, pattern in enumerate(s.reply_to_allow):
        if (problem := topic_filter_problem(pattern)) is not None:
            raise ConfigError(f"{pattern!r} {problem}", f"reply_to_allow[{i}]")
    if s.reconnect_max_s < s.reconnect_min_s:
        raise ConfigError("must be >= reconnect_min_s", "reconnect_max_s")
    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(s, name)
        if path and not s.tls:
            raise ConfigError("set only with tls = true", name)
        if path and not Path(path).expanduser().is_file():
            raise ConfigError(f"no such file: {path}", name)
    if s.ca_file:
        _check_ca_file(s.ca_file)
    if s.key_file and not s.cert_file:
        raise ConfigError("needs cert_file", "key_file")
    if s.password and not s.username:
        raise ConfigError("needs username", "password")
    return s


def check_service(s: MqttSettings, cameras: Mapping[str, str]) -> None:
    """`[mqtt]` and the camera names it serves, as a ConfigError dotted from the top of the config
    ("mqtt.prefix", "cameras[1].name"); `cameras` maps each name's dotted path to the name."""
    try:
        check_settings(s)
    except ConfigError as e:
        raise e.under("mqtt") from None
    if s.enabled:
        for path, camera in cameras.items():
            if (problem := camera_topic_problem(s.prefix, camera)) is not None:
                raise ConfigError(f"{camera!r} {problem}", path)
