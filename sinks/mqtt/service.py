"""The MQTT front door: questions and watch changes in; answers, errors, events and health out.

Topics, under `prefix` (default "streamprune"); payloads in protocol.py, examples in README.md "MQTT":
  <prefix>/<camera>/ask        in   JSON {"id", "question", "llm_budget"?, "max_new_tokens"?, "reply_to"?}
                                    or plain text (the question); reply_to must match
                                    `reply_to_allow` (default <prefix>/reply/#)
  <prefix>/<camera>/answer     out  every answer the camera gives (through any door; a watch's checks
                                    excepted), QoS 1; an MQTT question's answer also on its `reply_to`
  <prefix>/<camera>/error      out  {"id", "camera", "code", "message", ...} for every request not
                                    answered (also on `reply_to`), QoS 1
  <prefix>/error               out  the same, for requests to a camera this service does not serve
  <prefix>/<camera>/event      out  a watch fired, QoS 1
  <prefix>/<camera>/snapshot   out  retained JPEG of the newest frame when an event fired, QoS 1
  <prefix>/<camera>/watch/set  in   {"op": "add" | "remove" | "list", ...}
  <prefix>/<camera>/watches    out  retained list of the camera's watches
  <prefix>/<camera>/status     out  retained camera status (its source's health as it is now) and
                                    the service's counters
  <prefix>/status              out  retained "online"; "offline" on a clean stop and, as the
                                    will, when the process dies
With `homeassistant = true`, also (sinks/mqtt/homeassistant.py):
  <discovery_prefix>/device/<object id>/config
                               out  retained Home Assistant device config of each camera and its
                                    watches; re-published when a watch is added or removed (its
                                    entities reduced to their platform: HA removes them); one
                                    left by this prefix for a camera no longer served is cleared
  <prefix>/<camera>/watch/<slug>/state
                               out  retained "ON"/"OFF": whether the watch's last check matched
  <prefix>/<camera>/watch/<slug>/event
                               out  {"event_type": "fired", ...} when the watch fired, QoS 1

Questions go through the camera's one door (`CameraService.ask`): limits, `busy`, de-duplication
and `unavailable` at the camera's stop are the door's, and the door publishes the answer or the
refusal on the camera's bus, which brings it here. The service itself adds only the `reply_to`
copies and the refusals it makes before a question reaches a camera (bad payloads, unknown
cameras, retained requests); a `duplicate` is counted, not answered. At a clean stop of the
service, questions it still waits on get `unavailable`. Bad input is answered on an error topic
and counted (`counters["errors.<code>"]`); nothing a client sends stops the service, and no
topic is ever built from a name that is not a served camera's. A request published with the
retain flag is refused once, with its id (MQTT 5 "retain as published"); retained requests
left on the broker are never delivered to us (retain handling 2), so never acted on.

Delivery: everything goes out at QoS 1, up to `max_in_flight` messages awaiting acknowledgement
at once, through one bounded outbox that outlives connections (sinks/mqtt/outbox.py), so what is
produced while the broker is away is published after reconnecting; beyond `outbox_size` error
replies are dropped before answers and events, and counted. Refusals of malformed requests are
rate-limited per destination topic (sinks/mqtt/rate_limit.py; counted as `rate_limited`), so a
flood of bad requests costs the flooder its error replies, not other clients their answers;
`busy`, `unavailable`, `internal_error` and `empty_memory` are a question's outcome and go out
like answers. Retained topics
keep only their newest value and are published again on every connect (a broker restarted
without persistence has forgotten them). QoS 1 is at least once: a message in flight when the
connection drops may arrive twice. The session is persistent (a stable client id, MQTT 5 session
expiry `session_expiry_s`): questions published while the connection is down are delivered by
the broker when it is back. Every topic and payload is checked before it is queued, so nothing
queued can be refused by the client. The connection loop reconnects with doubling delay capped
at `reconnect_max_s`, forever, and survives any error (logged and counted); `run()` returns only
after `close()`.
"""
from __future__ import annotations

import asyncio
import logging
import math
import socket
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from stream.bus import Sink
from stream.camera_api import CameraService
from stream.errors import ConfigError, RequestError
from stream.events import (Answer, Event, RequestFailed, SourceState, Status, WatchChecked, WatchesChanged,
                           WatchFired)
