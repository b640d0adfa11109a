"""The HTTP front door: the web page, the REST and OpenAI-compatible APIs and the Prometheus
metrics (routes in app.py), served by uvicorn on the run's own event loop.

It is a bus sink too: every event of a served camera goes to the `/api/events` clients
(event_stream.py), answers feed the TTFT histogram, and group thumbnails and watch-event
snapshots are kept for the pictures (cameras.py). Questions go through each camera's one door,
like every front door's.

Lifecycle: `start()` binds the socket itself (so a taken port is one clear line, and port 0
picks a free one: `url` says which) and returns once the server accepts connections; `run()`
waits until `close()`; `close()` ends the open event streams and streamed answers (their
questions are withdrawn), answers waiting requests `unavailable`, and stops the server within
a couple of seconds. uvicorn's signal handling is left out: the CLI has its own.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Generator, Mapping

import uvicorn

from stream.bus import Sink
from stream.camera_api import CameraService
from stream.errors import Error
from stream.events import Answer, Event, WatchFired
from stream.http_settings import HttpSettings, check_http

from .app import Context, build_app
from .cameras import ServedCameras
from .event_stream import EventClients, sse
from .errors import dumps
from .metrics import Metrics

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0  # the server is cut off if it has not stopped by then
GRACE_S = 1  # uvicorn's own backstop: requests still running this long after the stop are cancelled


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers (they would replace the CLI's while serving)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port, or an Error saying in one line why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise Error(f"http: cannot listen on {host}:{port}: {_reason(e)}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise Error(f"http: cannot listen on {host}:{port}: {_reason(e)}") from None
    return sock


def _reason(e: OSError) -> str:
    return (e.strerror or str(e)).lower()


class HttpService(Sink):
    """Serves `cameras` over HTTP; subscribe it to every camera's bus."""

    name = "http"

    def __init__(self, settings: HttpSettings, cameras: Mapping[str, CameraService], version: str):
        self.settings = check_http(settings)
        self.version = version
        self.cameras = ServedCameras(cameras)
        self.events = EventClients(settings.max_event_clients)
        self.metrics = Metrics(self.cameras.cameras, version, lambda: len(self.events), lambda: self.events.dropped)
        self.closing = self.events.closing
        self.app = build_app(Context(settings, self.cameras, self.events, self.metrics, self.closing, version,
                                     int(time.time())))
        self.url = ""
        self._server: _Server | None = None
        self._serving: asyncio.Task | None = None

    # -- events from the cameras' buses --

    async def handle(self, event: Event) -> None:
        camera = getattr(event, "camera", None)
        if camera not in self.cameras:
            return
        if isinstance(event, Answer):
            self.metrics.observe(event)
        await self.cameras.keep(event)
        if self.events.listening:
            payload = event.to_dict()
            if isinstance(event, WatchFired):
                payload["snapshot_url"] = self.cameras.snapshot_url(event)
            self.events.publish(camera, sse(event.type, dumps(payload)))

    # -- serving --

    async def start(self) -> None:
        """Listen on the configured host and port; returns once connections are accepted."""
        if self._serving is not None:
            return
        if self.closing.is_set():
            raise Error("http: the service was closed before it started")
        s = self.settings
        sock = bind(s.host, s.port)
        config = uvicorn.Config(self.app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                ws="none", timeout_graceful_shutdown=GRACE_S)
        self._server = _Server(config)
        self._serving = asyncio.create_task(self._server.serve(sockets=[sock]), name="http")
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._server.started:
            if self._serving.done() or time.monotonic() > deadline:
                sock.close()
                why = await self._abandon()
                raise Error(f"http: the server on {s.host}:{s.port} did not start{why}")
            await asyncio.sleep(0.01)
        port = sock.getsockname()[1]
        self.url = f"http://{f'[{s.host}]' if ':' in s.host else s.host}:{port}/"
        log.info("HTTP: web page %s", self.url)
        log.info("HTTP: REST API %sapi/cameras, events %sapi/events", self.url, self.url)
        log.info("HTTP: OpenAI-compatible API %sv1 (model = camera: %s)", self.url, ", ".join(self.cameras.names))
        log.info("HTTP: Prometheus metrics %smetrics", self.url)

    async def run(self) -> None:
        """Serve until `close()` (at once when it was closed already)."""
        if self.closing.is_set():
            return
        await self.start()
        assert self._serving is not None
        await asyncio.shield(self._serving)

    async def close(self) -> None:
        """End the event streams and streamed answers, then stop the server."""
        self.events.close()
        await self._stop_server()

    async def _abandon(self) -> str:
        """Stop a server that did not start; ": <why>" when it failed."""
        serving = self._serving
        self._server = self._serving = None
        assert serving is not None
        if not serving.done():
            serving.cancel()
        error = (await asyncio.gather(serving, return_exceptions=True))[0]
        return f": {error}" if isinstance(error, Exception) else ""

    async def _stop_server(self) -> None:
        server, serving = self._server, self._serving
        if server is None or serving is None or serving.done():
            return
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(serving), CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.warning("HTTP: the server did not stop in time; cutting its connections")
            server.force_exit = True
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
