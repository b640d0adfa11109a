"""JSONL sink: one event per line, flushed per line, so `tail -f` and crashes lose nothing."""
from __future__ import annotations

import json
from pathlib import Path

from stream.bus import Sink
from stream.events import Event

DEFAULT_TYPES = ("answer", "event", "error")


class JsonlSink(Sink):
    name = "jsonl"

    def __init__(self, path: str | Path, types: tuple[str, ...] = DEFAULT_TYPES):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.types = types
        self._fh = self.path.open("a", encoding="utf-8", errors="backslashreplace")  # a lone surrogate must not stop the sink

    async def handle(self, event: Event) -> None:
        if event.type in self.types:
            self._fh.write(json.dumps(event.to_dict(), ensure_ascii=False) + "\n")
            self._fh.flush()

    async def close(self) -> None:
        self._fh.close()
