"""The MQTT service against a real mosquitto: ask/answer, bad input, broker restarts, watches, load.

Watches are driven by `ScriptedCamera`, a deterministic stand-in implementing the camera
interface the service uses: it answers "Yes" exactly when the synthetic scene's ground truth
has the target in view (the tiny random model cannot judge a scene).
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import time

import cv2
import numpy as np
from hypothesis import given
from hypothesis import settings as settings_h
from hypothesis import strategies as st

from mqtt_broker import Listener, retained, unique_prefix
from sinks.mqtt import MqttService
from sinks.mqtt_settings import MqttSettings, WatchSpec
from sinks.watches import WatchState, parse_yes_no
from stream.answer import QueryError
from stream.sources.synthetic import COLOURS, Actor, Script, SyntheticSource

ANSWER_FIELDS = {"id", "camera", "question", "answer", "t_start", "t_end", "groups", "tokens_used", "ttft_s",
                 "total_s", "model", "pruner", "timestamp"}


def settings(broker, prefix: str, **over) -> MqttSettings:
    return MqttSettings(**{"enabled": True, "host": broker.host, "port": broker.port, "prefix": prefix,
                           "reconnect_min_s": 0.1, "reconnect_max_s": 0.5, **over})


class ScriptedCamera:
    """The camera interface, answering from ground truth: "Yes" when `says_yes(stream time)`.

    Stream time runs at `speed` x wall clock from construction; `delay` is the answer latency.
    """

    def __init__(self, name: str, says_yes=lambda t: True, source: SyntheticSource | None = None,
                 speed: float = 1.0, delay: float = 0.0):
        self.name, self.says_yes, self.source, self.speed, self.delay = name, says_yes, source, speed, delay
        self.t0 = time.monotonic()
        self.asked: list[str] = []

    def stream_s(self) -> float:
        return (time.monotonic() - self.t0) * self.speed

    async def answer(self, question, llm_budget=None, max_new_tokens=None, request_id=None) -> dict:
        if llm_budget is not None and llm_budget < 1:
            raise QueryError("bad_llm_budget", f"llm_budget must be a positive integer, got {llm_budget!r}")
        self.asked.append(question)
        await asyncio.sleep(self.delay)
        t = self.stream_s()
        return {"type": "answer", "camera": self.name, "model": "scripted", "pruner": "none",
                "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(), "id": request_id,
                "text": "Yes, it is in view." if self.says_yes(t) else "No.", "question": question,
                "ttft_s": 0.001, "total_s": self.delay + 0.001, "tokens_used": 12, "groups_covered": 2,
                "t_start": max(0.0, t - 1.0), "t_end": t, "memory_tokens": 24}

    def status_record(self) -> dict:
        return {"type": "status", "camera": self.name, "stream_s": self.stream_s(), "frames_in": 0}

    def latest_jpeg(self) -> bytes | None:
        if self.source is None:
            return None
        image = self.source.render(min(self.stream_s(), self.source.duration_s))
        return cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()


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


def pipeline_answer(camera: str, n: int) -> dict:
    """An answer record as the pipeline emits it for a scripted question."""
    return {"type": "answer", "camera": camera, "model": "m", "pruner": "p", "timestamp": "2026-01-01T00:00:00Z",
            "text": f"answer {n}", "question": f"scripted {n}", "ttft_s": 0.1, "total_s": 0.2, "tokens_used": 1,
            "groups_covered": 1, "t_start": 0.0, "t_end": 1.0, "memory_tokens": 1}


async def test_ask_over_mqtt_answers_on_answer_topic_and_reply_to(broker, vlm):
    from stream.config import from_dict
    from stream.pipeline import CameraPipeline

    cfg = from_dict({"name": "cam", "source": {"kind": "synthetic", "fps": 4.0, "duration_s": 6.0, "width": 160,
                                               "height": 120}, "memory": {"capacity": 300, "recent_groups": 2},
                     "query": {"max_new_tokens": 4}, "output": {"status_interval_s": 0.0}})
    pipe = CameraPipeline(cfg, vlm)
    await pipe.run()  # the whole 6 s scene is in the memory; questions are answered from it
    prefix = unique_prefix()
    forwarded = []

    async def forward(record):
        forwarded.append(record)

    service = MqttService(settings(broker, prefix), {"cam": pipe}, on_record=forward)
    try:
        async with Listener(broker, f"{prefix}/#", "replies/q1") as L, serving(service):
            ask, answers = f"{prefix}/cam/ask", f"{prefix}/cam/answer"
            request = {"id": "q1", "question": "What is in view?", "llm_budget": 40, "max_new_tokens": 3,
                       "reply_to": "replies/q1"}
            await L.publish(ask, json.dumps(request))
            a, r = (await L.next_on(answers)).json(), (await L.next_on("replies/q1")).json()
            assert a == r and ANSWER_FIELDS <= set(a)
            assert a["id"] == "q1" and a["camera"] == "cam" and a["question"] == "What is in view?"
            assert isinstance(a["answer"], str) and a["model"] == "tiny-random" and a["pruner"] == "echoprune"
            assert 0.0 <= a["t_start"] <= a["t_end"] <= 6.0 and a["groups"] >= 1
            assert 0 < a["tokens_used"] <= 40 and 0 < a["ttft_s"] <= a["total_s"]
            assert dt.datetime.fromisoformat(a["timestamp"]).tzinfo is not None

            await L.publish(ask, "  Is anyone there?  ")  # plain text is the question
            plain = (await L.next_on(answers, after=1)).json()
            assert plain["question"] == "Is anyone there?" and plain["id"] is None

            await L.publish(ask, json.dumps({"id": "q1", "question": "What is in view?"}))  # a repeat
            await L.publish(ask, json.dumps({"id": "q2", "question": "And now?"}))
            assert (await L.next_on(answers, after=2)).json()["id"] == "q2"
            assert [m.json()["id"] for m in L.on(answers)] == ["q1", None, "q2"]
            assert service.counters["duplicates"] == 1 and service.counters["answers"] == 3
            assert [f["id"] for f in forwarded] == ["q1", None, "q2"] and forwarded[0]["text"] == a["answer"]

            assert (await retained(broker, f"{prefix}/status")).text == "online"
            await service.emit(pipe.status_record())
            status = (await L.until(lambda: [m for m in L.on(f"{prefix}/cam/status") if
                                             m.json()["mqtt"].get("answers") == 3], what="a fresh status"))[0].json()
            assert status["groups_encoded"] == 6 and status["memory_tokens"] > 0 and status["queued"] == 0
    finally:
        pipe.close()
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
    ("cam/ask", json.dumps({"id": "t5"}), "empty_question", "t5"),
    ("cam/ask", json.dumps({"id": 6, "question": "   "}), "empty_question", 6),
    ("cam/ask", b"", "empty_question", None),
    ("cam/ask", json.dumps({"id": "t7", "question": "x" * 101}), "question_too_long", "t7"),
    ("cam/ask", json.dumps({"id": "t8", "question": "ok?", "pad": "y" * 3000}), "payload_too_large", None),
    ("cam/ask", json.dumps({"id": "t9", "question": "ok?", "llm_budget": 0}), "bad_llm_budget", "t9"),
    ("nosuch/ask", json.dumps({"id": "t10", "question": "ok?"}), "unknown_camera", "t10"),
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
    ("nosuch/watch/set", json.dumps({"op": "list"}), "unknown_camera", None),
]


async def test_every_bad_input_gets_its_error_and_a_counter_then_a_question_works(broker):
    prefix = unique_prefix()
    service = MqttService(settings(broker, prefix, max_question_chars=100, max_payload_bytes=2048),
                          {"cam": ScriptedCamera("cam")})
    async with Listener(broker, f"{prefix}/#", "r/#") as L:
        # a retained request (it would come back on every reconnect) is refused, not answered
        await L.publish(f"{prefix}/cam/ask", json.dumps({"id": "r1", "question": "ok?"}), retain=True)
        await L.next_on(f"{prefix}/cam/ask")
        async with serving(service):
            assert (await L.next_on(f"{prefix}/cam/error")).json()["code"] == "retained_request"
            await _bad_inputs_then_a_question(L, prefix, service)


async def _bad_inputs_then_a_question(L: Listener, prefix: str, service: MqttService) -> None:
    for i, (leaf, payload, code, rid) in enumerate(BAD_INPUTS):
        camera = leaf.split("/")[0]
        errors = f"{prefix}/{camera}/error"
        before = len(L.on(errors))
        await L.publish(f"{prefix}/{leaf}", payload)
        e = (await L.next_on(errors, after=before)).json()
        assert (e["code"], e["id"], e["camera"]) == (code, rid, camera), (i, e)
        assert e["message"], e
    expected = {"errors.retained_request": 1}
    for _, _, code, _ in BAD_INPUTS:
        expected[f"errors.{code}"] = expected.get(f"errors.{code}", 0) + 1
    assert {k: v for k, v in service.counters.items() if k.startswith("errors.")} == expected

    await L.publish(f"{prefix}/cam/ask", json.dumps({"id": "ok", "question": "Is it there?", "reply_to": "r/ok"}))
    assert (await L.next_on(f"{prefix}/cam/answer")).json()["answer"].startswith("Yes")
    assert [m.json()["id"] for m in L.on(f"{prefix}/cam/answer")] == ["ok"]  # nothing else was answered
    await L.publish(f"{prefix}/cam/ask", json.dumps({"id": "t11", "question": "", "reply_to": "r/t11"}))
    assert (await L.next_on("r/t11")).json()["code"] == "empty_question"  # errors also go to reply_to
    assert service.connected.is_set() and service.counters["connects"] == 1


async def test_watches_added_listed_and_removed_at_runtime(broker):
    prefix = unique_prefix()
    service = MqttService(settings(broker, prefix), {"cam": ScriptedCamera("cam", says_yes=lambda t: False)},
                          watches=[WatchSpec(name="from config", question="Anything?", every_s=60.0)])
    async with Listener(broker, f"{prefix}/#", "r/list") as L, serving(service):
        watches_topic = f"{prefix}/cam/watches"
        assert [w["name"] for w in (await L.next_on(watches_topic)).json()["watches"]] == ["from config"]
        spec = {"op": "add", "name": "door", "question": "Is the door open?", "every_s": 0.5, "on_scene_change": True,
                "trigger": "no", "cooldown_s": 10}
        await L.publish(f"{prefix}/cam/watch/set", json.dumps(spec))
        listing = (await L.next_on(watches_topic, after=1)).json()["watches"]
        door = next(w for w in listing if w["name"] == "door")
        assert door["trigger"] == "no" and door["every_s"] == 0.5 and door["camera"] == "cam" and not door["active"]
        await L.publish(f"{prefix}/cam/watch/set", json.dumps({"op": "list", "id": 7, "reply_to": "r/list"}))
        reply = (await L.next_on("r/list")).json()
        assert reply["id"] == 7 and {w["name"] for w in reply["watches"]} == {"from config", "door"}
        event = (await L.next_on(f"{prefix}/cam/event")).json()  # trigger "no": the answer "No." fires it
        assert event["watch"] == "door" and event["answer"] == "No." and event["snapshot"] is None
        await L.publish(f"{prefix}/cam/watch/set", json.dumps({"op": "remove", "name": "door"}))
        assert [w["name"] for w in (await L.next_on(watches_topic, after=3)).json()["watches"]] == ["from config"]
        assert [w["name"] for w in json.loads((await retained(broker, watches_topic)).payload)["watches"]] == [
            "from config"]


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
    watch = WatchSpec(name="red circle", question="Is there a red circle?", every_s=0.1, cooldown_s=3.0)
    service = MqttService(settings(broker, prefix), {"cam": cam}, watches=[watch])
    async with Listener(broker, f"{prefix}/#") as L, serving(service):
        events, snapshots = f"{prefix}/cam/event", f"{prefix}/cam/snapshot"
        first = (await L.next_on(events)).json()
        await asyncio.sleep(max(0.0, 5.2 - cam.stream_s() / speed))
        assert len(L.on(events)) == 2, [m.json() for m in L.on(events)]
    second = L.on(events)[1].json()
    # once when it turns true (1 s), not again while it stays true, not at 4 s (cooldown), again at 8 s
    assert 1.0 <= first["t_end"] < 3.0 and 8.0 <= second["t_end"] < 9.5
    assert first["watch"] == "red circle" and first["answer"].startswith("Yes") and first["trigger"] == "yes"
    assert first["t_start"] <= first["t_end"] and first["question"] == "Is there a red circle?"
    assert first["snapshot"] == snapshots and first["camera"] == "cam" and first["id"] != second["id"]
    c = service.counters
    assert c["watch_fire"] == 2 and c["watch_cooldown"] >= 3 and c["watch_duplicate"] >= 3 and c["watch_clear"] >= 3
    assert c["events"] == 2 and c["watch_errors"] == 0
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
    service = MqttService(settings(broker, prefix), {"cam": ScriptedCamera("cam")},
                          watches=[WatchSpec(name="cut", question="Is it a new scene?", on_scene_change=True,
                                             cooldown_s=0.0)])
    async with Listener(broker, f"{prefix}/#") as L, serving(service):
        await asyncio.sleep(0.3)
        assert service.counters["watch_checks"] == 0  # no timer: nothing asked yet
        await service.emit({"type": "scene_change", "camera": "cam", "pts": 3.0, "group": 3})
        assert (await L.next_on(f"{prefix}/cam/event")).json()["watch"] == "cut"
        await service.emit({"type": "scene_change", "camera": "cam", "pts": 9.0, "group": 9})
        await L.until(lambda: service.counters["watch_checks"] == 2, what="the second check")
        await asyncio.sleep(0.2)
        assert len(L.on(f"{prefix}/cam/event")) == 1 and service.counters["watch_duplicate"] == 1


async def test_broker_restart_reconnects_and_delivers_what_the_outage_produced(broker):
    prefix = unique_prefix()
    cam = ScriptedCamera("cam", delay=0.3)
    service = MqttService(settings(broker, prefix, outbox_size=10, reconnect_min_s=1.0, reconnect_max_s=1.0),
                          {"cam": cam}, watches=[WatchSpec(name="cut", question="New scene?", on_scene_change=True)])
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

    async with serving(service):
        async with Listener(broker, f"{prefix}/#") as L:
            for i in range(3):
                await L.publish(f"{prefix}/cam/ask", json.dumps({"id": f"o{i}", "question": f"q{i}?"}))
            await L.until(lambda: service.counters["requests"] == 3, what="the service to take the questions")

        async def first_outage():
            for n in range(2):
                await service.emit(pipeline_answer("cam", n))
            await service.emit({"type": "scene_change", "camera": "cam", "pts": 1.0, "group": 1})
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
                await service.emit(pipeline_answer("cam", n))

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
    service = MqttService(settings(broker, prefix, queue_size=4), {"cam": ScriptedCamera("cam", delay=0.02)})
    async with Listener(broker, f"{prefix}/#") as L, serving(service):
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


async def test_a_clean_stop_refuses_waiting_questions_and_goes_offline(broker):
    prefix = unique_prefix()
    service = MqttService(settings(broker, prefix), {"cam": ScriptedCamera("cam", delay=30.0)})
    async with Listener(broker, f"{prefix}/#") as L:
        async with serving(service):
            for i in range(3):
                await L.publish(f"{prefix}/cam/ask", json.dumps({"id": f"w{i}", "question": "Slow?"}))
            await L.until(lambda: service.counters["requests"] == 3, what="the questions")
        await L.until(lambda: L.on(f"{prefix}/status")[1:], what="offline")
        errors = [m.json() for m in L.on(f"{prefix}/cam/error")]
    assert sorted(e["id"] for e in errors) == ["w0", "w1", "w2"]  # one being answered, two waiting
    assert {e["code"] for e in errors} == {"unavailable"} and L.on(f"{prefix}/status")[-1].text == "offline"


@settings_h(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 5.0), st.sampled_from([True, False, None])), max_size=40),
       st.floats(0.0, 10.0))
def test_watch_trigger_fires_on_turning_true_outside_the_cooldown(answers, cooldown):
    """Transcription of the rule: a match fires iff no event yet or (a non-match came after the
    last event and the cooldown since it has passed)."""
    w = WatchState(WatchSpec(name="w", question="q?", every_s=1.0, cooldown_s=cooldown), "cam", 0.0)
    now, last_fired, cleared = 0.0, None, True
    for gap, matched in answers:
        now += gap
        outcome = w.step(matched, now)
        fires = matched is True and cleared and (last_fired is None or now - last_fired >= cooldown)
        assert (outcome == "fire") == fires, (outcome, now, last_fired, cleared)
        if fires:
            last_fired, cleared = now, False
        elif matched is False:
            cleared = True


def test_yes_no_parsing():
    assert parse_yes_no("Yes, the door is open.") is True
    assert parse_yes_no("no.") is False
    assert parse_yes_no("Nope") is False
    assert parse_yes_no("The door: YES") is True
    assert parse_yes_no("I cannot tell; not sure") is None
    assert parse_yes_no("Nobody knows") is None  # a word, not a prefix
    assert parse_yes_no("") is None
