"""The watch trigger rule, the yes/no reading of answers and what a watch may hold (stream/watches.py)."""
from __future__ import annotations

import math
from dataclasses import asdict

import pytest
from hypothesis import given
from hypothesis import settings as settings_h
from hypothesis import strategies as st

from stream.errors import ConfigError, RequestError
from stream.validation import build
from stream.watches import ASK_SUFFIX, MAX_WATCHES, WatchSpec, WatchState, check_watch, parse_yes_no


@settings_h(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 5.0), st.sampled_from([True, False, None])), max_size=40),
       st.floats(0.0, 10.0))
def test_watch_trigger_fires_on_turning_true_outside_the_cooldown(answers, cooldown):
    """Transcription of the rule: a match fires iff no event yet or (a non-match came after the
    last event and the cooldown since it has passed)."""
    w = WatchState(WatchSpec(name="w", question="q?", every_s=1.0, cooldown_s=cooldown), 0.0)
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


async def test_a_watch_fires_into_jsonl_with_mqtt_off(tmp_path):
    import asyncio
    import json

    from scripted_camera import ScriptedCamera, running

    from sinks.jsonl import JsonlSink

    cam = ScriptedCamera("door", says_yes=lambda t: t >= 0.5)
    cam.watches.add(WatchSpec(name="person", question="Is anyone at the door?", every_s=0.1, cooldown_s=60.0))
    out = tmp_path / "events.jsonl"
    sink = JsonlSink(out)
    async with running(cam, sink=sink):
        for _ in range(100):
            if out.exists() and '"type": "event"' in out.read_text():
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # later checks still say yes: no second event
    await sink.close()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    events = [e for e in lines if e["type"] == "event"]
    assert len(events) == 1
    (e,) = events
    assert (e["camera"], e["watch"], e["question"], e["trigger"]) == ("door", "person", "Is anyone at the door?", "yes")
    assert e["answer"] == "Yes, it is in view." and "snapshot" not in e and e["t_end"] >= 0.5
    assert [x["type"] for x in lines] == ["event"]  # the watch's checks themselves are not answers


def _watches(max_question_chars: int = 500):
    from stream.watches import Watches

    async def publish(_event):
        pass

    async def ask(_q):
        raise AssertionError("no check runs in these tests")

    return Watches("cam", ask, publish, lambda: None, max_question_chars=max_question_chars)


@pytest.mark.parametrize("fields, path, message", [
    ({"every_s": math.nan}, "every_s", "expected a finite number, got nan"),
    ({"every_s": math.inf}, "every_s", "expected a finite number, got inf"),
    ({"cooldown_s": math.nan}, "cooldown_s", "expected a finite number, got nan"),
    ({"cooldown_s": -math.inf}, "cooldown_s", "expected a finite number, got -inf"),
    ({"name": "door\ud800"}, "name", "is not valid Unicode text (surrogates not allowed at character 4)"),
    ({"name": "door\x07open"}, "name", "must not hold control characters (found '\\x07')"),
    ({"name": "door\nopen"}, "name", "must not hold control characters (found '\\n')"),
    ({"question": "Is it \udcff open?"}, "question", "is not valid Unicode text"),
    ({"every_s": -1.0}, "every_s", "out of range"),
])
def test_bad_watch_fields_are_refused_with_their_reason(fields, path, message):
    spec = WatchSpec(**{"name": "door", "question": "Is the door open?", "every_s": 5.0, **fields})
    with pytest.raises(ConfigError) as e:
        _watches().add(spec)
    assert e.value.path == path and message in e.value.detail
    with pytest.raises(ConfigError) as e:  # the same through the validator the config and MQTT use
        check_watch(build(WatchSpec, asdict(spec)))
    assert e.value.path == path and message in e.value.detail


def test_a_watch_question_too_long_for_the_camera_is_refused_when_added():
    watches = _watches(max_question_chars=60)
    limit = 60 - len(ASK_SUFFIX)
    watches.add(WatchSpec(name="fits", question="x" * limit, every_s=5.0))
    with pytest.raises(ConfigError) as e:
        watches.add(WatchSpec(name="long", question="x" * (limit + 1), every_s=5.0))
    assert e.value.path == "question"
    assert e.value.detail.startswith(f"{limit + 1} characters; this camera's limit for a watch question is {limit} ")
    assert len(watches) == 1


async def test_a_config_watch_too_long_for_its_camera_is_a_config_error(vlm):
    from stream.camera import Camera
    from stream.config import from_dict

    cfg = from_dict({"query": {"max_question_chars": 40},
                     "watches": [{"name": "w", "question": "Is the red car still parked by the gate?", "every_s": 5.0}]})
    with pytest.raises(ConfigError) as e:
        Camera(cfg, vlm)
    assert e.value.path == "watches[0].question"


def test_a_camera_holds_at_most_max_watches():
    watches = _watches()
    for i in range(MAX_WATCHES):
        watches.add(WatchSpec(name=f"w{i}", question="q?", every_s=5.0))
    watches.add(WatchSpec(name="w0", question="replaced?", every_s=5.0))  # a replacement is no new watch
    with pytest.raises(RequestError) as e:
        watches.add(WatchSpec(name="one more", question="q?", every_s=5.0))
    assert e.value.code == "too_many_watches" and len(watches) == MAX_WATCHES
