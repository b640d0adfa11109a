"""The MQTT wire format without a broker: payloads round-trip to the vocabulary, topics stay
inside MQTT's limits, and text UTF-8 cannot carry never breaks encoding."""
from __future__ import annotations

import json

import pytest

from sinks.mqtt.protocol import (CAMERA_LEAVES, ProtocolError, Topics, answer_from_payload, answer_payload, encode,
                                 error_payload, event_payload, parse_ask, parse_watch_change, refusal, status_payload,
                                 topic_problem)
from stream.errors import RequestError
from stream.events import Answer, RequestFailed, Status, WatchFired
from stream.mqtt_settings import LEAF_ROOM, MAX_TOPIC_BYTES

TOPICS = Topics("p")


def test_an_answer_payload_uses_the_mqtt_names_and_turns_back_into_the_same_answer():
    a = Answer(text="Yes.", question="Open?", t_start=1.0, t_end=2.5, groups=3, tokens_used=40, memory_tokens=90,
               prompt_tokens=70, new_tokens=2, ttft_s=0.1, total_s=0.3, camera="cam", id="q1", model="m", pruner="p",
               origin="mqtt")
    payload = json.loads(encode(answer_payload(a)))
    assert payload["answer"] == "Yes." and payload["groups"] == 3 and "text" not in payload and "type" not in payload
    assert answer_from_payload(payload) == a


def test_error_event_and_status_payloads_carry_the_vocabulary_fields():
    failed = refusal("cam", RequestError("busy", "wait"), 7, "Open?")
    assert error_payload(failed) == {"camera": "cam", "code": "busy", "message": "wait", "id": 7, "question": "Open?",
                                     "origin": "mqtt", "timestamp": failed.timestamp}
    assert isinstance(failed, RequestFailed)
    fired = WatchFired(camera="cam", watch="w", question="q?", answer="Yes", trigger="yes", t_start=0.0, t_end=1.0,
                       groups=1, model="m", pruner="p", id="e1", snapshot=b"\xff\xd8jpeg")
    event = json.loads(encode(event_payload(fired, "p/cam/snapshot")))
    assert event["type"] == "event" and event["snapshot"] == "p/cam/snapshot" and event["watch"] == "w"
    status = Status(camera="cam", stream_s=1.0, fps_in=1.0, fps_out=1.0, frames_in=1, frames_out=1, dropped=0,
                    groups_encoded=1, memory_tokens=1, tokens_seen=1, encode_ms=1.0, prune_ms=1.0, backlog=0,
                    queued=0, answers=0, source={"state": "streaming"})
    payload = status_payload(status, {"requests": 2, "answers": 1})
    assert payload["source"] == {"state": "streaming"} and list(payload["mqtt"]) == ["answers", "requests"]


def test_text_utf8_cannot_carry_is_escaped_on_the_way_out():
    out = encode({"id": "\ud800", "text": "é"})
    assert json.loads(out.decode("utf-8")) == {"id": "\ud800", "text": "é"}
    assert encode({"text": "é"}) == '{"text": "é"}'.encode()


@pytest.mark.parametrize("payload, code, rid, reply_to", [
    (b'{"id": "\\ud800", "question": "hi"}', "bad_request", None, None),
    (b'{"id": "a", "question": "hi", "reply_to": "p/cam/ask"}', "reply_to_not_allowed", "a", None),
    (b'{"id": "a", "question": "hi", "reply_to": "' + b"x" * (MAX_TOPIC_BYTES + 1) + b'"}', "bad_request", "a", None),
    (b'{"id": "a", "question": "hi", "reply_to": "p/reply/\\ud800"}', "bad_request", "a", None),
    (b'{"id": "a", "question": "\\ud800", "reply_to": "p/reply/r"}', "bad_request", "a", "p/reply/r"),
    (b'{"id": true, "question": "hi"}', "bad_request", None, None),
    (b'{"id": "' + b"i" * 201 + b'", "question": "hi"}', "bad_request", None, None),
    (b'{"id": ' + b"9" * 5000 + b', "question": "hi"}', "bad_json", None, None),
    (b'{"id": ' + b"9" * 4000 + b', "question": "hi"}', "bad_request", None, None),
    (b'{"id": 1, "question": "hi", "llm_budget": ' + b"9" * 4000 + b'}', "bad_llm_budget", 1, None),
    (b'{"id": 1, "question": "hi", "llm_budget": ' + b"9" * 5000 + b'}', "bad_json", None, None),
    (b'{"id": 1, "question": "hi", "max_new_tokens": 0}', "bad_max_new_tokens", 1, None),
    (b'{"id": 1, "question": "hi", "llm_budget": NaN}', "bad_json", None, None),
    (b'{"id": 1, "question": "hi", "max_new_tokens": -Infinity}', "bad_json", None, None),
    (b'{"id": 1, "question": ["' + b"x" * 5000 + b'"]}', "bad_request", 1, None),
])
def test_a_refused_ask_carries_what_could_be_read_of_it(payload, code, rid, reply_to):
    with pytest.raises(ProtocolError) as e:
        parse_ask(payload, 1 << 20, TOPICS)
    assert (e.value.code, e.value.id, e.value.reply_to) == (code, rid, reply_to)
    assert len(e.value.message) < 400  # a short excerpt of the request at most


