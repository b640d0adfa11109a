"""Home Assistant MQTT discovery against a real mosquitto: each camera a device with its entities,
each watch a binary sensor and an event entity, entities removed when their watch or camera goes,
and nothing under the discovery prefix with `homeassistant = false`.

The cameras are `ScriptedCamera`s (tests/scripted_camera.py); each test has its own MQTT prefix
and discovery prefix, so retained configs never leak between tests.
"""
from __future__ import annotations

import asyncio
import json
import re

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mqtt_broker import Listener, retained, unique_prefix
from scripted_camera import ScriptedCamera, running
from test_mqtt import serving
from sinks.mqtt import MqttService
from sinks.mqtt import homeassistant as ha
from sinks.mqtt.protocol import Topics
from stream.door import DoorSettings
from stream.mqtt_settings import DISCOVERY_ROOM, LEAF_ROOM, MqttSettings
from stream.watches import MAX_NAME_CHARS, WatchSpec

ID = re.compile(r"[a-zA-Z0-9_-]+")


def settings(broker, prefix: str, discovery: str, **over) -> MqttSettings:
    return MqttSettings(**{"enabled": True, "host": broker.host, "port": broker.port, "prefix": prefix,
                           "homeassistant": True, "discovery_prefix": discovery, "reconnect_min_s": 0.1,
                           "reconnect_max_s": 0.5, **over})


def render(template: str, payload: dict) -> str:
    """A template as Home Assistant renders it (a sandboxed Jinja environment, `value_json`)."""
    return ImmutableSandboxedEnvironment().from_string(template).render(value_json=payload)


def configs(L: Listener, topic: str) -> list[dict]:
    """The device configs seen on `topic` (an empty one, the device removed, as {})."""
    return [m.json() if m.payload else {} for m in L.on(topic)]


def test_slugs_and_ids_are_safe_stable_and_never_collide():
    names = ["door open", "door-open", "door_open", "Door Open", "door open!", "door/open", "door#open", "door+open",
             "café", "cafe", "门", "门口", " ", "x" * MAX_NAME_CHARS, "x" * (MAX_NAME_CHARS - 1) + "y"]
    slugs = [ha.slug(n) for n in names]
    assert len(set(slugs)) == len(names)  # punctuation, case and truncation never make two names one
    assert all(re.fullmatch(r"[a-z0-9_]+", s) for s in slugs)
    assert slugs[0].startswith("door_open_") and slugs[8].startswith("cafe_")
    assert re.fullmatch(r"[0-9a-f]{8}", slugs[10]) and re.fullmatch(r"[0-9a-f]{8}", slugs[12])  # nothing readable
    assert ha.slug("door open") == "door_open_" + slugs[0][-ha.HASH_CHARS:]  # stable: the same name, the same slug
    assert max(len(ha.watch_leaf(n, level).encode()) for n in names for level in (ha.STATE, ha.EVENT)) <= LEAF_ROOM
    # prefix and camera are hashed together: ("a_b", "c") and ("a", "b_c") read alike but differ
    assert ha.object_id("a_b", "c") != ha.object_id("a", "b_c") and ha.object_id("p", "cam") != ha.object_id("q", "cam")
    long = "é" * 1000
    assert len(f"/device/{ha.object_id(long, long)}/config".encode()) <= DISCOVERY_ROOM

    device = ha.Device(Topics("streamprune"), "garage / #1", 500, "m")
    device.set_watches(names)
    config = device.config()
    unique = [c["unique_id"] for c in config["components"].values()]
    assert len(set(unique)) == len(unique) == 4 + 2 * len(names)
    assert all(ID.fullmatch(u) for u in [*unique, *config["components"], *config["device"]["identifiers"]])
    assert {c["state_topic"] for c in config["components"].values() if c["platform"] == "binary_sensor"} == {
        f"streamprune/garage / #1/watch/{s}/state" for s in slugs}  # a raw name never makes a topic level


