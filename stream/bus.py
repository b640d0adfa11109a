"""The event bus: a camera publishes typed events (stream/events.py), sinks subscribe.

A sink that fails on an event is logged and counted; it never stops the camera or the other
sinks. Publishing awaits each sink in turn, so a sink sees events in the order they happened.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

from .events import Event

log = logging.getLogger(__name__)


class Sink:
    """Receives events; subclasses override `handle` and, if they hold resources, `close`."""

    name = "sink"

    async def handle(self, event: Event) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the sink holds (files, connections); write what it writes at the end."""


class Bus:
    """Fans each event out to every subscribed sink."""

    def __init__(self, sinks: Iterable[Sink] = ()):
        self.sinks: list[Sink] = list(sinks)
        self.failures = 0

    def subscribe(self, sink: Sink) -> None:
        self.sinks.append(sink)

    async def publish(self, event: Event) -> None:
        for sink in self.sinks:
            try:
                await sink.handle(event)
            except Exception:
                self.failures += 1
                log.exception("sink %s failed on a %s event", sink.name, event.type)

    async def close(self) -> None:
        for sink in self.sinks:
            try:
                await sink.close()
            except Exception:
                log.exception("sink %s failed to close", sink.name)
