"""The watch trigger rule and the yes/no reading of answers (stream/watches.py), without a camera."""
from __future__ import annotations

from hypothesis import given
from hypothesis import settings as settings_h
from hypothesis import strategies as st

from stream.watches import WatchSpec, WatchState, parse_yes_no


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