def test_only_our_own_configs_for_this_prefix_are_read_back():
    topics = Topics("p")
    device = ha.Device(topics, "cam", 100, "m", watches=("w",))
    topic = ha.config_topic("ha", "p", "cam")
    ours = json.dumps(device.config()).encode()
    assert ha.read_config(topic, ours, "ha", topics) == ("cam", {c: v["platform"]
                                                                 for c, v in device.components().items()})
    assert ha.read_config(topic, ours, "ha", Topics("q")) is None  # another prefix's
    assert ha.read_config(ha.config_topic("ha", "p", "other"), ours, "ha", topics) is None  # not its own topic
    other = {**device.config(), "origin": {"name": "zigbee2mqtt"}}
    for payload in (json.dumps(other).encode(), b"", b"{", b"[" * 5000, b"\xff", b"[]", b'{"origin": 1}',
                    json.dumps({**device.config(), "device": {"name": ["cam"]}}).encode()):
        assert ha.read_config(topic, payload, "ha", topics) is None, payload[:40]
    state = ha.component_state_topic(topics, "cam", f"watch_{ha.slug('w')}", "binary_sensor")
    assert state == ha.watch_state_topic(topics, "cam", "w")
    assert ha.component_state_topic(topics, "cam", f"watch_{ha.slug('w')}_fired", "event") is None
    assert ha.component_state_topic(topics, "cam", "watch_../../x/#", "binary_sensor") is None


async def test_the_camera_is_a_device_whose_ask_entity_gets_an_answer(broker):
    prefix, discovery = unique_prefix(), unique_prefix()
    cam = ScriptedCamera("garage", door=DoorSettings(max_question_chars=100))
    service = MqttService(settings(broker, prefix, discovery), {"garage": cam})
    topic = ha.config_topic(discovery, prefix, "garage")
    async with Listener(broker, f"{discovery}/#", f"{prefix}/#") as L, running(cam, sink=service), serving(service):
        first = await L.next_on(topic)
        assert first.topic == f"{discovery}/device/{ha.object_id(prefix, 'garage')}/config"
        config = first.json()
        oid = ha.object_id(prefix, "garage")
        assert config["device"] == {"identifiers": [oid], "name": "garage", "manufacturer": "streamprune",
                                    "model": "scripted", "sw_version": ha.version()}
        assert config["origin"] == {"name": "streamprune", "sw_version": ha.version()}
        assert (config["availability_topic"], config["payload_available"], config["payload_not_available"],
                config["qos"]) == (f"{prefix}/status", "online", "offline", 1)
        c = config["components"]
        assert {k: (v["platform"], v["name"], v["unique_id"]) for k, v in c.items()} == {
            "ask": ("text", "Ask", f"{oid}_ask"), "answer": ("sensor", "Last answer", f"{oid}_answer"),
            "snapshot": ("image", "Event snapshot", f"{oid}_snapshot"),
            "memory": ("sensor", "Memory tokens", f"{oid}_memory")}
        assert c["ask"]["command_topic"] == f"{prefix}/garage/ask" and c["ask"]["max"] == 100
        assert c["answer"]["state_topic"] == c["answer"]["json_attributes_topic"] == f"{prefix}/garage/answer"
        assert c["snapshot"]["image_topic"] == f"{prefix}/garage/snapshot"
        assert c["memory"]["state_topic"] == f"{prefix}/garage/status"
        status = (await L.next_on(f"{prefix}/garage/status")).json()
        assert render(c["memory"]["value_template"], status) == "24"

        await L.publish(c["ask"]["command_topic"], "Is the car there?")  # what HA sends when one types
        answer = (await L.next_on(c["answer"]["state_topic"])).json()
        assert render(c["answer"]["value_template"], answer) == "Yes, it is in view."
        attributes = json.loads(render(c["answer"]["json_attributes_template"], answer))
        assert attributes == {k: answer[k] for k in ha.EVIDENCE} and attributes["question"] == "Is the car there?"
        assert render(c["answer"]["value_template"], {**answer, "answer": "é" * 300}) == "é" * 255
    assert len(L.on(topic)) == 1 and not service.counters["unsendable"]
    assert (await retained(broker, topic)).json() == L.on(topic)[-1].json()


