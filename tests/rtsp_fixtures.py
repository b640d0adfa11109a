"""A real RTSP server for the tests: tests/rtsp_server.py (GStreamer) run by Debian's python3.

`RtspServer` keeps one port for its whole life, so a test can kill it and start it again on
the same port, or freeze it (SIGSTOP) and thaw it. Fixtures: `rtsp_clip` (an H.264 MP4 made
here with PyAV, frames of known content), `rtsp_server` (one per module, serving /live and
/clip; never killed), `rtsp_servers` (a factory of servers a test may kill or freeze; all
stopped at the end). Import them into a test module: `from rtsp_fixtures import ...`. `until`
waits on the event loop for a condition, with a deadline; `StateLog` records state events.
"""
from __future__ import annotations

import asyncio
import os
import selectors
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from clips import picture, write_h264

SYSTEM_PYTHON = "/usr/bin/python3"
SERVER = Path(__file__).with_name("rtsp_server.py")
CLIP_FPS = 30
CLIP_FRAMES = 60
CLIP_SIZE = (160, 120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_clip(
    path: Path, n: int = CLIP_FRAMES, size: tuple[int, int] = CLIP_SIZE, fps: int = CLIP_FPS
) -> list[np.ndarray]:
    """An H.264 clip of `clips.picture(0..n-1)`; returns the pictures encoded."""
    w, h = size
    return write_h264(path, [picture(i, w, h) for i in range(n)], fps)


class RtspServer:
    """One server process at a fixed 127.0.0.1 port; start / stop / kill / freeze / thaw."""

    def __init__(self, log_dir: Path, clip: Path | None = None, width: int = 160, height: int = 120,
                 fps: int = 30, gop: int = 10, port: int | None = None):
        self.port = port or free_port()
        self.args = ["--port", str(self.port), "--width", str(width), "--height", str(height),
                     "--fps", str(fps), "--gop", str(gop)] + (["--clip", str(clip)] if clip else [])
        self.log = log_dir / f"rtsp-server-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.frozen = False

    def url(self, path: str = "live") -> str:
        return f"rtsp://127.0.0.1:{self.port}/{path}"

    def start(self, timeout: float = 10.0) -> None:
        if not Path(SYSTEM_PYTHON).exists():
            pytest.fail(f"{SYSTEM_PYTHON} not found: the RTSP tests need Debian's python3 with python3-gi")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([SYSTEM_PYTHON, str(SERVER), *self.args], stdout=subprocess.PIPE,
                                         stderr=log, start_new_session=True)
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            line = self.proc.stdout.readline().decode() if sel.select(timeout) else ""
        if line.strip() != f"READY {self.port}":
            self.kill()
            pytest.fail(f"the RTSP server did not start (run `make system-deps` for GStreamer and python3-gi); "
                        f"its log {self.log}:\n{self.log.read_text()[-2000:]}")

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def freeze(self) -> None:
        self._signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)
        self.frozen = False

    def kill(self) -> None:
        """SIGKILL: a crash, with no goodbye to the clients."""
        self._signal(signal.SIGKILL)
        self._reap()

    def stop(self) -> None:
        if self.frozen:
            self.thaw()
        self._signal(signal.SIGTERM)
        try:
            self._reap(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()

    def _reap(self, timeout: float = 5) -> None:
        if self.proc is not None:
            self.proc.wait(timeout)
            self.proc.stdout.close()
            self.proc = None


@pytest.fixture(scope="module")
def rtsp_clip(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    path = tmp_path_factory.mktemp("rtsp-clip") / "clip.mp4"
    return path, write_clip(path)


@pytest.fixture(scope="module")
def rtsp_server(rtsp_clip, tmp_path_factory):
    server = RtspServer(tmp_path_factory.mktemp("rtsp-log"), clip=rtsp_clip[0])
    server.start()
    yield server
    server.stop()


@pytest.fixture
def rtsp_servers(tmp_path):
    """make(**kw) -> a started RtspServer the test may kill, restart or freeze."""
    servers: list[RtspServer] = []

    def make(**kw) -> RtspServer:
        server = RtspServer(tmp_path, **kw)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


async def until(condition, timeout: float, what: str, step: float = 0.02) -> float:
    """Wait (on the event loop) until `condition()` holds; returns the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(step)
    return time.monotonic() - start


class StateLog:
    """An `on_state` callback recording (old, new, stats) and the threads it ran on."""

    def __init__(self, then=None):
        self.seen: list[tuple[str, str, dict]] = []
        self.threads: set[int] = set()
        self.then = then

    def __call__(self, name: str, old: str, new: str, stats: dict) -> None:
        assert name
        self.seen.append((old, new, stats))
        self.threads.add(threading.get_ident())
        if self.then is not None:
            self.then(old, new, stats)

    @property
    def changes(self) -> list[tuple[str, str]]:
        return [(old, new) for old, new, _ in self.seen]
