"""The sink interface: the pipeline fans every answer, event and status record out to sinks.

A record is a plain JSON-ready dict with a "type" ("answer", "status", "error", ...). Sinks
never import a model; one failing sink is logged and never stops the others.
"""
from __future__ import annotations

import logging
from typing import Iterable

log = logging.getLogger(__name__)


class Sink:
    """Receives records; subclasses override `emit` and, if they hold resources, `close`."""

    name = "sink"

    async def emit(self, record: dict) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the sink holds (files, connections)."""


class FanOut:
    """Sends each record to every sink; counts and logs sink failures instead of raising."""

    def __init__(self, sinks: Iterable[Sink]):
        self.sinks = list(sinks)
        self.failures = 0

    async def emit(self, record: dict) -> None:
        for sink in self.sinks:
            try:
                await sink.emit(record)
            except Exception:
                self.failures += 1
                log.exception("sink %s failed on a %s record", sink.name, record.get("type"))

    async def close(self) -> None:
        for sink in self.sinks:
            await sink.close()