async def test_a_watch_is_a_binary_sensor_and_an_event_entity(broker):
    prefix, discovery = unique_prefix(), unique_prefix()
    holds = asyncio.Event()  # the condition: it holds once the watch was seen OFF
    cam = ScriptedCamera("cam", says_yes=lambda t: holds.is_set())
    name = "door/open #1"
    cam.watches.add(WatchSpec(name=name, question="Is the door open?", every_s=0.1, cooldown_s=60.0))
    service = MqttService(settings(broker, prefix, discovery), {"cam": cam})
    topic = ha.config_topic(discovery, prefix, "cam")
    state, event = ha.watch_state_topic(service.topics, "cam", name), ha.watch_event_topic(service.topics, "cam", name)
    async with Listener(broker, f"{discovery}/#", f"{prefix}/#") as L, running(cam, sink=service), serving(service):
        c = (await L.next_on(topic)).json()["components"]
        key = f"watch_{ha.slug(name)}"
        assert c[key] == {"platform": "binary_sensor", "name": name, "state_topic": state, "payload_on": "ON",
                          "payload_off": "OFF", "unique_id": f"{ha.object_id(prefix, 'cam')}_{key}"}
        assert c[f"{key}_fired"]["platform"] == "event" and c[f"{key}_fired"]["state_topic"] == event
        assert c[f"{key}_fired"]["event_types"] == ["fired"] and c[f"{key}_fired"]["name"] == f"{name} event"
        assert (await L.next_on(state)).text == "OFF"
        assert not L.on(event)
        holds.set()
        fired = (await L.next_on(event)).json()
        await L.until(lambda: L.on(state)[-1].text == "ON", what="ON")
    assert (await retained(broker, state)).text == "ON"
    assert fired["event_type"] == "fired" and fired["watch"] == name and fired["answer"].startswith("Yes")
    assert fired["camera"] == "cam" and fired["question"] == "Is the door open?" and "type" not in fired
    assert len(L.on(event)) == 1


@pytest.mark.parametrize("door", ["mqtt", "camera"])
async def test_a_removed_watch_has_its_entities_removed_and_its_state_cleared(broker, door):
    prefix, discovery = unique_prefix(), unique_prefix()
    cam = ScriptedCamera("cam")
    cam.watches.add(WatchSpec(name="stays", question="Anyone?", every_s=60.0))
    service = MqttService(settings(broker, prefix, discovery), {"cam": cam})
    topic = ha.config_topic(discovery, prefix, "cam")
    name = "car / here?"
    key = f"watch_{ha.slug(name)}"
    state = ha.watch_state_topic(service.topics, "cam", name)
    async with Listener(broker, f"{discovery}/#", f"{prefix}/#") as L, running(cam, sink=service), serving(service):
        await L.next_on(topic)
        await L.publish(f"{prefix}/cam/watch/set", json.dumps({"op": "add", "name": name, "question": "Car?",
                                                                "every_s": 0.1}))
        await L.until(lambda: key in configs(L, topic)[-1]["components"], what="the new watch announced")
        await L.until(lambda: [m for m in L.on(state) if m.text == "ON"], what="its state")
        if door == "mqtt":
            await L.publish(f"{prefix}/cam/watch/set", json.dumps({"op": "remove", "name": name}))
        else:
            cam.watches.remove(name)
        removed = await L.until(lambda: [c for c in configs(L, topic) if c["components"].get(key) == {
            "platform": "binary_sensor"}], what="the watch reduced to its platform")
        assert removed[0]["components"][f"{key}_fired"] == {"platform": "event"}
        assert "unique_id" in removed[0]["components"][f"watch_{ha.slug('stays')}"]
        await L.until(lambda: L.on(state)[-1].payload == b"", what="the state cleared")
        await asyncio.sleep(0.3)  # the other door's notice of the same change announces nothing new
        assert configs(L, topic)[-1] == removed[-1] and len(removed) == 1
    async with Listener(broker, state) as fresh:
        await asyncio.sleep(0.2)
    assert not fresh.messages  # nothing retained there any more