from stream.mqtt_settings import MqttSettings, camera_topic_problem, check_settings

from .homeassistant import (Device, component_state_topic, config_filter, config_topic, fired_payload, read_config,
                            state_payload, watch_event_topic, watch_state_topic)
from .outbox import ANSWERS, ERRORS, Outbox, Outgoing
from .protocol import (ANSWER, ASK, ERROR, EVENT, MAX_PAYLOAD_BYTES, OFFLINE, ONLINE, SNAPSHOT, STATUS,
                       WATCH_SET, WATCHES, Ask, ProtocolError, Topics, answer_payload, encode, error_payload,
                       event_payload, excerpt, filter_matches, parse_ask, parse_watch_change, refusal, request_id,
                       status_payload, topic_problem, watches_payload, with_id)
from .rate_limit import RateLimiter

log = logging.getLogger(__name__)

FLUSH_ON_STOP_S = 2.0  # a clean stop waits this long for pending messages before going offline
CLOSE_TIMEOUT_S = 10.0  # a loaded machine can take seconds to flush and say offline
NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # paho leaves Nagle on: +40 ms per small message
OUTCOME_CODES = frozenset({"busy", "unavailable", "internal_error", "empty_memory"})
# a request's retain flag as its sender set it; retained requests are never sent to us on subscribing
REQUEST_OPTIONS = SubscribeOptions(qos=1, retainAsPublished=True, retainHandling=2)
# device configs under the discovery prefix: the retained ones on subscribing, not our own, none kept for us
DISCOVERY_OPTIONS = SubscribeOptions(qos=0, noLocal=True, retainHandling=0)


class _Stored(Outgoing):
    """A retained topic's value from the service's store (not an outbox message)."""


@dataclass(frozen=True)
class _Waiting:
    """An MQTT question a camera is answering (or queueing)."""

    camera: str
    ask: Ask


