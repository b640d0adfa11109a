"""The MQTT front door under abuse and trouble, against a real mosquitto: a flood of bad requests
with good questions inside it, a dropped link with questions sent meanwhile, and clean stops in
the middle of a burst, over and over."""
from __future__ import annotations

import asyncio
import json
import time

import aiomqtt

from mqtt_broker import Listener, retained, unique_prefix
from scripted_camera import ScriptedCamera, running
from sinks.mqtt import MqttService
from stream.door import DoorSettings
from tcp_proxy import Proxy
from test_mqtt import serving, settings


async def test_a_flood_of_bad_requests_does_not_cost_other_clients_their_answers(broker):
    prefix = unique_prefix()
    cam = ScriptedCamera("cam", delay=0.02)
    service = MqttService(settings(broker, prefix, outbox_size=200), {"cam": cam})
    flood, good = 5000, 5
    async with Listener(broker, f"{prefix}/#") as L, running(cam, sink=service), serving(service):
        async with aiomqtt.Client(broker.host, broker.port, identifier=f"flood-{prefix}") as flooder:
            t0 = time.monotonic()
            for i in range(flood):
                await flooder.publish(f"{prefix}/cam/ask", json.dumps(
                    {"id": i, "question": 5, "reply_to": f"{prefix}/reply/flood"}), qos=0)
                if i % (flood // good) == 0:
                    n = i // (flood // good)
                    await L.publish(f"{prefix}/cam/ask", json.dumps(
                        {"id": f"good{n}", "question": "Is it there?", "reply_to": f"{prefix}/reply/good{n}"}))
            await L.until(lambda: all(L.on(f"{prefix}/reply/good{n}") for n in range(good)), timeout=30,
                          what="every good question's answer")
            elapsed = time.monotonic() - t0
        answered = [m.json()["id"] for m in L.on(f"{prefix}/cam/answer")]
        await L.until(lambda: service.counters["requests"] >= flood * 0.9, timeout=30, what="the flood to arrive")
        assert service.connected.is_set() and service.counters["connects"] == 1
    assert sorted(answered) == [f"good{n}" for n in range(good)]
    assert all(L.on(f"{prefix}/reply/good{n}")[0].json()["answer"] for n in range(good))
    s = service.counters
    assert s["errors.bad_request"] + good >= s["requests"] * 0.99  # each bad request was refused and counted
    assert s["rate_limited"] > 0 and s["outbox_dropped"] == 0
    replies = len(L.on(f"{prefix}/reply/flood"))
    assert replies <= 50 + 10 * (elapsed + 5), (replies, elapsed)  # the flooder's burst and rate, no more


async def test_questions_sent_while_the_link_is_down_are_answered_after(broker):
    """The broker keeps the service's session (a stable client id, a session expiry) while the
    link is down, and hands over what was asked meanwhile."""
    prefix = unique_prefix()
    cam = ScriptedCamera("cam")
    async with Proxy(broker.host, broker.port) as proxy:
        s = settings(broker, prefix, session_expiry_s=60)
        service = MqttService(type(s)(**{**s.__dict__, "host": proxy.host, "port": proxy.port}), {"cam": cam})
        async with Listener(broker, f"{prefix}/#") as L, running(cam, sink=service), serving(service):
            proxy.cut()
            await L.until(lambda: not service.connected.is_set(), what="the service to notice the drop")
            for i in range(3):
                await L.publish(f"{prefix}/cam/ask", json.dumps({"id": f"away{i}", "question": f"q{i}?"}))
            await asyncio.sleep(0.3)
            proxy.restore()
            await L.until(lambda: len(L.on(f"{prefix}/cam/answer")) >= 3, timeout=15, what="the three answers")
            assert sorted(m.json()["id"] for m in L.on(f"{prefix}/cam/answer")) == ["away0", "away1", "away2"]
            assert service.counters["connects"] >= 2


async def test_a_clean_stop_in_a_burst_says_offline_and_answers_every_question_once_every_time(broker):
    """The CLI's order (cameras stop, then the service), at a random point of a burst, ten times:
    `offline` retained every time, within a bound, and every question gets exactly one outcome."""
    for attempt in range(10):
        prefix = unique_prefix()
        cam = ScriptedCamera("cam", delay=0.05, door=DoorSettings(queue_size=8))
        service = MqttService(settings(broker, prefix), {"cam": cam})
        async with Listener(broker, f"{prefix}/#") as L:
            task = asyncio.create_task(service.run())
            await asyncio.wait_for(service.connected.wait(), 10)
            async with running(cam, sink=service):
                for i in range(40):
                    await L.publish(f"{prefix}/cam/ask", json.dumps({"id": f"b{i}", "question": "Up?"}), qos=0)
                await L.until(lambda: service.counters["requests"] >= 10 + attempt * 3, what="part of the burst")
                t0 = time.monotonic()
            await service.close()
            await asyncio.wait_for(task, 10)
            stopped_in = time.monotonic() - t0
            assert (await retained(broker, f"{prefix}/status")).text == "offline", attempt
            assert stopped_in < 5, (attempt, stopped_in)
            await asyncio.sleep(0.2)
        outcomes = [m.json() for m in L.messages if m.topic in (f"{prefix}/cam/answer", f"{prefix}/cam/error")]
        ids = [o["id"] for o in outcomes]
        assert len(ids) == len(set(ids)) == service.counters["requests"], (attempt, len(ids))
        assert {o["code"] for o in outcomes if "code" in o} <= {"busy", "unavailable"}, attempt


async def test_a_service_that_gives_up_says_offline_and_fails_the_run(broker):
    """`run()` failing past its restart policy (our bug, outside the connection loop that survives
    everything else) ends the run as failed, and `offline` is published, not left `online`."""
    from stream.cli import _failed_for_good
    from stream.supervisor import RestartPolicy, Supervisor

    class Broken(MqttService):
        async def _connect_loop(self):
            raise RuntimeError("a bug")

    prefix = unique_prefix()
    service = Broken(settings(broker, prefix), {"cam": ScriptedCamera("cam")})
    async with Listener(broker, f"{prefix}/#") as L:
        await L.publish(f"{prefix}/status", "online", retain=True)  # what a crashed run would leave
        services = Supervisor("streamprune", policy=RestartPolicy(initial_s=0.01, max_failures=2))
        services.start("mqtt", service.run)
        await asyncio.wait_for(_failed_for_good(services, "mqtt", service.say_offline), 10)
    assert services.failed == ["mqtt"] and services.state("mqtt").failures == 3
    assert (await retained(broker, f"{prefix}/status")).text == "offline"