async def test_at_start_a_gone_camera_and_a_gone_watch_are_removed_and_others_configs_left(broker):
    prefix, discovery = unique_prefix(), unique_prefix()
    topics = Topics(prefix)
    cam = ScriptedCamera("kept")
    before = ha.Device(topics, "kept", 100, "scripted", watches=("gone watch",))  # as a run with that watch left it
    kept, gone = ha.config_topic(discovery, prefix, "kept"), ha.config_topic(discovery, prefix, "gone")
    elsewhere = ha.config_topic(discovery, "other-prefix", "gone")  # another service's camera of that name
    foreign = f"{discovery}/device/zigbee_lamp/config"
    old_state = ha.watch_state_topic(topics, "kept", "gone watch")
    async with Listener(broker, f"{discovery}/#", f"{prefix}/#") as L:
        for t, payload in ((kept, before.config()), (gone, ha.Device(topics, "gone", 100, "m").config()),
                           (elsewhere, ha.Device(Topics("other-prefix"), "gone", 100, "m").config()),
                           (foreign, {"device": {"name": "lamp"}, "origin": {"name": "zigbee2mqtt"}}),
                           (f"{discovery}/device/junk/config", "{not json")):
            await L.publish(t, payload if isinstance(payload, str) else json.dumps(payload), retain=True)
        await L.publish(old_state, "ON", retain=True)
        await L.until(lambda: len(L.messages) == 6, what="the retained setup")
        service = MqttService(settings(broker, prefix, discovery), {"kept": cam})
        async with running(cam, sink=service), serving(service):
            await L.until(lambda: L.on(gone)[1:], what="the gone camera's config cleared")
            await L.until(lambda: L.on(old_state)[1:], what="the gone watch's state cleared")
            key = f"watch_{ha.slug('gone watch')}"
            now = await L.until(lambda: [c for c in configs(L, kept) if c["components"].get(key) == {
                "platform": "binary_sensor"}], what="the gone watch reduced to its platform")
            assert now[-1]["components"][f"{key}_fired"] == {"platform": "event"}
            await asyncio.sleep(0.2)
    assert L.on(gone)[-1].payload == b"" and L.on(old_state)[-1].payload == b""
    assert len(L.on(elsewhere)) == len(L.on(foreign)) == 1  # left alone
    assert service.counters["ha_devices_removed"] == 1


async def test_homeassistant_off_publishes_nothing_under_the_discovery_prefix(broker):
    prefix, discovery = unique_prefix(), unique_prefix()
    cam = ScriptedCamera("cam")
    cam.watches.add(WatchSpec(name="w", question="Anything?", every_s=0.1))
    left = ha.config_topic(discovery, prefix, "gone")
    service = MqttService(settings(broker, prefix, discovery, homeassistant=False), {"cam": cam})
    async with Listener(broker, f"{discovery}/#", f"{prefix}/#") as L:
        await L.publish(left, json.dumps(ha.Device(Topics(prefix), "gone", 100, "m").config()), retain=True)
        async with running(cam, sink=service), serving(service):
            await L.publish(f"{prefix}/cam/ask", "Is it there?")
            await L.next_on(f"{prefix}/cam/answer")
            await L.next_on(f"{prefix}/cam/event")
            await asyncio.sleep(0.2)
    assert [m.topic for m in L.messages if not m.topic.startswith(f"{prefix}/")] == [left]  # ours only
    assert not [m for m in L.messages if "/watch/" in m.topic[len(prefix):]]
