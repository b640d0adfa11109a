"""The MQTT service's bounded outbox: two lanes, several messages in flight, nothing lost to a
dropped connection, error replies dropped before answers.

A message stays in the outbox until the broker acknowledges it; `take()` hands out the oldest
message not already in flight (answers and events before error replies), `done()` removes an
acknowledged one, `release()` puts one whose publish failed back in line (a dropped connection
releases all of them, so they go out again, in order, after reconnecting). Past `size`
messages the oldest waiting error reply is dropped first, then the oldest waiting answer: a
flood of bad requests cannot push out other clients' answers.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

ANSWERS, ERRORS = 0, 1  # lanes, in the order they are served


@dataclass(eq=False)
class Outgoing:
    topic: str
    payload: bytes
    retain: bool = False
    lane: int = ANSWERS


class Outbox:
    def __init__(self, size: int):
        self.size = size
        self.dropped = 0
        self._lanes: tuple[deque[Outgoing], deque[Outgoing]] = (deque(), deque())
        self._in_flight: set[int] = set()  # id() of the messages being published

    def __len__(self) -> int:
        return sum(len(lane) for lane in self._lanes)

    @property
    def waiting(self) -> int:
        """Messages not in flight."""
        return len(self) - len(self._in_flight)

    def put(self, item: Outgoing) -> Outgoing | None:
        """Queue `item`; the message dropped to make room, if any."""
        self._lanes[item.lane].append(item)
        if len(self) <= self.size:
            return None
        for lane in reversed(self._lanes):
            victim = next((m for m in lane if id(m) not in self._in_flight), None)
            if victim is not None:
                lane.remove(victim)
                self.dropped += 1
                return victim
        return None  # everything is in flight: it shrinks back as acknowledgements arrive

    def take(self) -> Outgoing | None:
        """The next message to publish (now in flight), or None when all are in flight or sent."""
        for lane in self._lanes:
            for m in lane:
                if id(m) not in self._in_flight:
                    self._in_flight.add(id(m))
                    return m
        return None

    def done(self, item: Outgoing) -> None:
        """`item` was acknowledged."""
        self._in_flight.discard(id(item))
        lane = self._lanes[item.lane]
        if lane and lane[0] is item:
            lane.popleft()
        else:
            lane.remove(item)

    def release(self, item: Outgoing) -> None:
        """`item` was not acknowledged: it waits to be published again, in its place."""
        self._in_flight.discard(id(item))
