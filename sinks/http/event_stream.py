"""Server-sent events: the wire form, a response that always lets go of what it streams, and the
fan-out of bus events to the clients of `/api/events`.

Each client has a bounded queue. The bus never waits for a client: when a client's queue is
full its oldest event is dropped (counted per client and in `EventClients.dropped`, which the
metrics show), and the client is told how many it lost by a `dropped` event before the next
one it gets. An idle stream carries a `: ping` comment every `ping_s`, so proxies keep it open
and a client gone away is noticed. `close()` ends every stream (the service is stopping).
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from stream.errors import RequestError

from .errors import dumps

log = logging.getLogger(__name__)

PING_S = 15.0
QUEUE_SIZE = 256  # events a client may fall behind by before it loses the oldest
RETRY_MS = 2000  # how soon a browser's EventSource reconnects
HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}  # no buffering proxy in between


def sse(event: str | None, data: object) -> bytes:
    """One event: `data` as one line of JSON (JSON text never holds a raw newline)."""
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + (data if isinstance(data, bytes) else dumps(data)) + b"\n\n"


PING = b": ping\n\n"


class EventStream(StreamingResponse):
    """`text/event-stream` from an async generator, which is closed however the response ends
    (finished, client gone, server stopping); `on_close` runs then too, even if the generator
    never started."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None] | None = None):
        super().__init__(content, media_type="text/event-stream", headers=HEADERS)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.on_close is not None:
                self.on_close()
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


class EventClient:
    """One `/api/events` stream: the cameras it wants (None: all) and its queue."""

    def __init__(self, owner: "EventClients", cameras: frozenset[str] | None, queue_size: int):
        self.owner = owner
        self.cameras = cameras
        self.queue: deque[bytes] = deque()
        self.queue_size = queue_size
        self.dropped = 0  # since the last event it was sent
        self.lagged = False  # it has lost events (logged once)
        self.wake = asyncio.Event()

    def wants(self, camera: str) -> bool:
        return self.cameras is None or camera in self.cameras

    def put(self, frame: bytes) -> None:
        if len(self.queue) >= self.queue_size:
            self.queue.popleft()
            self.dropped += 1
            self.owner.dropped += 1
            if not self.lagged:
                self.lagged = True
                log.info("HTTP: an /api/events client is %d events behind; dropping its oldest", self.queue_size)
        self.queue.append(frame)
        self.wake.set()

    def close(self) -> None:
        self.owner.release(self)

    async def frames(self, closing: asyncio.Event, ping_s: float) -> AsyncIterator[bytes]:
        """What goes to the client, until `closing` is set."""
        yield f"retry: {RETRY_MS}\n\n".encode()
        try:
            while not closing.is_set():
                if not self.queue:
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), ping_s)
                    except TimeoutError:
                        yield PING
                    continue
                if self.dropped:
                    yield sse("dropped", {"type": "dropped", "count": self.dropped})
                    self.dropped = 0
                yield self.queue.popleft()
        finally:
            self.close()


class EventClients:
    """The open `/api/events` streams, at most `max_clients` of them."""

    def __init__(self, max_clients: int, queue_size: int = QUEUE_SIZE, ping_s: float = PING_S):
        self.max_clients = max_clients
        self.queue_size = queue_size
        self.ping_s = ping_s
        self.clients: set[EventClient] = set()
        self.dropped = 0  # events dropped for slow clients, all clients together
        self.closing = asyncio.Event()

    def __len__(self) -> int:
        return len(self.clients)

    def open(self, cameras: Collection[str] | None = None) -> EventClient:
        """A new client; `busy` when `max_clients` are open, `unavailable` once closing."""
        if self.closing.is_set():
            raise RequestError("unavailable", "the service is stopping")
        if len(self.clients) >= self.max_clients:
            raise RequestError("busy", f"{len(self.clients)} event streams are open already; the limit is "
                               f"{self.max_clients} (http.max_event_clients)")
        client = EventClient(self, None if cameras is None else frozenset(cameras), self.queue_size)
        self.clients.add(client)
        return client

    def release(self, client: EventClient) -> None:
        self.clients.discard(client)

    def stream(self, client: EventClient) -> EventStream:
        return EventStream(client.frames(self.closing, self.ping_s), on_close=client.close)

    @property
    def listening(self) -> bool:
        return bool(self.clients)

    def publish(self, camera: str, frame: bytes) -> None:
        """Queue `frame` (an `sse()` event) for every client that wants `camera`; never waits."""
        for client in self.clients:
            if client.wants(camera):
                client.put(frame)

    def close(self) -> None:
        """End every stream (each ends at its next step)."""
        self.closing.set()
        for client in self.clients:
            client.wake.set()
