"""The MQTT front door against a real mosquitto: ask/answer, bad input, broker restarts, watches,
load, clean stops and connection errors.

The cameras are `ScriptedCamera`s (tests/scripted_camera.py): real camera services (door, watches,
bus) whose answers come from a synthetic scene's ground truth instead of a model.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from dataclasses import fields

import cv2
import numpy as np
import pytest

from mqtt_broker import Listener, retained, unique_prefix
from scripted_camera import ScriptedCamera, running
from sinks.mqtt import MqttService
from sinks.mqtt.protocol import answer_from_payload
from stream.door import DoorSettings
from stream.events import Answer, Status
from stream.mqtt_settings import MqttSettings
from stream.sources.synthetic import COLOURS, Actor, Script, SyntheticSource
from stream.watches import WatchSpec

ANSWER_FIELDS = {"id", "camera", "question", "answer", "t_start", "t_end", "groups", "tokens_used", "ttft_s",
                 "total_s", "model", "pruner", "timestamp"}


def settings(broker, prefix: str, **over) -> MqttSettings:
    return MqttSettings(**{"enabled": True, "host": broker.host, "port": broker.port, "prefix": prefix,
                           "reconnect_min_s": 0.1, "reconnect_max_s": 0.5, **over})


@contextlib.asynccontextmanager
async def serving(service: MqttService, timeout: float = 10.0):
    """The service running (connected) for the block; closed cleanly after it."""
    task = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.connected.wait(), timeout)
        yield service
    finally:
        await service.close()
        await asyncio.wait_for(task, 10)


def other_door_answer(camera: str, n: int) -> Answer:
    """An answer the camera gave through another door (a scripted question of the CLI)."""
    return Answer(text=f"answer {n}", question=f"scripted {n}", t_start=0.0, t_end=1.0, groups=1, tokens_used=1,
                  memory_tokens=1, prompt_tokens=3, new_tokens=2, ttft_s=0.1, total_s=0.2, camera=camera,
                  model="m", pruner="p", origin="script")


async def test_the_real_camera_answers_over_mqtt_as_it_answers_at_the_terminal(broker, vlm):
    from stream.camera import Camera
    from stream.config import from_dict
    from stream.events import Question

    cfg = from_dict({"name": "cam", "source": {"kind": "synthetic", "fps": 4.0, "duration_s": 6.0, "width": 160,
                                               "height": 120}, "memory": {"capacity": 300, "recent_groups": 2},
                     "query": {"max_new_tokens": 4}, "output": {"status_interval_s": 0.0}})
    cam = Camera(cfg, vlm)
    prefix = unique_prefix()
    service = MqttService(settings(broker, prefix), {"cam": cam})
    cam.bus.subscribe(service)
    async with cam:
        await cam.done()  # the whole 6 s scene is in the memory, unchanged from here on
        async with Listener(broker, f"{prefix}/#") as L, serving(service):
            ask, answers = f"{prefix}/cam/ask", f"{prefix}/cam/answer"
            request = {"id": "q1", "question": "What is in view?", "llm_budget": 40, "max_new_tokens": 3,
                       "reply_to": f"{prefix}/reply/q1"}
            await L.publish(ask, json.dumps(request))
            a, r = (await L.next_on(answers)).json(), (await L.next_on(f"{prefix}/reply/q1")).json()
            assert a == r and ANSWER_FIELDS <= set(a)
            assert a["id"] == "q1" and a["camera"] == "cam" and a["question"] == "What is in view?"
            assert isinstance(a["answer"], str) and a["model"] == "tiny-random" and a["pruner"] == "echoprune"
            assert 0.0 <= a["t_start"] <= a["t_end"] <= 6.0 and a["groups"] >= 1
            assert 0 < a["tokens_used"] <= 40 and 0 < a["ttft_s"] <= a["total_s"]
            assert dt.datetime.fromisoformat(a["timestamp"]).tzinfo is not None

            at_terminal = await cam.ask(Question("What is in view?", llm_budget=40, max_new_tokens=3, origin="cli"))
            over_mqtt = answer_from_payload(a)
            varies = {"ttft_s", "total_s", "timestamp", "origin", "id"}  # when, how fast, and through which door
            assert {k: v for k, v in over_mqtt.to_dict().items() if k not in varies} == \
                {k: v for k, v in at_terminal.to_dict().items() if k not in varies}
            assert (over_mqtt.origin, at_terminal.origin) == ("mqtt", "cli")

            await L.publish(ask, "  Is anyone there?  ")  # plain text is the question
            plain = (await L.next_on(answers, after=2)).json()
            assert plain["question"] == "Is anyone there?" and plain["id"] is None

            await L.publish(ask, json.dumps({"id": "q1", "question": "What is in view?"}))  # a repeat
            await L.publish(ask, json.dumps({"id": "q2", "question": "And now?"}))
            assert (await L.next_on(answers, after=3)).json()["id"] == "q2"
            assert [m.json()["id"] for m in L.on(answers)] == ["q1", None, None, "q2"]  # the terminal's too
            assert service.counters["duplicates"] == 1 and service.counters["answers"] == 3
            assert not L.on(f"{prefix}/cam/error") and cam.door.errors["duplicate"] == 1  # a repeat is silent

            assert (await retained(broker, f"{prefix}/status")).text == "online"
            await service.handle(cam.status())
            status = (await L.until(lambda: [m for m in L.on(f"{prefix}/cam/status") if
                                             m.json()["mqtt"].get("answers") == 3], what="a fresh status"))[0].json()
            assert status["groups_encoded"] == 6 and status["memory_tokens"] > 0 and status["queued"] == 0
            assert status["answers"] == 4 and status["source"]["state"] == "stopped"
            assert status["errors"] == {"duplicate": 1}
    assert (await retained(broker, f"{prefix}/status")).text == "offline"  # the clean stop says so


BAD_INPUTS = [  # (topic leaf, payload, error code, request id in the error)
    ("cam/ask", b"{not json", "bad_json", None),
    ("cam/ask", b"\xff\xfe\x00", "bad_encoding", None),
    ("cam/ask", b"[1, 2]", "bad_request", None),
    ("cam/ask", b"[" * 2000, "bad_json", None),
    ("cam/ask", json.dumps({"id": "t1", "question": 5}), "bad_request", "t1"),
    ("cam/ask", json.dumps({"id": "t2", "question": "ok?", "llm_budget": "lots"}), "bad_request", "t2"),
    ("cam/ask", json.dumps({"id": "t3", "question": "ok?", "max_new_tokens": 2.5}), "bad_request", "t3"),
    ("cam/ask", json.dumps({"id": ["x"], "question": "ok?"}), "bad_request", None),
    ("cam/ask", json.dumps({"id": "t4", "question": "ok?", "reply_to": "replies/#"}), "bad_request", "t4"),
    # a reply_to outside mqtt.reply_to_allow (default <prefix>/reply/#) is refused, not published to
    ("cam/ask", json.dumps({"id": "t12", "question": "ok?", "reply_to": "homeassistant/cover/garage/set"}),
     "reply_to_not_allowed", "t12"),
    ("cam/ask", json.dumps({"id": "t13", "question": "ok?", "reply_to": "zigbee2mqtt/front_door_lock/set"}),
     "reply_to_not_allowed", "t13"),
    # numbers are bounded before anything converts them; NaN and Infinity are not JSON
    ("cam/ask", b'{"id": ' + b"9" * 5000 + b', "question": "ok?"}', "bad_json", None),
    ("cam/ask", b'{"id": ' + b"9" * 30 + b', "question": "ok?"}', "bad_request", None),
    ("cam/ask", b'{"id": "t14", "question": "ok?", "llm_budget": ' + b"9" * 1000 + b'}', "bad_llm_budget", "t14"),
    ("cam/ask", b'{"id": "t15", "question": "ok?", "max_new_tokens": 5000}', "bad_max_new_tokens", "t15"),
    ("cam/ask", b'{"id": "t16", "question": "ok?", "llm_budget": NaN}', "bad_json", None),
    ("cam/ask", json.dumps({"id": "t5"}), "empty_question", "t5"),
    ("cam/ask", json.dumps({"id": 6, "question": "   "}), "empty_question", 6),
    ("cam/ask", b"", "empty_question", None),
    ("cam/ask", json.dumps({"id": "t7", "question": "x" * 101}), "question_too_long", "t7"),
    ("cam/ask", json.dumps({"id": "t8", "question": "ok?", "pad": "y" * 7000}), "payload_too_large", None),
    ("cam/ask", json.dumps({"id": "t9", "question": "ok?", "llm_budget": 0}), "bad_llm_budget", "t9"),
    # text UTF-8 cannot carry (a lone surrogate escape) is refused wherever it is, never crashes
    ("cam/ask", b'{"id": "\\ud800", "question": "hi"}', "bad_request", None),
    ("cam/ask", b'{"id": "s1", "question": "\\udfff?"}', "bad_request", "s1"),
    ("cam/ask", b'{"id": "s2", "question": "ok?", "reply_to": "r/\\ud800"}', "bad_request", "s2"),
    ("cam/ask", b'{"id": "s3", "question": "ok?", "extra": {"\\ud800": [1]}}', "bad_request", "s3"),
    ("nosuch/ask", json.dumps({"id": "t10", "question": "ok?"}), "unknown_camera", "t10"),
    ("nosuch/ask", b'{"id": "\\ud800", "question": "hi"}', "bad_request", None),
    ("cam/watch/set", json.dumps({"op": "add", "name": "w", "question": "q?"}), "bad_watch", None),
    ("cam/watch/set", json.dumps({"op": "add", "name": "w", "question": "q?", "every_s": -1}), "bad_watch", None),
    ("cam/watch/set", json.dumps({"op": "add", "name": "w", "question": "q?", "every_s": "often"}), "bad_watch", None),
    ("cam/watch/set", json.dumps({"op": "add", "name": "w", "question": "q?", "every_s": 0.01}), "bad_watch", None),
    ("cam/watch/set", json.dumps({"id": "w1", "op": "add", "name": "", "question": "q?", "every_s": 5}), "bad_watch",
     "w1"),
    ("cam/watch/set", json.dumps({"op": "add", "name": "w", "question": "q?", "every_s": 5, "colour": 1}),
     "bad_watch", None),
    ("cam/watch/set", json.dumps({"op": "explode"}), "bad_watch", None),
    ("cam/watch/set", b"add a watch please", "bad_watch", None),
    ("cam/watch/set", json.dumps({"op": "remove", "name": "nope"}), "unknown_watch", None),
    ("cam/watch/set", b'{"id": "\\ud800", "op": "list"}', "bad_request", None),
    ("cam/watch/set", b'{"id": "s4", "op": "add", "name": "\\ud800", "question": "q?", "every_s": 5}',
     "bad_watch", "s4"),
    ("cam/watch/set", b"[]", "bad_watch", None),
    # a watch question the camera could never ask is refused when added, not failing every check
    ("cam/watch/set", json.dumps({"id": "s6", "op": "add", "name": "w", "question": "q" * 90, "every_s": 5}),
     "bad_watch", "s6"),
    ("cam/watch/set", b'{"op": "add", "name": "w", "question": "q?", "every_s": Infinity}', "bad_json", None),
    ("cam/watch/set", b'{"id": "s5", "op": "add", "name": "w", "question": "q?", "every_s": 1e999}', "bad_watch",
     "s5"),
    ("nosuch/watch/set", json.dumps({"op": "list"}), "unknown_camera", None),
]


def error_topic(prefix: str, camera: str) -> str:
    """Where a refusal goes: the camera's error topic, or the service's for a camera it does not serve."""
    return f"{prefix}/{camera}/error" if camera == "cam" else f"{prefix}/error"


async def test_every_bad_input_gets_its_error_and_a_counter_then_a_question_works(broker):
    prefix = unique_prefix()
    cam = ScriptedCamera("cam", door=DoorSettings(max_question_chars=100))
    service = MqttService(settings(broker, prefix, max_payload_bytes=6000), {"cam": cam})
    async with Listener(broker, f"{prefix}/#") as L:
        # a retained request left on the broker is never handed to the service: never acted on
        for camera in ("cam", "nosuch"):
            await L.publish(f"{prefix}/{camera}/ask", json.dumps({"id": "r1", "question": "ok?"}), retain=True)
            await L.next_on(f"{prefix}/{camera}/ask")
        async with running(cam, sink=service), serving(service):
            # one retained while serving is refused once, with its id; an empty retained one clears it silently
            for camera in ("cam", "nosuch"):
                await L.publish(f"{prefix}/{camera}/ask", json.dumps({"id": "r2", "question": "ok?"}), retain=True)
                e = (await L.next_on(error_topic(prefix, camera))).json()
                assert (e["code"], e["camera"], e["id"]) == ("retained_request", camera, "r2")
                await L.publish(f"{prefix}/{camera}/ask", b"", retain=True)
            await _bad_inputs_then_a_question(L, prefix, service)
            assert not [m for m in L.messages if m.topic.endswith("/error") and m.json()["id"] == "r1"]
    assert not service.counters["unsendable"] and not service.counters["connection_failures"]


async def _bad_inputs_then_a_question(L: Listener, prefix: str, service: MqttService) -> None:
    for i, (leaf, payload, code, rid) in enumerate(BAD_INPUTS):
        camera = leaf.split("/")[0]
        errors = error_topic(prefix, camera)
        before = len(L.on(errors))
        await L.publish(f"{prefix}/{leaf}", payload)
        e = (await L.next_on(errors, after=before)).json()
        assert (e["code"], e["id"], e["camera"]) == (code, rid, camera), (i, e)
        assert e["message"], e
    expected = {"errors.retained_request": 2}  # the two sent while serving
    for _, _, code, _ in BAD_INPUTS:
        expected[f"errors.{code}"] = expected.get(f"errors.{code}", 0) + 1
    assert {k: v for k, v in service.counters.items() if k.startswith("errors.")} == expected

    await L.publish(f"{prefix}/cam/ask", json.dumps({"id": "ok", "question": "Is it there?", "reply_to": f"{prefix}/reply/ok"}))
    assert (await L.next_on(f"{prefix}/cam/answer")).json()["answer"].startswith("Yes")
    assert [m.json()["id"] for m in L.on(f"{prefix}/cam/answer")] == ["ok"]  # nothing else was answered
    await L.publish(f"{prefix}/cam/ask", json.dumps({"id": "t11", "question": "", "reply_to": f"{prefix}/reply/t11"}))
    assert (await L.next_on(f"{prefix}/reply/t11")).json()["code"] == "empty_question"  # errors also go to reply_to
    assert not [m for m in L.messages if not m.topic.startswith(prefix)]  # nothing went anywhere else
    assert service.connected.is_set() and service.counters["connects"] == 1


async def test_a_camera_level_too_long_for_its_reply_topics_is_refused_on_the_service_error_topic(broker):
    """The ask topic fits MQTT's 65,535 bytes; `<prefix>/<camera>/error` would not: no topic is
    built from a camera name that is not served, and the service goes on."""
    prefix = unique_prefix()
    cam = ScriptedCamera("cam")
    service = MqttService(settings(broker, prefix), {"cam": cam})
    name = "c" * (65535 - len(f"{prefix}//ask"))  # the longest an ask topic can have
    other = "w" * (65535 - len(f"{prefix}//watch/set"))
    async with Listener(broker, f"{prefix}/#") as L, running(cam, sink=service), serving(service):
        await L.publish(f"{prefix}/{name}/ask", json.dumps({"id": "long", "question": "hi"}))
        await L.publish(f"{prefix}/{other}/watch/set", json.dumps({"id": "long-w", "op": "list"}))
        await L.until(lambda: L.on(f"{prefix}/error")[1:], what="two errors")
        errors = [m.json() for m in L.on(f"{prefix}/error")]
        assert [(e["code"], e["id"], e["camera"]) for e in errors] == [
            ("unknown_camera", "long", name), ("unknown_camera", "long-w", other)]
        assert all(len(e["message"]) < 200 for e in errors)  # the name is shortened in the text
        await L.publish(f"{prefix}/cam/ask", json.dumps({"id": "after", "question": "Still there?"}))
        assert (await L.next_on(f"{prefix}/cam/answer")).json()["id"] == "after"
        assert service.connected.is_set() and (await retained(broker, f"{prefix}/status")).text == "online"
        assert service.counters["connects"] == 1 and not service.counters["connection_failures"]
        assert not service.counters["unsendable"]


async def test_an_unexpected_error_in_a_connection_is_logged_counted_and_retried(broker, caplog):
    class FailsOnce(MqttService):
        """Our own bug in the middle of a connection, once."""

        failed = False

        async def _session(self, client):
            if not self.failed:
                self.failed = True
                raise RuntimeError("a bug")
            await super()._session(client)

    prefix = unique_prefix()
    cam = ScriptedCamera("cam")
    service = FailsOnce(settings(broker, prefix), {"cam": cam})
    with caplog.at_level(logging.ERROR, logger="sinks.mqtt.service"):
        async with Listener(broker, f"{prefix}/#") as L, running(cam, sink=service), serving(service):
            assert service.counters["connection_failures"] == 1 and service.counters["connects"] == 1
            await L.publish(f"{prefix}/cam/ask", json.dumps({"id": "q", "question": "Up?"}))
            assert (await L.next_on(f"{prefix}/cam/answer")).json()["id"] == "q"
    failure = next(r for r in caplog.records if r.exc_info)
    assert "retrying" in failure.getMessage() and failure.exc_info[0] is RuntimeError


async def test_status_carries_the_camera_status_as_it_is_now_and_the_service_counters(broker):
    cam = ScriptedCamera("cam")
    prefix = unique_prefix()
    service = MqttService(settings(broker, prefix), {"cam": cam})
    status = f"{prefix}/cam/status"
    async with Listener(broker, f"{prefix}/#") as L, running(cam, sink=service), serving(service):
        first = (await L.next_on(status)).json()  # from the camera at start
        assert set(first) == {*(f.name for f in fields(Status)), "mqtt"} and first["source"]["state"] == "streaming"
        await cam.source_state("reconnecting")
        changed = (await L.next_on(status, after=1)).json()
        assert changed["source"]["state"] == "reconnecting" and changed["mqtt"]["connects"] == 1
        await asyncio.sleep(0.3)
        await cam.bus.publish(cam.status())  # a status tick: its source block is live, not the change's
        tick = (await L.next_on(status, after=2)).json()
        assert tick["source"]["state"] == "reconnecting" and tick["source"]["state_age_s"] >= 0.3
    assert json.loads((await retained(broker, status)).payload)["source"] == tick["source"]


async def test_watches_added_listed_and_removed_at_runtime(broker):
    prefix = unique_prefix()
    cam = ScriptedCamera("cam", says_yes=lambda t: False)
    cam.watches.add(WatchSpec(name="from config", question="Anything?", camera="cam", every_s=60.0))
    service = MqttService(settings(broker, prefix), {"cam": cam})
    async with Listener(broker, f"{prefix}/#") as L, running(cam, sink=service), serving(service):
        watches_topic = f"{prefix}/cam/watches"
        assert [w["name"] for w in (await L.next_on(watches_topic)).json()["watches"]] == ["from config"]
        spec = {"op": "add", "name": "door", "question": "Is the door open?", "every_s": 0.5, "on_scene_change": True,
                "trigger": "no", "cooldown_s": 10}
        await L.publish(f"{prefix}/cam/watch/set", json.dumps(spec))
        listing = (await L.next_on(watches_topic, after=1)).json()["watches"]
        door = next(w for w in listing if w["name"] == "door")
        assert door["trigger"] == "no" and door["every_s"] == 0.5 and door["camera"] == "cam" and not door["active"]
        await L.publish(f"{prefix}/cam/watch/set", json.dumps({"op": "list", "id": 7, "reply_to": f"{prefix}/reply/list"}))
        reply = (await L.next_on(f"{prefix}/reply/list")).json()
        assert reply["id"] == 7 and {w["name"] for w in reply["watches"]} == {"from config", "door"}
        event = (await L.next_on(f"{prefix}/cam/event")).json()  # trigger "no": the answer "No." fires it
        assert event["watch"] == "door" and event["answer"] == "No." and event["snapshot"] is None
        await L.publish(f"{prefix}/cam/watch/set", json.dumps({"op": "remove", "name": "door"}))
        assert [w["name"] for w in (await L.next_on(watches_topic, after=3)).json()["watches"]] == ["from config"]
        assert [w["name"] for w in json.loads((await retained(broker, watches_topic)).payload)["watches"]] == [
            "from config"]
        cam.watches.add(WatchSpec(name="from http", question="Anyone?", camera="cam", every_s=60.0))  # another door
        assert [w["name"] for w in (await L.next_on(watches_topic, after=4)).json()["watches"]] == [
            "from config", "from http"]
    assert not L.on(f"{prefix}/cam/answer")  # a watch's checks are not answers to anyone


def _scene() -> SyntheticSource:
    """A red circle in view (stream time) 1-3 s, again 4-6 s and 8-9.5 s; nothing else moves."""
    def circle(label, t0, t1):
        return Actor(label, "circle", COLOURS["red"], 0.4, ((t0, 0.5, 0.5), (t1, 0.5, 0.5)), ("brief",))

    script = Script(12.0, actors=(circle("red circle", 1.0, 3.0), circle("red circle 2", 4.0, 6.0),
                                  circle("red circle 3", 8.0, 9.5)), drift_amplitude=0.0)
    return SyntheticSource(fps=10.0, width=160, height=120, script=script)


async def test_watch_fires_once_respects_cooldown_and_publishes_a_snapshot(broker):
    source = _scene()
    speed = 2.0  # stream seconds per wall second: in view at 0.5-1.5, 2-3 and 4-4.75 s of wall time
    cam = ScriptedCamera("cam", says_yes=lambda t: any(source.boxes_at(t)), source=source, speed=speed)
    prefix = unique_prefix()
    cam.watches.add(WatchSpec(name="red circle", question="Is there a red circle?", every_s=0.1, cooldown_s=3.0))
    service = MqttService(settings(broker, prefix), {"cam": cam})
    async with Listener(broker, f"{prefix}/#") as L, running(cam, sink=service), serving(service):
        events, snapshots = f"{prefix}/cam/event", f"{prefix}/cam/snapshot"
        first = (await L.next_on(events)).json()
        await asyncio.sleep(max(0.0, 5.2 - cam.stream_s() / speed))
        assert len(L.on(events)) == 2, [m.json() for m in L.on(events)]
        await service.handle(cam.status())
        status = (await L.until(lambda: [m for m in L.on(f"{prefix}/cam/status")
                                         if m.json()["watch_counters"].get("watch_fire") == 2],
                                what="the watch counters in the status"))[0].json()
        assert status["watches"] == 1 and status["watch_counters"]["watch_checks"] >= 10
    second = L.on(events)[1].json()
    # once when it turns true (1 s), not again while it stays true, not at 4 s (cooldown), again at 8 s
    assert 1.0 <= first["t_end"] < 3.0 and 8.0 <= second["t_end"] < 9.5
    assert first["watch"] == "red circle" and first["answer"].startswith("Yes") and first["trigger"] == "yes"
    assert first["t_start"] <= first["t_end"] and first["question"] == "Is there a red circle?"
    assert first["snapshot"] == snapshots and first["camera"] == "cam" and first["id"] != second["id"]
    c = cam.watches.counters
    assert c["watch_fire"] == 2 and c["watch_cooldown"] >= 3 and c["watch_duplicate"] >= 3 and c["watch_clear"] >= 3
    assert service.counters["events"] == 2 and c["watch_errors"] == 0
    # each event is preceded by its snapshot: the frame at that moment, the red circle in the middle
    order = [m.topic for m in L.messages if m.topic in (events, snapshots)]
    assert order == [snapshots, events, snapshots, events]
    for snap in L.on(snapshots):
        image = cv2.imdecode(np.frombuffer(snap.payload, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (120, 160, 3)
        b, g, r = image[50:70, 70:90].reshape(-1, 3).mean(0)
        assert r > 110 and g < 90 and b < 90, (r, g, b)


async def test_scene_change_watch_fires_on_scene_changes_only(broker):
    prefix = unique_prefix()
    cam = ScriptedCamera("cam")
    cam.watches.add(WatchSpec(name="cut", question="Is it a new scene?", on_scene_change=True, cooldown_s=0.0))
    service = MqttService(settings(broker, prefix), {"cam": cam})
    async with Listener(broker, f"{prefix}/#") as L, running(cam, sink=service), serving(service):
        await asyncio.sleep(0.3)
        assert cam.watches.counters["watch_checks"] == 0  # no timer: nothing asked yet
        await cam.scene_change(3, 3.0)
        assert (await L.next_on(f"{prefix}/cam/event")).json()["watch"] == "cut"
        await cam.scene_change(9, 9.0)
        await L.until(lambda: cam.watches.counters["watch_checks"] == 2, what="the second check")
        await asyncio.sleep(0.2)
        assert len(L.on(f"{prefix}/cam/event")) == 1 and cam.watches.counters["watch_duplicate"] == 1


async def test_broker_restart_reconnects_and_delivers_what_the_outage_produced(broker):
    prefix = unique_prefix()
    cam = ScriptedCamera("cam", delay=0.3)
    cam.watches.add(WatchSpec(name="cut", question="New scene?", on_scene_change=True))
    service = MqttService(settings(broker, prefix, outbox_size=10, reconnect_min_s=1.0, reconnect_max_s=1.0),
                          {"cam": cam})
    failures = lambda: service.counters["connection_failures"]  # noqa: E731

    def answered(listener: Listener) -> set[str]:
        return {m.json()["question"] for m in listener.on(f"{prefix}/cam/answer")}

    async def outage_then_listen(produce) -> Listener:
        """Stop the broker, produce, restart it just after a failed reconnect (the next is 1 s
        away) and subscribe before the service is back."""
        broker.stop()
        await produce()
        seen = failures()
        while failures() == seen:
            await asyncio.sleep(0.01)
        broker.start()
        listener = Listener(broker, f"{prefix}/#")
        await listener.__aenter__()
        assert not service.connected.is_set()
        return listener

    async with running(cam, sink=service), serving(service):
        async with Listener(broker, f"{prefix}/#") as L:
            for i in range(3):
                await L.publish(f"{prefix}/cam/ask", json.dumps({"id": f"o{i}", "question": f"q{i}?"}))
            await L.until(lambda: service.counters["requests"] == 3, what="the service to take the questions")

        async def first_outage():
            for n in range(2):
                await cam.bus.publish(other_door_answer("cam", n))
            await cam.scene_change(1, 1.0)
            while service.counters["answers"] < 3 or service.counters["events"] < 1:
                await asyncio.sleep(0.02)
            assert service.outbox_len == 6  # 3 + 2 answers, 1 event (no frame, so no snapshot)

        L = await outage_then_listen(first_outage)
        try:  # QoS 1 is at least once: a message in flight when the broker went away may come twice
            await L.until(lambda: answered(L) >= {"q0?", "q1?", "q2?", "scripted 0", "scripted 1"}, what="5 answers")
            assert answered(L) == {"q0?", "q1?", "q2?", "scripted 0", "scripted 1"}
            assert (await L.next_on(f"{prefix}/cam/event")).json()["watch"] == "cut"
            assert (await L.next_on(f"{prefix}/status")).text == "online"  # republished: the broker forgot it
            await L.next_on(f"{prefix}/cam/status")
        finally:
            await L.__aexit__(None, None, None)
        assert service.counters["outbox_dropped"] == 0 and service.counters["connects"] == 2

        async def second_outage():  # more than the outbox holds: the oldest are dropped, and counted
            for n in range(10, 25):
                await cam.bus.publish(other_door_answer("cam", n))

        L = await outage_then_listen(second_outage)
        try:
            newest = {f"scripted {n}" for n in range(15, 25)}
            await L.until(lambda: answered(L) >= newest, what="the newest 10 answers")
            await asyncio.sleep(0.2)
            assert answered(L) == newest
        finally:
            await L.__aexit__(None, None, None)
        assert service.counters["outbox_dropped"] == 5 and service.counters["connects"] == 3


async def test_hundred_questions_at_once_each_get_an_answer_or_busy(broker):
    prefix = unique_prefix()
    cam = ScriptedCamera("cam", delay=0.02, door=DoorSettings(queue_size=4))
    service = MqttService(settings(broker, prefix), {"cam": cam})
    async with Listener(broker, f"{prefix}/#") as L, running(cam, sink=service), serving(service):
        await asyncio.gather(*(L.publish(f"{prefix}/cam/ask", json.dumps({"id": f"n{i}", "question": f"q{i}?"}))
                               for i in range(100)))
        answers, errors = f"{prefix}/cam/answer", f"{prefix}/cam/error"
        await L.until(lambda: len(L.on(answers)) + len(L.on(errors)) >= 100, timeout=20, what="100 outcomes")
        await asyncio.sleep(0.3)
    answered = [m.json()["id"] for m in L.on(answers)]
    busy = [m.json() for m in L.on(errors)]
    assert {e["code"] for e in busy} == {"busy"}
    ids = sorted(answered + [e["id"] for e in busy])
    assert ids == sorted(f"n{i}" for i in range(100))  # each exactly once: none vanished, none twice
    assert len(answered) >= 5 and len(busy) >= 1  # the queue (4) and the one being answered, at least
    assert service.counters["answers"] == len(answered) and service.counters["errors.busy"] == len(busy)


@pytest.mark.parametrize("camera_stops_first", [False, True], ids=["service-stops", "camera-then-service-stop"])
async def test_a_clean_stop_refuses_waiting_questions_and_goes_offline(broker, camera_stops_first):
    """Whichever stops first, each question still waiting gets one `unavailable` (from the
    service, or from the camera's door through the bus) before `offline`."""
    prefix = unique_prefix()
    cam = ScriptedCamera("cam", delay=30.0)
    service = MqttService(settings(broker, prefix), {"cam": cam})
    async with Listener(broker, f"{prefix}/#") as L:
        async with contextlib.AsyncExitStack() as stack:
            if camera_stops_first:  # the CLI's order: cameras stop, then the front doors
                await stack.enter_async_context(serving(service))
                await stack.enter_async_context(running(cam, sink=service))
            else:
                await stack.enter_async_context(running(cam, sink=service))
                await stack.enter_async_context(serving(service))
            for i in range(3):
                await L.publish(f"{prefix}/cam/ask", json.dumps({"id": f"w{i}", "question": "Slow?",
                                                                 "reply_to": f"{prefix}/reply/w{i}"}))
            await L.until(lambda: cam.door.queued == 2, what="the questions")
        await L.until(lambda: L.on(f"{prefix}/status")[1:], what="offline")
        errors = [m.json() for m in L.on(f"{prefix}/cam/error")]
        await L.until(lambda: len([m for m in L.messages if m.topic.startswith(f"{prefix}/reply/")]) == 3, what="reply_to copies")
    assert sorted(e["id"] for e in errors) == ["w0", "w1", "w2"]  # one being answered, two waiting
    assert {e["code"] for e in errors} == {"unavailable"} and L.on(f"{prefix}/status")[-1].text == "offline"
    assert service.counters["errors.unavailable"] == 3
