"""The MQTT service: questions in, answers and standing-question events out, over a broker.

Topics, under `prefix` (default "streamprune"); README.md "MQTT" shows example payloads:
  <prefix>/<camera>/ask        in   JSON {"id", "question", "llm_budget"?, "max_new_tokens"?, "reply_to"?}
                                    or plain text (the question)
  <prefix>/<camera>/answer     out  the answer (also on `reply_to`), QoS 1
  <prefix>/<camera>/error      out  {"id", "camera", "code", "message"} for every request not answered
                                    (also on `reply_to`), QoS 1
  <prefix>/<camera>/event      out  a watch fired, QoS 1
  <prefix>/<camera>/snapshot   out  retained JPEG of the newest frame when an event fired, QoS 1
  <prefix>/<camera>/watch/set  in   {"op": "add" | "remove" | "list", ...}
  <prefix>/<camera>/watches    out  retained list of the camera's watches
  <prefix>/<camera>/status     out  retained pipeline counters, source state, service counters
  <prefix>/status              out  retained "online"; "offline" on a clean stop and, as the
                                    will, when the process dies

Delivery: everything goes out at QoS 1 through one bounded outbox that outlives connections, so
what is produced while the broker is away is published after reconnecting (oldest dropped and
counted beyond `outbox_size`); retained topics keep only their newest value and are published
again on every connect (a broker restarted without persistence has forgotten them). QoS 1 is
at least once: a message in flight when the connection drops may arrive twice. One aiomqtt
Client is reused in a reconnect loop with doubling delay capped at `reconnect_max_s`, forever.
Questions wait in a bounded queue per camera (one answered at a time, as the LLM runs one at a
time); a full queue is an explicit `busy` error. An accepted request id seen again within
`dedup_window_s` is not answered again. Bad input is answered on the error topic and counted
(`counters["errors.<code>"]`); nothing a client sends stops the service. A request published
with the retain flag is refused: the broker would hand it to us again on every reconnect.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiomqtt

from stream.answer import QueryError
from stream.validation import build

from .base import Sink
from .mqtt_settings import (MqttSettings, WatchSpec, check_settings, check_watch,
                            topic_level_problem)
from .watches import Camera, Watches, utc_now

log = logging.getLogger(__name__)

FLUSH_ON_STOP_S = 2.0  # a clean stop waits this long for pending messages before going offline
CLOSE_TIMEOUT_S = 10.0  # a loaded machine can take seconds to flush and say offline
MAX_ID_CHARS = 200
NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # paho leaves Nagle on: +40 ms per small message


class RequestError(Exception):
    """A request that will not be answered: `code` for machines, `message` for people."""

    def __init__(self, code: str, message: str, request_id: str | int | None = None, reply_to: str | None = None):
        super().__init__(message)
        self.code, self.message, self.request_id, self.reply_to = code, message, request_id, reply_to


@dataclass(frozen=True)
class Request:
    id: str | int | None
    question: str
    llm_budget: int | None = None
    max_new_tokens: int | None = None
    reply_to: str | None = None


@dataclass(frozen=True)
class _Outgoing:
    topic: str
    payload: bytes
    retain: bool = False


def decode_payload(payload: bytes, max_bytes: int) -> dict | str:
    """A JSON object, or the stripped text when the payload does not start with '{' or '['."""
    if len(payload) > max_bytes:
        raise RequestError("payload_too_large", f"the payload has {len(payload)} bytes; the limit is {max_bytes}")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise RequestError("bad_encoding", "the payload is not UTF-8 text") from None
    if not text.startswith(("{", "[")):
        return text
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise RequestError("bad_json", f"the payload is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError("bad_request", "expected a JSON object (or the question as plain text)")
    return body


def _request_id(body: dict) -> str | int | None:
    rid = body.get("id")
    if rid is None:
        return None
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or len(str(rid)) > MAX_ID_CHARS:
        raise RequestError("bad_request", f"id must be a string or an integer of at most {MAX_ID_CHARS} characters")
    return rid


def is_request_topic(topic: str, prefix: str) -> bool:
    """True for `<prefix>/<camera>/ask` and `<prefix>/<camera>/watch/set`."""
    if not topic.startswith(prefix + "/"):
        return False
    camera, _, leaf = topic[len(prefix) + 1:].partition("/")
    return "/" not in camera and leaf in ("ask", "watch/set")


def _reply_to(body: dict, rid: str | int | None, prefix: str) -> str | None:
    topic = body.get("reply_to")
    if topic is None:
        return None
    if (not isinstance(topic, str) or not topic or topic.startswith("$") or any(c in topic for c in "+#\0")
            or len(topic.encode()) > 65535):
        raise RequestError("bad_request", "reply_to must be a topic name (no wildcards, not starting with '$')", rid)
    if is_request_topic(topic, prefix):
        raise RequestError("bad_request", "reply_to must not be a request topic of this service", rid)
    return topic


def parse_request(payload: bytes, settings: MqttSettings) -> Request:
    """A question request from an `ask` payload, or the RequestError it deserves."""
    body = decode_payload(payload, settings.max_payload_bytes)
    if isinstance(body, str):
        body = {"question": body}
    rid = _request_id(body)
    reply_to = _reply_to(body, rid, settings.prefix)
    question = body.get("question")
    if question is not None and not isinstance(question, str):
        raise RequestError("bad_request", f"question must be a string, got {question!r}", rid, reply_to)
    if question is None or not question.strip():
        raise RequestError("empty_question", "the question is missing or empty", rid, reply_to)
    question = question.strip()
    if len(question) > settings.max_question_chars:
        raise RequestError("question_too_long", f"the question has {len(question)} characters; "
                           f"the limit is {settings.max_question_chars}", rid, reply_to)
    for key in ("llm_budget", "max_new_tokens"):
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise RequestError("bad_request", f"{key} must be an integer, got {value!r}", rid, reply_to)
    return Request(rid, question, body.get("llm_budget"), body.get("max_new_tokens"), reply_to)


def answer_payload(r: dict) -> dict:
    """What `<camera>/answer` carries, from a camera's answer record."""
    return {
        "id": r.get("id"), "camera": r["camera"], "question": r["question"], "answer": r["text"],
        "t_start": r["t_start"], "t_end": r["t_end"], "groups": r["groups_covered"], "tokens_used": r["tokens_used"],
        "ttft_s": r["ttft_s"], "total_s": r["total_s"], "model": r["model"], "pruner": r["pruner"],
        "timestamp": r["timestamp"], "memory_tokens": r.get("memory_tokens"),
    }


