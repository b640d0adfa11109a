"""`[mqtt]` validation: each bad field named by its dotted path, and camera names usable as topics."""
from __future__ import annotations

import pytest

from stream.errors import ConfigError
from stream.mqtt_settings import MAX_TOPIC_BYTES, MqttSettings, check_service, check_settings
from stream.validation import build


@pytest.mark.parametrize("table, needle", [
    ({"port": 0}, "mqtt.port: 0 is out of range"),
    ({"hots": "x"}, "mqtt.hots: unknown field; accepted fields: enabled, host, port"),
    ({"keepalive": "soon"}, "mqtt.keepalive: expected an integer"),
    ({"prefix": "a/+/b"}, "mqtt.prefix: 'a/+/b' is not a topic prefix"),
    ({"prefix": "$SYS"}, "mqtt.prefix: must not start with '$'"),
    ({"discovery_prefix": "ha/#"}, "mqtt.discovery_prefix: 'ha/#' is not a topic prefix"),
    ({"discovery_prefix": ""}, "mqtt.discovery_prefix: '' is not a topic prefix"),
    ({"discovery_prefix": "homeassistant/"}, "mqtt.discovery_prefix: 'homeassistant/' is not a topic prefix"),
    ({"discovery_prefix": "$SYS"}, "mqtt.discovery_prefix: must not start with '$'"),
    ({"discovery_prefix": "h" * 65500}, "mqtt.discovery_prefix: must be valid Unicode text and leave room"),
    ({"tls": True, "ca_file": "/no/ca.pem"}, "mqtt.ca_file: no such file: /no/ca.pem"),
    ({"ca_file": "/etc/hostname"}, "mqtt.ca_file: set only with tls = true"),
    ({"reconnect_min_s": 5.0, "reconnect_max_s": 1.0}, "mqtt.reconnect_max_s: must be >= reconnect_min_s"),
    ({"password": "x"}, "mqtt.password: needs username"),
    ({"queue_size": 4}, "mqtt.queue_size: unknown field"),  # the camera door's now: [query]
])
def test_bad_mqtt_settings_name_the_field(table, needle):
    with pytest.raises(ConfigError) as e:
        check_service(build(MqttSettings, table, "mqtt"), {"name": "cam"})
    assert needle in str(e.value)


@pytest.mark.parametrize("name, needle", [
    ("a/b", "cameras[1].name: 'a/b' must not contain '/'"),
    ("", "cameras[1].name: '' must not be empty"),
    ("x" * MAX_TOPIC_BYTES, "is too long for an MQTT topic"),
    ("\ud800", "is not valid Unicode text"),
])
def test_camera_names_must_make_topics_when_mqtt_is_on(name, needle):
    cameras = {"cameras[0].name": "ok", "cameras[1].name": name}
    with pytest.raises(ConfigError) as e:
        check_service(MqttSettings(enabled=True), cameras)
    assert needle in str(e.value)
    check_service(MqttSettings(enabled=False), cameras)  # MQTT off: any name


@pytest.mark.parametrize("pattern", ["", "#", "+/reply", "$SYS/x", "a/#/b", "a/b#", "a/+b"])
def test_a_reply_to_filter_must_be_a_narrow_topic_filter(pattern):
    with pytest.raises(ConfigError, match=r"reply_to_allow\[0\]"):
        check_settings(MqttSettings(reply_to_allow=[pattern]))
