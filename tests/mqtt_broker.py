"""A real mosquitto broker for the tests, and a test client that records what it receives.

`mqtt_broker` is session-scoped and synchronous (a subprocess, no event loop); `broker` hands it
to one test, started. `Broker.stop()` / `start()` restart it on the same port (no persistence:
a restart forgets retained messages and sessions, as a real broker restart without a disk would).
Test modules import the fixtures: `from mqtt_broker import broker, mqtt_broker  # noqa: F401`.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """mosquitto on 127.0.0.1:`port`, anonymous, in memory only."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path):
        self.port = _free_port()
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                             "set_tcp_nodelay true\n")
        self.proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start and wait until it accepts connections."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.01)
        raise RuntimeError(f"mosquitto did not accept connections on port {self.port}:\n{self.log.read_text()}")

    def stop(self) -> None:
        """Terminate it (its clients see the connection close) and wait for the exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory):
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed (`make system-deps`)")
    b = Broker(tmp_path_factory.mktemp("mosquitto"))
    b.start()
    yield b
    b.stop()


@pytest.fixture
def broker(mqtt_broker):
    """The session broker, running (an earlier test may have stopped it)."""
    if not mqtt_broker.running:
        mqtt_broker.start()
    return mqtt_broker


def unique_prefix() -> str:
    """A topic prefix of its own per test, so retained messages never leak between tests."""
    return f"t{uuid.uuid4().hex[:10]}"


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool

    def json(self):
        return json.loads(self.payload)

    @property
    def text(self) -> str:
        return self.payload.decode()


class Listener:
    """A test client: subscribes to `filters` (QoS 1) on entry, records every message in order,
    and publishes requests. `async with Listener(broker, "p/#") as L: ...`."""

    def __init__(self, broker: Broker, *filters: str):
        self.broker = broker
        self.filters = filters
        self.messages: list[Received] = []
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Listener:
        self.client = aiomqtt.Client(self.broker.host, self.broker.port, identifier=f"test-{uuid.uuid4().hex[:8]}",
                                     socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        await self.client.__aenter__()
        for f in self.filters:
            await self.client.subscribe(f, qos=1)
        self._task = asyncio.create_task(self._collect())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self.client.__aexit__(None, None, None)
        except aiomqtt.MqttError:
            pass

    async def _collect(self) -> None:
        async for m in self.client.messages:
            self.messages.append(Received(m.topic.value, bytes(m.payload), m.retain))
            self._changed.set()

    async def publish(self, topic: str, payload: str | bytes, qos: int = 1, retain: bool = False) -> None:
        await self.client.publish(topic, payload, qos=qos, retain=retain)

    def on(self, topic: str) -> list[Received]:
        return [m for m in self.messages if m.topic == topic]

    async def until(self, predicate, timeout: float = 10.0, what: str = "a condition"):
        """Wait until `predicate()` is truthy and return its value."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not (value := predicate()):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                topics = sorted({m.topic for m in self.messages})
                raise AssertionError(f"timed out waiting for {what}; got {len(self.messages)} messages on {topics}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.1))
            except TimeoutError:
                pass
        return value

    async def next_on(self, topic: str, after: int = 0, timeout: float = 10.0) -> Received:
        """The first message on `topic` beyond the first `after` ones."""
        return (await self.until(lambda: self.on(topic)[after:], timeout, f"message {after + 1} on {topic}"))[0]


async def retained(broker: Broker, topic: str, timeout: float = 5.0) -> Received:
    """What a new subscriber to `topic` gets as its retained message."""
    async with Listener(broker, topic) as fresh:
        m = await fresh.next_on(topic, timeout=timeout)
    assert m.retain, f"{topic}: not a retained message"
    return m
