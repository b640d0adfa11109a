"""Helpers of the HTTP front-door tests: a service serving cameras on a free port with a client
for it, and a reader of server-sent events."""
from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx2

from scripted_camera import ScriptedCamera, running
from sinks.http import HttpService
from stream.http_settings import HttpSettings


@contextlib.asynccontextmanager
async def serving(*cameras, **settings) -> AsyncIterator[tuple[HttpService, httpx2.AsyncClient]]:
    """The service on 127.0.0.1 (any free port) serving `cameras` (subscribed to their buses;
    scripted cameras' watches run for the block), and a client with its base URL; closed after
    the block."""
    service = HttpService(HttpSettings(**{"enabled": True, "port": 0, **settings}), {c.name: c for c in cameras},
                          "0.1.0")
    scripted = [c for c in cameras if isinstance(c, ScriptedCamera)]
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(running(*scripted, sink=service))  # their watches scheduled
        for c in cameras:
            if c not in scripted:
                c.bus.subscribe(service)
        await service.start()
        stack.push_async_callback(service.close)
        client = await stack.enter_async_context(httpx2.AsyncClient(base_url=service.url, timeout=10.0))
        yield service, client


@dataclass
class SSE:
    event: str
    data: str

    def json(self):
        return json.loads(self.data)


async def sse_events(response: httpx2.Response) -> AsyncIterator[SSE]:
    """The events of a text/event-stream response (comments and `retry:` lines skipped)."""
    event, data = "message", []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield SSE(event, "\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


async def next_event(events: AsyncIterator[SSE], kind: str) -> SSE:
    """The next event of type `kind`, skipping others."""
    async for e in events:
        if e.event == kind:
            return e
    raise AssertionError(f"the stream ended before a {kind!r} event")
