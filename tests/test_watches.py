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