@pytest.mark.parametrize("allow, topic, allowed", [
    ((), "p/reply/me", True), ((), "p/reply/a/b", True), ((), "p/replies", False),
    ((), "homeassistant/cover/garage/set", False), ((), "zigbee2mqtt/front_door_lock/set", False),
    (("apps/+/answers",), "apps/phone/answers", True), (("apps/+/answers",), "apps/phone/x/answers", False),
    (("apps/+/answers",), "p/reply/me", False), (("p/#",), "p/cam/ask", False),  # never a request topic
])
def test_reply_to_is_confined_to_the_allowed_filters(allow, topic, allowed):
    topics = Topics("p", allow)
    payload = json.dumps({"id": "a", "question": "hi", "reply_to": topic}).encode()
    if allowed:
        assert parse_ask(payload, 1 << 20, topics).reply_to == topic
    else:
        with pytest.raises(ProtocolError) as e:
            parse_ask(payload, 1 << 20, topics)
        assert e.value.code == "reply_to_not_allowed" and topic not in e.value.message


@pytest.mark.parametrize("payload, code", [
    (b"[]", "bad_watch"), (b"list", "bad_watch"), (b'{"op": "add", "name": "\\ud800", "question": "q?"}', "bad_watch"),
    (b'{"op": "add", "name": "w", "question": "q?", "every_s": NaN}', "bad_json"),
    (b'{"op": "' + b"x" * 60000 + b'"}', "bad_watch"),
])
def test_a_refused_watch_change_gets_bad_watch(payload, code):
    with pytest.raises(ProtocolError) as e:
        parse_watch_change(payload, 1 << 20, TOPICS)
    assert e.value.code == code and len(e.value.message) < 400


def test_a_refusal_message_is_cut_short():
    failed = refusal("cam", RequestError("bad_watch", "x" * 10_000))
    assert len(failed.message) <= 301


def test_an_ask_becomes_a_question_from_mqtt():
    ask = parse_ask(b'{"id": 3, "question": " hi ", "llm_budget": 9, "max_new_tokens": 4, "reply_to": "p/reply/3"}',
                    1 << 20, TOPICS)
    q = ask.question
    assert (q.text, q.id, q.llm_budget, q.max_new_tokens, q.origin, ask.reply_to) == (" hi ", 3, 9, 4, "mqtt",
                                                                                       "p/reply/3")
    assert parse_ask(b"  plain  ", 1 << 20, TOPICS).question.text == "plain"


def test_a_watch_change_builds_its_spec_for_the_topic_camera():
    change = parse_watch_change(b'{"op": "add", "id": 1, "name": "w", "question": "q?", "every_s": 5}', 1 << 20, TOPICS)
    assert change.id == 1 and change.spec("cam").camera == "cam" and change.spec("cam").every_s == 5.0
    with pytest.raises(ProtocolError, match="camera"):
        parse_watch_change(b'{"op": "add", "name": "w", "question": "q?", "camera": "x"}', 1 << 20, TOPICS).spec("cam")


def test_topics_fit_mqtt_and_requests_are_recognised():
    assert max(len(leaf.encode()) for leaf in CAMERA_LEAVES) <= LEAF_ROOM
    assert TOPICS.request("p/cam/ask") == ("cam", "ask") and TOPICS.request("p/cam/watch/set") == ("cam", "watch/set")
    assert TOPICS.request("p/a/b/ask") is None and TOPICS.request("q/cam/ask") is None
    assert TOPICS.error == "p/error" and TOPICS.status == "p/status"
    assert topic_problem("a" * MAX_TOPIC_BYTES) is None and topic_problem("a" * (MAX_TOPIC_BYTES + 1))
    assert topic_problem("é" * (MAX_TOPIC_BYTES // 2 + 1))  # bytes, not characters
    for bad in ("", "a/+", "a/#", "$SYS/x", "a\0", "a/\ud800", 5):
        assert topic_problem(bad), bad