def _json(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


Forward = Callable[[dict], Awaitable[None]]


class MqttService(Sink):
    """Serves `cameras` on a broker; a Sink for the pipelines' records. `run()` until `close()`.

    `on_record` receives the answers it gives and the events it fires, for the other sinks.
    """

    name = "mqtt"

    def __init__(self, settings: MqttSettings, cameras: Mapping[str, Camera], watches: Sequence[WatchSpec] = (),
                 on_record: Forward | None = None, clock: Callable[[], float] = time.monotonic):
        for camera in cameras:
            if (problem := topic_level_problem(camera)) is not None:
                raise ValueError(f"camera name {camera!r} {problem}")
        self.settings = check_settings(settings)
        self.cameras = dict(cameras)
        self.prefix = settings.prefix
        self.status_topic = f"{settings.prefix}/status"
        self.on_record = on_record
        self.clock = clock
        self.counters: Counter = Counter()
        self.connected = asyncio.Event()
        self.watches = Watches(self.cameras, self._on_event, self.counters, clock)
        for spec in watches:
            if spec.camera and spec.camera not in self.cameras:
                raise ValueError(f"watch {spec.name!r}: no camera named {spec.camera!r}")
            for camera in [spec.camera] if spec.camera else self.cameras:
                self.watches.add(camera, check_watch(spec))
        self._queues: dict[str, asyncio.Queue[Request]] = {c: asyncio.Queue(settings.queue_size) for c in cameras}
        self._seen: dict[tuple[str, str | int], float] = {}  # accepted request ids, oldest first
        self._outbox: deque[_Outgoing] = deque()
        self._retained: dict[str, bytes] = {}
        self._dirty: dict[str, None] = {}  # retained topics to publish, in order
        self._status: dict[str, dict] = {}
        self._source_state: dict[str, dict] = {}
        self._workers: list[asyncio.Task] = []
        self._answering: dict[str, Request] = {}  # per camera, the request being answered
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._done = asyncio.Event()
        self._running = False

    def topic(self, camera: str, leaf: str) -> str:
        return f"{self.prefix}/{camera}/{leaf}"

    @property
    def outbox_len(self) -> int:
        return len(self._outbox)

    # -- records from the pipelines (the Sink side) --

    async def emit(self, record: dict) -> None:
        kind, camera = record.get("type"), record.get("camera")
        if camera not in self.cameras:
            return
        if kind == "status":
            self._status[camera] = record
            self._publish_status(camera)
        elif kind == "source_state":
            self._source_state[camera] = record
            self._publish_status(camera)
        elif kind == "scene_change":
            self.watches.scene_change(camera)
        elif kind == "answer":
            self._send(self.topic(camera, "answer"), _json(answer_payload(record)))
        elif kind == "error":
            self._send(self.topic(camera, "error"), _json({
                "id": record.get("id"), "camera": camera, "code": record.get("code"),
                "message": record.get("message"), "timestamp": utc_now()}))

    # -- serving --

    async def run(self) -> None:
        """Connect, serve, reconnect with capped backoff, forever; returns after `close()`."""
        self._running = True
        self._done.clear()
        for camera, cam in self.cameras.items():
            self._status[camera] = cam.status_record()
            self._publish_status(camera)
            self._publish_watches(camera)
        self._workers = [asyncio.create_task(self._worker(c)) for c in self.cameras]
        tasks = [*self._workers, asyncio.create_task(self.watches.run())]
        try:
            await self._connect_loop()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._running = False
            self._done.set()

    async def close(self) -> None:
        """Stop: pending messages sent (briefly), `offline` retained, a clean disconnect."""
        self._stop.set()
        if self._running:
            try:
                await asyncio.wait_for(self._done.wait(), CLOSE_TIMEOUT_S)
            except TimeoutError:
                log.warning("MQTT service did not stop within %.0f s", CLOSE_TIMEOUT_S)

    def _client(self) -> aiomqtt.Client:
        s = self.settings
        tls = None
        if s.tls:
            tls = aiomqtt.TLSParameters(ca_certs=_path(s.ca_file), certfile=_path(s.cert_file),
                                        keyfile=_path(s.key_file))
        ident = s.client_id or f"streamprune-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        return aiomqtt.Client(s.host, s.port, identifier=ident, username=s.username or None,
                              password=s.password or None, keepalive=s.keepalive, tls_params=tls,
                              will=aiomqtt.Will(self.status_topic, "offline", qos=1, retain=True),
                              socket_options=[NODELAY])

    async def _connect_loop(self) -> None:
        s = self.settings
        client = self._client()
        delay = s.reconnect_min_s
        while not self._stop.is_set():
            try:
                async with client:
                    delay = s.reconnect_min_s
                    await self._session(client)
            except aiomqtt.MqttError as e:
                self.counters["connection_failures"] += 1
                log.warning("MQTT broker %s:%d: %s; retrying in %.1f s", s.host, s.port, e, delay)
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, s.reconnect_max_s)

    async def _session(self, client: aiomqtt.Client) -> None:
        """One connection: announce, subscribe, then read and publish until it drops or we stop."""
        self.counters["connects"] += 1
        log.info("MQTT connected to %s:%d as %s", self.settings.host, self.settings.port, client.identifier)
        await client.publish(self.status_topic, "online", qos=1, retain=True)
        await client.subscribe([(f"{self.prefix}/+/ask", 1), (f"{self.prefix}/+/watch/set", 1)])
        self._dirty.update(dict.fromkeys(self._retained))
        self._wake.set()
        self.connected.set()
        tasks = [asyncio.create_task(self._reader(client)), asyncio.create_task(self._writer(client)),
                 asyncio.create_task(self._stop.wait())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.connected.clear()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            t.result()  # the reader's or writer's MqttError: reconnect
        await self._stop_answering()
        try:
            await asyncio.wait_for(self._publish_pending(client), FLUSH_ON_STOP_S)
        except TimeoutError:
            log.warning("MQTT: %d messages not delivered at stop", len(self._outbox))
        await client.publish(self.status_topic, "offline", qos=1, retain=True)

    async def _reader(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            try:
                self._handle(message.topic.value, bytes(message.payload or b""), message.retain)
            except Exception:
                self.counters["errors.internal_error"] += 1
                log.exception("MQTT: failed on a message on %s", message.topic.value)

    async def _writer(self, client: aiomqtt.Client) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._publish_pending(client)

    async def _publish_pending(self, client: aiomqtt.Client) -> None:
        """Retained topics first, then the outbox oldest first; an item leaves only once acknowledged."""
        while self._dirty or self._outbox:
            if self._dirty:
                topic = next(iter(self._dirty))
                del self._dirty[topic]
                try:
                    await client.publish(topic, self._retained[topic], qos=1, retain=True)
                except BaseException:
                    self._dirty[topic] = None
                    raise
            else:
                item = self._outbox[0]
                await client.publish(item.topic, item.payload, qos=1, retain=item.retain)
                if self._outbox and self._outbox[0] is item:
                    self._outbox.popleft()
            self.counters["published"] += 1

    def _send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self._outbox.append(_Outgoing(topic, payload, retain))
        while len(self._outbox) > self.settings.outbox_size:
            dropped = self._outbox.popleft()
            self.counters["outbox_dropped"] += 1
            log.debug("MQTT outbox full: dropped a message for %s", dropped.topic)
        self._wake.set()

    def _retain(self, topic: str, payload: bytes) -> None:
        self._retained[topic] = payload
        self._dirty[topic] = None
        self._wake.set()

    def _publish_status(self, camera: str) -> None:
        status = {k: v for k, v in self._status.get(camera, {}).items() if k != "type"}
        source = self._source_state.get(camera)
        self._retain(self.topic(camera, "status"), _json({
            **status, "camera": camera,
            "source": {k: v for k, v in source.items() if k not in ("type", "camera")} if source else None,
            "queued": self._queues[camera].qsize(), "watches": len(self.watches.describe(camera)),
            "mqtt": dict(sorted(self.counters.items())), "timestamp": utc_now(),
        }))

    def _publish_watches(self, camera: str) -> dict:
        listing = {"camera": camera, "watches": self.watches.describe(camera), "timestamp": utc_now()}
        self._retain(self.topic(camera, "watches"), _json(listing))
        return listing

    # -- requests --

    def _handle(self, topic: str, payload: bytes, retain: bool = False) -> None:
        camera, _, leaf = topic[len(self.prefix) + 1:].partition("/")
        if retain:  # sent before we subscribed, and again on every reconnect: stale, never acted on
            self._reject(camera, RequestError("retained_request", f"requests must not be retained; clear it with "
                                              f"an empty retained message on {topic}"))
        elif leaf == "ask":
            self._ask(camera, payload)
        elif leaf == "watch/set":
            self._watch_set(camera, payload)

    def _ask(self, camera: str, payload: bytes) -> None:
        self.counters["requests"] += 1
        try:
            req = parse_request(payload, self.settings)
            if camera not in self.cameras:
                raise RequestError("unknown_camera", f"no camera named {camera!r}; cameras: {', '.join(self.cameras)}",
                                   req.id, req.reply_to)
        except RequestError as e:
            self._reject(camera, e)
            return
        if self._is_duplicate(camera, req.id):
            self.counters["duplicates"] += 1
            log.info("MQTT: request %r to %s seen already; not answered again", req.id, camera)
            return
        try:
            self._queues[camera].put_nowait(req)
        except asyncio.QueueFull:
            self._reject(camera, RequestError(
                "busy", f"camera {camera!r} already has {self.settings.queue_size} questions waiting; ask again later",
                req.id, req.reply_to))
            return
        if req.id is not None and self.settings.dedup_window_s > 0:
            self._seen[(camera, req.id)] = self.clock()

    async def _stop_answering(self) -> None:
        """At a clean stop, questions waiting or being answered get `unavailable`, not silence."""
        for t in self._workers:
            t.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for camera, queue in self._queues.items():
            pending = [self._answering.pop(camera)] if camera in self._answering else []
            while not queue.empty():
                pending.append(queue.get_nowait())
            for req in pending:
                self._reject(camera, RequestError("unavailable", "the service is stopping; ask again later",
                                                  req.id, req.reply_to))

    def _is_duplicate(self, camera: str, rid: str | int | None) -> bool:
        if rid is None or self.settings.dedup_window_s <= 0:
            return False
        cutoff = self.clock() - self.settings.dedup_window_s
        while self._seen and next(iter(self._seen.values())) < cutoff:
            del self._seen[next(iter(self._seen))]
        return (camera, rid) in self._seen

    def _reject(self, camera: str, e: RequestError) -> None:
        self.counters[f"errors.{e.code}"] += 1
        log.info("MQTT: %s request %r not answered: %s (%s)", camera, e.request_id, e.message, e.code)
        payload = _json({"id": e.request_id, "camera": camera, "code": e.code, "message": e.message,
                         "timestamp": utc_now()})
        self._send(self.topic(camera, "error"), payload)
        if e.reply_to:
            self._send(e.reply_to, payload)

    async def _worker(self, camera: str) -> None:
        """Answers the camera's queued requests one at a time."""
        cam, queue = self.cameras[camera], self._queues[camera]
        while True:
            req = await queue.get()
            self._answering[camera] = req
            try:
                record = await cam.answer(req.question, llm_budget=req.llm_budget,
                                          max_new_tokens=req.max_new_tokens, request_id=req.id)
            except QueryError as e:
                del self._answering[camera]
                self._reject(camera, RequestError(e.code, e.message, req.id, req.reply_to))
                continue
            except Exception:
                del self._answering[camera]
                log.exception("MQTT: answering %r on %s failed", req.question, camera)
                self._reject(camera, RequestError("internal_error", "the camera failed to answer; see the service log",
                                                  req.id, req.reply_to))
                continue
            del self._answering[camera]
            self.counters["answers"] += 1
            payload = _json({**answer_payload(record), "id": req.id})
            self._send(self.topic(camera, "answer"), payload)
            if req.reply_to:
                self._send(req.reply_to, payload)
            if self.on_record is not None:
                await self.on_record({**record, "id": req.id})

    def _watch_set(self, camera: str, payload: bytes) -> None:
        """{"op": "add", "name", "question", "every_s"?, ...} | {"op": "remove", "name"} | {"op": "list"}."""
        self.counters["watch_requests"] += 1
        rid = reply_to = None
        try:
            body = decode_payload(payload, self.settings.max_payload_bytes)
            if not isinstance(body, dict):
                raise RequestError("bad_watch", 'expected a JSON object {"op": "add" | "remove" | "list", ...}')
            rid = _request_id(body)
            reply_to = _reply_to(body, rid, self.prefix)
            if camera not in self.cameras:
                raise RequestError("unknown_camera", f"no camera named {camera!r}; cameras: {', '.join(self.cameras)}")
            op = body.get("op")
            fields = {k: v for k, v in body.items() if k not in ("op", "id", "reply_to")}
            if op == "add":
                self._add_watch(camera, fields)
            elif op == "remove":
                name = fields.get("name")
                if not isinstance(name, str) or not self.watches.remove(camera, name):
                    raise RequestError("unknown_watch", f"camera {camera!r} has no watch named {name!r}")
            elif op != "list":
                raise RequestError("bad_watch", f"op must be \"add\", \"remove\" or \"list\", got {op!r}")
        except RequestError as e:
            e.request_id = e.request_id if e.request_id is not None else rid
            e.reply_to = e.reply_to or reply_to
            self._reject(camera, e)
            return
        listing = self._publish_watches(camera)
        if reply_to:
            self._send(reply_to, _json({**listing, "id": rid}))

    def _add_watch(self, camera: str, fields: dict) -> None:
        if fields.get("camera", camera) != camera:
            raise RequestError("bad_watch", f"camera: this is the topic of camera {camera!r}")
        try:
            spec = check_watch(build(WatchSpec, {**fields, "camera": camera}))
            self.watches.add(camera, spec)
        except ValueError as e:  # a SettingsError naming the field, or too many watches
            raise RequestError("bad_watch", str(e)) from None

    async def _on_event(self, camera: str, event: dict, jpeg: bytes | None) -> None:
        """A watch fired: the snapshot first (retained), then the event naming it."""
        if jpeg:
            self._send(self.topic(camera, "snapshot"), jpeg, retain=True)
        event = {**event, "snapshot": self.topic(camera, "snapshot") if jpeg else None}
        self._send(self.topic(camera, "event"), _json(event))
        self.counters["events"] += 1
        if self.on_record is not None:
            await self.on_record(event)


def _path(p: str) -> str | None:
    return str(Path(p).expanduser()) if p else None
