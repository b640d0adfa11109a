"""JSONL sink: one record per line, flushed per line, so `tail -f` and crashes lose nothing."""
from __future__ import annotations

import json
from pathlib import Path

from .base import Sink


class JsonlSink(Sink):
    name = "jsonl"

    def __init__(self, path: str | Path, types: tuple[str, ...] = ("answer", "event", "error")):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.types = types
        self._fh = self.path.open("a", encoding="utf-8")

    async def emit(self, record: dict) -> None:
        if record.get("type") in self.types:
            self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._fh.flush()

    async def close(self) -> None:
        self._fh.close()