class MqttService(Sink):
    """Serves `cameras` on a broker: `run()` until `close()`. Subscribe it to every camera's bus."""

    name = "mqtt"

    def __init__(self, settings: MqttSettings, cameras: Mapping[str, CameraService]):
        self.settings = check_settings(settings)
        for name, camera in cameras.items():
            if camera.name != name:
                raise ValueError(f"camera {camera.name!r} is served under the name {name!r}")
            if (problem := camera_topic_problem(settings.prefix, name)) is not None:
                raise ConfigError(f"{name!r} {problem}", "name")
        self.cameras = dict(cameras)
        self.topics = Topics(settings.prefix, tuple(settings.reply_to_allow))
        self.counters: Counter = Counter()
        self.connected = asyncio.Event()
        self._outbox = Outbox(settings.outbox_size)
        self._error_replies = RateLimiter(settings.error_rate_per_s, settings.error_burst)
        self._retained: dict[str, bytes] = {}
        self._dirty: dict[str, None] = {}  # retained topics to publish, in order
        self._asks: dict[asyncio.Task, _Waiting] = {}
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._done = asyncio.Event()
        self._running = False
        self._devices = {name: Device(self.topics, name, camera.watches.max_question_chars, camera.model)
                         for name, camera in self.cameras.items()} if settings.homeassistant else {}

    @property
    def outbox_len(self) -> int:
        return len(self._outbox)

    @property
    def client_id(self) -> str:
        """Stable across restarts, so the broker can keep the session (and our requests) for us."""
        return self.settings.client_id or f"streamprune-{socket.gethostname()}-{self.settings.prefix}"

    # -- events from the cameras' buses --

    async def handle(self, event: Event) -> None:
        camera = getattr(event, "camera", None)
        if camera not in self.cameras:
            return
        if isinstance(event, Answer):
            self._send(self.topics.camera(camera, ANSWER), encode(answer_payload(event)))
        elif isinstance(event, RequestFailed):
            self._send(self.topics.camera(camera, ERROR), encode(error_payload(event)), lane=_lane(event.code))
        elif isinstance(event, Status):
            self._publish_status(event)
        elif isinstance(event, SourceState):
            self._publish_status(self.cameras[camera].status())
        elif isinstance(event, WatchFired):
            snapshot = self.topics.camera(camera, SNAPSHOT) if event.snapshot else None
            if snapshot is not None:
                self._send(snapshot, event.snapshot, retain=True)
            self._send(self.topics.camera(camera, EVENT), encode(event_payload(event, snapshot)))
            self.counters["events"] += 1
            if self.settings.homeassistant:
                self._send(watch_event_topic(self.topics, camera, event.watch),
                           encode(fired_payload(event, snapshot)))
        elif isinstance(event, WatchChecked):
            self._publish_watch_state(event)
        elif isinstance(event, WatchesChanged):  # through any door: the retained listing follows
            self._publish_watches(camera)
            if self.settings.homeassistant:
                self._announce(camera)

    # -- serving --

    async def run(self) -> None:
        """Connect, serve, reconnect with capped backoff, forever; returns after `close()`."""
        self._running = True
        self._done.clear()
        for name, camera in self.cameras.items():
            self._publish_status(camera.status())
            self._publish_watches(name)
            if self.settings.homeassistant:
                self._announce(name)
        try:
            await self._connect_loop()
        finally:
            waiting = list(self._asks)
            for t in waiting:
                t.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            self._running = False
            self._done.set()

    async def close(self) -> None:
        """Stop: waiting questions refused, pending messages sent (briefly), `offline` retained."""
        self._stop.set()
        if self._running:
            try:
                await asyncio.wait_for(self._done.wait(), CLOSE_TIMEOUT_S)
            except TimeoutError:
                log.warning("MQTT service did not stop within %.0f s", CLOSE_TIMEOUT_S)

    async def say_offline(self, timeout_s: float = 5.0) -> None:
        """Publish `offline` on a connection of its own: for when `run()` gave up (its connection
        closed cleanly, so the broker will not send the will)."""
        try:
            async with asyncio.timeout(timeout_s), self._client() as client:
                await client.publish(self.topics.status, OFFLINE, qos=1, retain=True)
        except (aiomqtt.MqttError, TimeoutError) as e:
            log.warning("MQTT: could not say offline: %s", e)

    def _client(self) -> aiomqtt.Client:
        s = self.settings
        tls = None
        if s.tls:
            tls = aiomqtt.TLSParameters(ca_certs=_path(s.ca_file), certfile=_path(s.cert_file),
                                        keyfile=_path(s.key_file))
        session = Properties(PacketTypes.CONNECT)
        session.SessionExpiryInterval = s.session_expiry_s
        client = aiomqtt.Client(s.host, s.port, identifier=self.client_id, username=s.username or None,
                                password=s.password or None, keepalive=s.keepalive, tls_params=tls,
                                protocol=aiomqtt.ProtocolVersion.V5, clean_start=s.session_expiry_s == 0,
                                properties=session, max_inflight_messages=s.max_in_flight,
                                will=aiomqtt.Will(self.topics.status, OFFLINE, qos=1, retain=True),
                                socket_options=[NODELAY])
        client.pending_calls_threshold = s.max_in_flight  # it warns beyond this many publishes awaiting acks
        return client

    async def _connect_loop(self) -> None:
        s = self.settings
        delay = s.reconnect_min_s
        while not self._stop.is_set():
            try:
                async with self._client() as client:  # a new one each time: a dropped one may be in any state
                    delay = s.reconnect_min_s
                    await self._session(client)
                return
            except aiomqtt.MqttError as e:
                log.warning("MQTT broker %s:%d: %s; retrying in %.1f s", s.host, s.port, e, delay)
            except Exception:
                log.exception("MQTT: the connection to %s:%d failed; retrying in %.1f s", s.host, s.port, delay)
            self.counters["connection_failures"] += 1
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, s.reconnect_max_s)

    async def _session(self, client: aiomqtt.Client) -> None:
        """One connection: announce, subscribe, then read and publish until it drops or we stop."""
        self.counters["connects"] += 1
        log.info("MQTT connected to %s:%d as %s", self.settings.host, self.settings.port, client.identifier)
        await client.publish(self.topics.status, ONLINE, qos=1, retain=True)
        await client.subscribe([(f, REQUEST_OPTIONS) for f in self.topics.requests()])
        if self.settings.homeassistant:
            await client.subscribe(config_filter(self.settings.discovery_prefix), options=DISCOVERY_OPTIONS)
        self._dirty.update(dict.fromkeys(self._retained))
        self._wake.set()
        self.connected.set()
        reader, writer = asyncio.create_task(self._reader(client)), asyncio.create_task(self._writer(client))
        stop = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait([reader, writer, stop], return_when=asyncio.FIRST_COMPLETED)
            for t in done - {stop}:
                t.result()  # the reader's or writer's error: the connection is gone, reconnect
            if not self._stop.is_set():
                raise aiomqtt.MqttError("the connection ended")
            reader.cancel()  # a clean stop: no more requests; what is in the outbox goes out first
            await self._stop_answering()
            self._wake.set()
            try:
                await asyncio.wait_for(writer, FLUSH_ON_STOP_S)  # it returns once everything is sent
            except TimeoutError:
                log.warning("MQTT: %d messages not delivered at stop", len(self._outbox))
            await client.publish(self.topics.status, OFFLINE, qos=1, retain=True)
        finally:
            self.connected.clear()
            for t in (reader, writer, stop):
                t.cancel()
            await asyncio.gather(reader, writer, stop, return_exceptions=True)

    async def _reader(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            try:
                self._receive(message.topic.value, bytes(message.payload or b""), message.retain)
            except Exception:
                self.counters["errors.internal_error"] += 1
                log.exception("MQTT: failed on a message on %.200r", message.topic.value)

    async def _writer(self, client: aiomqtt.Client) -> None:
        """Keeps up to `max_in_flight` messages publishing; returns once stopping with nothing left.
        A failed publish means the connection is gone: its error ends the session."""
        in_flight: set[asyncio.Task] = set()
        try:
            while True:
                self._wake.clear()
                while len(in_flight) < self.settings.max_in_flight and (item := self._take()) is not None:
                    in_flight.add(asyncio.create_task(self._publish(client, item)))
                if not in_flight and self._stop.is_set():
                    return
                wake = asyncio.create_task(self._wake.wait())
                try:
                    done, _ = await asyncio.wait(in_flight | {wake}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    wake.cancel()
                for t in done - {wake}:
                    in_flight.discard(t)
                    t.result()
        finally:
            for t in in_flight:
                t.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)

    def _take(self) -> Outgoing | None:
        """Retained topics first (their newest value), then the outbox."""
        if self._dirty:
            topic = next(iter(self._dirty))
            del self._dirty[topic]
            return _Stored(topic, self._retained[topic], retain=True)
        return self._outbox.take()

    async def _publish(self, client: aiomqtt.Client, item: Outgoing) -> None:
        """One message until acknowledged. No timeout on the acknowledgement: aiomqtt's timeout
        goes through Python 3.11's `asyncio.wait_for`, which loses a cancellation that races the
        acknowledgement, and the writer would outlive its connection; a dead connection ends
        the reader instead, and the session cancels this."""
        try:
            await client.publish(item.topic, item.payload, qos=1, retain=item.retain, timeout=math.inf)
        except BaseException:
            if isinstance(item, _Stored):
                self._dirty[item.topic] = None  # its newest value goes out again
            else:
                self._outbox.release(item)
            raise
        if not isinstance(item, _Stored):
            self._outbox.done(item)
        elif not item.payload and self._retained.get(item.topic) == b"" and item.topic not in self._dirty:
            del self._retained[item.topic]  # a cleared topic stays cleared: no need to clear it again
        self.counters["published"] += 1

    def _sendable(self, topic: str, payload: bytes) -> bool:
        """Whether the client will take this message; one it would refuse is logged and counted here,
        never queued (it would fail the connection again on every reconnect)."""
        problem = topic_problem(topic)
        if problem is None and len(payload) > MAX_PAYLOAD_BYTES:
            problem = f"the payload has {len(payload)} bytes"
        if problem is not None:
            self.counters["unsendable"] += 1
            log.error("MQTT: not sending to topic %.200r: %s", topic, problem)
        return problem is None

    def _send(self, topic: str, payload: bytes, retain: bool = False, lane: int = ANSWERS) -> None:
        if not self._sendable(topic, payload):
            return
        if lane == ERRORS and not self._error_replies.allow(topic):
            self.counters["rate_limited"] += 1
            return
        dropped = self._outbox.put(Outgoing(topic, payload, retain, lane))
        if dropped is not None:
            self.counters["outbox_dropped"] += 1
            log.debug("MQTT outbox full: dropped a message for %.200r", dropped.topic)
        self._wake.set()

    def _retain(self, topic: str, payload: bytes) -> None:
        if not self._sendable(topic, payload):
            return
        self._retained[topic] = payload
        self._dirty[topic] = None
        self._wake.set()

    def _publish_status(self, status: Status) -> None:
        self._retain(self.topics.camera(status.camera, STATUS), encode(status_payload(status, self.counters)))

    def _publish_watches(self, camera: str) -> dict:
        listing = watches_payload(camera, self.cameras[camera].watches.describe())
        self._retain(self.topics.camera(camera, WATCHES), encode(listing))
        return listing

    # -- Home Assistant discovery (homeassistant.py) --

    def _announce(self, camera: str) -> None:
        """The camera's device config as its watches are now: new watches with their last state,
        removed ones reduced to their platform and their state cleared."""
        device = self._devices[camera]
        listing = self.cameras[camera].watches.describe()
        known = set(device.watches)
        for name in device.set_watches(w["name"] for w in listing):
            self._retain(watch_state_topic(self.topics, camera, name), b"")
        for w in listing:
            if w["name"] not in known and w["matches"] is not None:
                self._retain(watch_state_topic(self.topics, camera, w["name"]), state_payload(w["matches"]))
        self._publish_device(camera)

    def _publish_device(self, camera: str) -> None:
        topic = config_topic(self.settings.discovery_prefix, self.settings.prefix, camera)
        payload = encode(self._devices[camera].config())
        if self._retained.get(topic) != payload:
            self._retain(topic, payload)

    def _publish_watch_state(self, checked: WatchChecked) -> None:
        """A check that said whether the condition holds sets the watch's binary sensor."""
        device = self._devices.get(checked.camera)
        if device is None or checked.matches is None:
            return
        if checked.watch not in device.watches:  # checked before its WatchesChanged reached us
            self._announce(checked.camera)
            if checked.watch not in device.watches:
                return
        self._retain(watch_state_topic(self.topics, checked.camera, checked.watch),
                     state_payload(checked.matches))

    def _discovered(self, topic: str, payload: bytes, retain: bool) -> None:
        """A retained device config found on connecting: one this prefix published for a camera
        no longer served is cleared (HA removes the device); one of a served camera with entities
        it no longer has (watches removed while the service was away) gets them removed, and their
        states cleared. Other integrations' configs are left alone."""
        if not retain:  # live traffic, not what the broker kept
            return
        found = read_config(topic, payload, self.settings.discovery_prefix, self.topics)
        if found is None:
            return
        camera, components = found
        device = self._devices.get(camera)
        if device is None:
            log.info("MQTT: removing the Home Assistant device of camera %.80r (no longer served)", camera)
            self.counters["ha_devices_removed"] += 1
            self._retain(topic, b"")
            return
        live = device.components()
        gone = {cid: platform for cid, platform in components.items() if cid not in live}
        for cid, platform in gone.items():
            if (state := component_state_topic(self.topics, camera, cid, platform)) is not None:
                self._retain(state, b"")
        if device.forget(gone):
            log.info("MQTT: removing %d Home Assistant entities of camera %s", len(gone), camera)
            self._publish_device(camera)

    # -- requests --

    def _receive(self, topic: str, payload: bytes, retain: bool) -> None:
        request = self.topics.request(topic)
        if request is None:  # nothing else is subscribed to but device configs
            if self.settings.homeassistant and filter_matches(config_filter(self.settings.discovery_prefix), topic):
                self._discovered(topic, payload, retain)
            return
        camera, leaf = request
        if retain:  # the broker would keep it and hand it out again: refused, never acted on
            if payload:  # an empty one clears a retained request
                self._refuse(camera, RequestError("retained_request", "requests must not be retained; clear it "
                                                  "with an empty retained message on the topic it was sent to"),
                             request_id(payload, self.settings.max_payload_bytes))
        elif leaf == ASK:
            self._ask(camera, payload)
        elif leaf == WATCH_SET:
            self._watch_set(camera, payload)

    def _unknown(self, camera: str) -> RequestError:
        return RequestError("unknown_camera", f"no camera named {excerpt(camera)}; "
                            f"cameras: {', '.join(self.cameras)}")

    def _ask(self, camera: str, payload: bytes) -> None:
        self.counters["requests"] += 1
        try:
            ask = parse_ask(payload, self.settings.max_payload_bytes, self.topics)
        except ProtocolError as e:
            self._refuse(camera, e, e.id, e.reply_to)
            return
        q = ask.question
        if camera not in self.cameras:
            self._refuse(camera, self._unknown(camera), q.id, ask.reply_to, q.text)
            return
        task = asyncio.create_task(self._answer(camera, ask))
        self._asks[task] = _Waiting(camera, ask)
        task.add_done_callback(self._asks.pop)

    async def _answer(self, camera: str, ask: Ask) -> None:
        """One question through the camera's door; the door publishes the outcome on the camera's
        topics (through the bus), this adds the `reply_to` copy."""
        q = ask.question
        try:
            answer = await self.cameras[camera].ask(q)
        except RequestError as e:
            if e.code == "duplicate":
                self.counters["duplicates"] += 1
                log.info("MQTT: request %r to %s seen already; not answered again", q.id, camera)
                return
            self.counters[f"errors.{e.code}"] += 1
            log.info("MQTT: %s request %r not answered: %s (%s)", camera, q.id, e.message, e.code)
            if ask.reply_to:
                self._send(ask.reply_to, encode(error_payload(refusal(camera, e, q.id, q.text))),
                           lane=_lane(e.code))
            return
        except Exception:
            log.exception("MQTT: asking %s %r failed", camera, q.text)
            self._refuse(camera, RequestError("internal_error", "the camera failed to answer; see the service log"),
                         q.id, ask.reply_to, q.text)
            return
        self.counters["answers"] += 1
        if ask.reply_to:
            self._send(ask.reply_to, encode(answer_payload(answer)))

    async def _stop_answering(self) -> None:
        """At a clean stop, questions still waiting on a camera get `unavailable`, not silence."""
        waiting = dict(self._asks)
        for t in waiting:
            t.cancel()
        results = await asyncio.gather(*waiting, return_exceptions=True)
        for w, result in zip(waiting.values(), results):
            if isinstance(result, asyncio.CancelledError):
                q = w.ask.question
                self._refuse(w.camera, RequestError("unavailable", "the service is stopping; ask again later"),
                             q.id, w.ask.reply_to, q.text)

    def _refuse(self, camera: str, error: RequestError, id: str | int | None = None, reply_to: str | None = None,
                question: str = "") -> None:
        """A request this service refused itself: on the camera's error topic (`<prefix>/error` when
        no camera has that name) and on `reply_to`."""
        self.counters[f"errors.{error.code}"] += 1
        log.info("MQTT: %.80r request %r not answered: %s (%s)", camera, id, error.message, error.code)
        payload = encode(error_payload(refusal(camera, error, id, question)))
        self._send(self.topics.camera(camera, ERROR) if camera in self.cameras else self.topics.error, payload,
                   lane=_lane(error.code))
        if reply_to:
            self._send(reply_to, payload, lane=_lane(error.code))

    def _watch_set(self, camera: str, payload: bytes) -> None:
        """Add, remove or list a camera's watches; the retained listing follows every change."""
        self.counters["watch_requests"] += 1
        try:
            change = parse_watch_change(payload, self.settings.max_payload_bytes, self.topics)
        except ProtocolError as e:
            self._refuse(camera, e, e.id, e.reply_to)
            return
        try:
            cam = self.cameras.get(camera)
            if cam is None:
                raise self._unknown(camera)
            if change.op == "add":
                try:
                    cam.watches.add(change.spec(camera))
                except ConfigError as e:
                    raise RequestError("bad_watch", str(e)) from None
            elif change.op == "remove" and (not isinstance(change.name, str) or not cam.watches.remove(change.name)):
                raise RequestError("unknown_watch", f"camera {camera!r} has no watch named {excerpt(change.name)}")
        except RequestError as e:
            self._refuse(camera, e, change.id, change.reply_to)
            return
        listing = self._publish_watches(camera)
        if self.settings.homeassistant:
            self._announce(camera)
        if change.reply_to:
            self._send(change.reply_to, encode(with_id(listing, change.id)))


def _lane(code: str) -> int:
    """A well-formed question's outcome (`busy`, `unavailable`, ...) is its answer: delivered like
    one and never rate-limited; a refusal of what a request is goes in the error lane."""
    return ANSWERS if code in OUTCOME_CODES else ERRORS


def _path(p: str) -> str | None:
    return str(Path(p).expanduser()) if p else None
