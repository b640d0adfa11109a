"""The HTTP front door's REST API against a real server (uvicorn on the test's loop) and a real
client: cameras, frames, pictures, watches, questions (streamed too), the event stream, body
limits, bad input, tokens, internal errors, and a prompt close with streams open.

The cameras are `ScriptedCamera`s (tests/scripted_camera.py): real camera services (door,
watches, bus) answering from a synthetic scene's ground truth instead of a model.
"""
from __future__ import annotations

import asyncio
import io
import json
import signal
import socket
import time

import httpx2
import numpy as np
import pytest
from PIL import Image

from http_serving import next_event, serving, sse_events
from scripted_camera import ScriptedCamera
from sinks.http import HttpService
from sinks.http.answers import StrippedText
from sinks.http.event_stream import EventClients, sse
from stream.camera_api import MemoryMap
from stream.door import DoorSettings
from stream.errors import Error
from stream.events import GroupAdded
from stream.http_settings import HttpSettings
from stream.sources.synthetic import SyntheticSource
from stream.watches import MAX_WATCHES


def error_of(response) -> tuple[int, str]:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
    return response.status_code, body["error"]["code"]


class RememberingCamera(ScriptedCamera):
    """A scripted camera whose memory holds groups 0..n-1 (a 2 x 4 grid, the right half pruned
    from all but the newest); `add_groups` tells the bus, thumbnails and all."""

    def __init__(self, name: str, **kw):
        super().__init__(name, **kw)
        self.groups = 0

    def memory_map(self) -> MemoryMap:
        cells = [(g, r, c) for g in range(self.groups) for r in range(2)
                 for c in range(4 if g == self.groups - 1 else 2)]
        group, row, col = (np.array([cell[i] for cell in cells], np.int64) for i in range(3))
        return MemoryMap(group=group, pts=group * 0.5, row=row, col=col, grid=(2, 4), tokens_seen=8 * self.groups,
                         groups_seen=self.groups)

    async def add_groups(self, n: int) -> None:
        for _ in range(n):
            thumb = np.full((24, 32, 3), 40 * (self.groups + 1), np.uint8)
            self.groups += 1
            await self.bus.publish(GroupAdded(self.name, self.groups - 1, (self.groups - 1) * 0.5, 8, thumb))


async def test_cameras_are_listed_with_health_status_and_watches():
    a, b = ScriptedCamera("a"), ScriptedCamera("b")
    async with serving(a, b) as (_, client):
        await b.source_state("reconnecting")
        body = (await client.get("/api/cameras")).json()
        listing = body["cameras"]
        assert body["version"] == "0.1.0" and [c["name"] for c in listing] == ["a", "b"]
        assert [c["health"] for c in listing] == ["streaming", "reconnecting"]
        one = (await client.get("/api/cameras/a")).json()
        assert set(one) == {"name", "health", "status", "watches"}
        assert one["status"]["type"] == "status" and one["status"]["camera"] == "a" and one["watches"] == []
        r = await client.get("/api/cameras/nope")
        assert error_of(r) == (404, "unknown_camera") and "cameras: a, b" in r.json()["error"]["message"]


async def test_the_newest_frame_is_a_jpeg_and_none_before_the_first():
    live = ScriptedCamera("live", source=SyntheticSource(duration_s=10.0, width=160, height=120))
    async with serving(live, ScriptedCamera("dark")) as (_, client):
        r = await client.get("/api/cameras/live/frame.jpg")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert r.headers["cache-control"] == "no-store"
        image = Image.open(io.BytesIO(r.content))
        assert image.format == "JPEG" and image.size == (160, 120)
        assert error_of(await client.get("/api/cameras/dark/frame.jpg")) == (404, "no_frame")


async def test_contact_sheet_and_timeline_are_pngs_of_what_the_memory_holds():
    cam, empty = RememberingCamera("cam"), ScriptedCamera("empty")
    async with serving(cam, empty) as (service, client):
        await cam.add_groups(3)
        assert len(service.cameras.thumbnails["cam"]) == 3
        sheet = await client.get("/api/cameras/cam/contact_sheet.png")
        assert sheet.status_code == 200 and sheet.headers["content-type"] == "image/png"
        image = np.asarray(Image.open(io.BytesIO(sheet.content)).convert("RGB"))
        assert image.shape[0] > 24 and image.shape[1] >= 8 * 32  # one row of tiles, eight columns
        first = image[4:4 + 24, 4:4 + 32]  # group 0: left half kept (40), right half dimmed
        assert (first[:, :16] == 40).all() and (first[:, 16:] == 10).all()
        line = await client.get("/api/cameras/cam/timeline.png")
        assert line.status_code == 200 and Image.open(io.BytesIO(line.content)).format == "PNG"
        for picture in ("contact_sheet.png", "timeline.png"):
            assert error_of(await client.get(f"/api/cameras/empty/{picture}")) == (404, "empty_memory")


async def test_watches_are_added_listed_and_removed():
    cam = ScriptedCamera("cam", says_yes=lambda t: False)
    async with serving(cam) as (_, client):
        spec = {"name": "door", "question": "Is the door open?", "every_s": 60.0, "cooldown_s": 5.0}
        r = await client.post("/api/cameras/cam/watches", json=spec)
        assert r.status_code == 201
        assert r.json()["camera"] == "cam" and [w["name"] for w in r.json()["watches"]] == ["door"]
        listed = (await client.get("/api/cameras/cam/watches")).json()["watches"]
        assert listed[0]["question"] == "Is the door open?" and listed[0]["every_s"] == 60.0
        assert listed[0]["camera"] == "cam" and listed[0]["cooldown_s"] == 5.0

        for bad, field in [({**spec, "every_s": -1}, "every_s"), ({**spec, "trigger": "maybe"}, "trigger"),
                           ({**spec, "colour": "red"}, "colour"), ({**spec, "name": ""}, "name"),
                           ({**spec, "camera": "other"}, "camera")]:
            r = await client.post("/api/cameras/cam/watches", json=bad)
            assert error_of(r) == (400, "bad_watch"), bad
            assert r.json()["error"]["message"].startswith(field) and r.json()["error"]["param"] == field
        r = await client.post("/api/cameras/cam/watches", json=[spec])
        assert error_of(r) == (400, "bad_request")
        odd = json.dumps({**spec, "\ud800" * 5000: 1})  # a long field name that is not valid Unicode
        r = await client.post("/api/cameras/cam/watches", content=odd, headers={"content-type": "application/json"})
        assert error_of(r) == (400, "bad_watch") and len(r.json()["error"]["message"]) <= 301

        await client.post("/api/cameras/cam/watches", json={**spec, "name": "front/door"})
        r = await client.delete("/api/cameras/cam/watches/front%2Fdoor")
        assert r.status_code == 200 and [w["name"] for w in r.json()["watches"]] == ["door"]
        r = await client.delete("/api/cameras/cam/watches/door")
        assert r.status_code == 200 and r.json()["watches"] == []
        assert error_of(await client.delete("/api/cameras/cam/watches/door")) == (404, "unknown_watch")
        assert error_of(await client.get("/api/cameras/nope/watches")) == (404, "unknown_camera")

        quiet = {"question": "Is the door open?", "on_scene_change": True}  # asked at a scene change only
        for i in range(MAX_WATCHES):
            assert (await client.post("/api/cameras/cam/watches", json={**quiet, "name": f"w{i}"})).status_code == 201
        assert error_of(await client.post("/api/cameras/cam/watches", json={**quiet, "name": "one more"})) == \
            (409, "too_many_watches")


async def test_ask_answers_and_streams_the_answer():
    cam = ScriptedCamera("cam")
    async with serving(cam) as (_, client):
        r = await client.post("/api/cameras/cam/ask",
                              json={"question": "Is it there?", "id": "q1", "max_new_tokens": 8})
        a = r.json()
        assert r.status_code == 200 and a["type"] == "answer" and a["text"] == "Yes, it is in view."
        assert a["id"] == "q1" and a["origin"] == "http" and a["question"] == "Is it there?"
        assert cam.answers[-1].origin == "http"

        async with client.stream("POST", "/api/cameras/cam/ask", json={"question": "And now?", "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = [e async for e in sse_events(r)]
        assert [e.event for e in events] == ["text", "answer"]
        assert events[0].json() == {"text": "Yes, it is in view."}
        assert events[1].json()["text"] == "Yes, it is in view." and events[1].json()["question"] == "And now?"

        for body, expect in [({"question": "  "}, (400, "empty_question")),
                             ({"question": "x" * 501}, (400, "question_too_long")),
                             ({"question": "ok?", "llm_budget": 0}, (400, "bad_llm_budget")),
                             ({"question": "ok?", "llm_budget": 10**30}, (400, "bad_llm_budget")),
                             ({"question": "ok?", "max_new_tokens": 5000}, (400, "bad_max_new_tokens")),
                             ({"question": "ok?", "id": {"a": 1}}, (400, "bad_request")),
                             ({"question": "ok?", "llm_budget": "5"}, (400, "bad_request")),
                             ({"question": "ok?", "stream": "yes"}, (400, "bad_request")),
                             ({"question": "Is it there?", "id": "q1"}, (409, "duplicate")),
                             ({"question": "", "stream": True}, (400, "empty_question")),  # refused before any text
                             ({"question": "Again?", "id": "q1", "stream": True}, (409, "duplicate"))]:
            assert error_of(await client.post("/api/cameras/cam/ask", json=body)) == expect, body
        assert error_of(await client.post("/api/cameras/nope/ask", json={"question": "hi"})) == (404, "unknown_camera")


def test_streamed_text_is_the_stripped_answer_piece_by_piece():
    text = StrippedText()
    out = [text.feed(p) for p in ["  ", "\nHello", " ", " wor", "ld", " \n"]]
    assert out == ["", "Hello", "", "  wor", "ld", ""] and text.sent == "Hello  world"
    assert text.finish("Hello  world") == ""
    assert text.finish("Hello  world\ufffd") == "\ufffd"  # what the pieces held back at the very end


async def test_busy_camera_refuses_with_429():
    cam = ScriptedCamera("cam", delay=0.5, door=DoorSettings(queue_size=0))
    async with serving(cam) as (_, client):
        first = asyncio.create_task(client.post("/api/cameras/cam/ask", json={"question": "one?"}))
        await asyncio.sleep(0.1)
        assert error_of(await client.post("/api/cameras/cam/ask", json={"question": "two?"})) == (429, "busy")
        assert (await first).status_code == 200


async def test_the_event_stream_carries_answers_watch_events_and_watch_changes():
    cam = ScriptedCamera("cam", source=SyntheticSource(duration_s=10.0, width=160, height=120))
    other = ScriptedCamera("other")
    async with serving(cam, other) as (service, client):
        async with client.stream("GET", "/api/events", params={"camera": "cam"}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r)
            await _until(lambda: len(service.events) == 1)
            await client.post("/api/cameras/other/ask", json={"question": "elsewhere?"})  # filtered out
            await client.post("/api/cameras/cam/ask", json={"question": "Is it there?", "id": 7})
            answer = (await next_event(events, "answer")).json()
            assert answer["camera"] == "cam" and answer["id"] == 7 and answer["origin"] == "http"

            await client.post("/api/cameras/cam/watches", json={"name": "seen", "question": "Is it there?",
                                                               "every_s": 0.1})
            changed = (await next_event(events, "watches")).json()
            assert [w["name"] for w in changed["watches"]] == ["seen"]
            check = (await next_event(events, "watch_check")).json()
            assert check["watch"] == "seen" and check["matches"] is True and check["outcome"] == "fire"
            fired = (await next_event(events, "event")).json()
            assert fired["watch"] == "seen" and fired["answer"] == "Yes, it is in view." and "snapshot" not in fired
            snap = await client.get(fired["snapshot_url"])
            assert snap.status_code == 200 and Image.open(io.BytesIO(snap.content)).format == "JPEG"
        await _until(lambda: len(service.events) == 0)  # the client went away: its slot is free again
        assert error_of(await client.get("/api/cameras/cam/snapshots/nope.jpg")) == (404, "unknown_snapshot")
        assert error_of(await client.get("/api/events", params={"camera": "cam,nope"})) == (404, "unknown_camera")


async def test_event_stream_clients_are_limited():
    async with serving(ScriptedCamera("cam"), max_event_clients=2) as (service, client):
        async with client.stream("GET", "/api/events") as r1, client.stream("GET", "/api/events") as r2:
            assert r1.status_code == r2.status_code == 200
            r = await client.get("/api/events")
            assert error_of(r) == (503, "busy") and "http.max_event_clients" in r.json()["error"]["message"]
        await _until(lambda: len(service.events) == 0)
        async with client.stream("GET", "/api/events") as r3:
            assert r3.status_code == 200


async def test_a_slow_event_client_loses_the_oldest_events_and_is_told():
    clients = EventClients(max_clients=2, queue_size=3, ping_s=0.05)
    slow = clients.open()
    for i in range(5):
        clients.publish("cam", sse("status", {"n": i}))
    frames = slow.frames(clients.closing, 0.05)
    got = [await anext(frames) for _ in range(6)]
    assert got[0].startswith(b"retry:")
    assert got[1] == sse("dropped", {"type": "dropped", "count": 2}) and clients.dropped == 2
    assert got[2:5] == [sse("status", {"n": i}) for i in (2, 3, 4)]
    assert got[5] == b": ping\n\n"  # nothing more to send: a ping after ping_s
    clients.close()
    assert [f async for f in frames] == [] and len(clients) == 0


async def test_request_bodies_over_the_limit_and_bad_json_are_refused():
    async with serving(ScriptedCamera("cam"), max_request_bytes=1024) as (_, client):
        big = {"question": "x" * 2000}
        r = await client.post("/api/cameras/cam/ask", json=big)
        assert error_of(r) == (413, "payload_too_large") and "http.max_request_bytes" in r.json()["error"]["message"]

        async def chunked():
            for _ in range(8):
                yield b" " * 400
        r = await client.post("/api/cameras/cam/ask", content=chunked(), headers={"content-type": "application/json"})
        assert error_of(r) == (413, "payload_too_large")

        json_type = {"content-type": "application/json"}
        r = await client.post("/api/cameras/cam/ask", content=b"{not json", headers=json_type)
        assert error_of(r) == (400, "bad_request") and "not valid JSON" in r.json()["error"]["message"]
        r = await client.post("/api/cameras/cam/ask", content=b'{"question": "hi"}',
                              headers={"content-type": "text/plain"})
        assert error_of(r) == (400, "bad_request") and "application/json" in r.json()["error"]["message"]
        assert error_of(await client.get("/api/nothing")) == (404, "not_found")
        assert error_of(await client.put("/api/cameras")) == (405, "method_not_allowed")
        r = await client.post("/api/cameras/cam/ask", json={"question": "still fine?"})
        assert r.status_code == 200


async def test_a_token_guards_everything_but_the_page():
    async with serving(ScriptedCamera("cam"), token="s3cret") as (_, client):
        for path in ("/api/cameras", "/metrics", "/v1/models", "/api/cameras/cam/frame.jpg", "/nothing"):
            r = await client.get(path)
            assert error_of(r) == (401, "unauthorized") and r.headers["www-authenticate"] == "Bearer", path
        r = await client.get("/api/cameras", headers={"Authorization": "Bearer wrong"})
        assert error_of(r) == (401, "unauthorized") and r.json()["error"]["type"] == "authentication_error"
        assert (await client.get("/api/cameras", headers={"Authorization": "Bearer s3cret"})).status_code == 200
        assert (await client.get("/metrics", params={"token": "s3cret"})).status_code == 200
        r = await client.post("/api/cameras/cam/ask", json={"question": "hi?"}, params={"token": "s3cret"})
        assert r.status_code == 200
        assert (await client.get("/")).status_code != 401  # the page asks for the token itself
        assert (await client.get("/static/app.js")).status_code != 401


async def test_a_local_server_answers_only_requests_addressed_to_this_machine():
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 makes the
    browser send `Host: evil.example`; the cameras stay out of its reach."""
    async with serving(ScriptedCamera("cam")) as (service, client):
        port = service.url.rsplit(":", 1)[1].strip("/")
        for host in ("evil.example", f"evil.example:{port}", "192.168.1.5"):
            r = await client.get("/api/cameras", headers={"Host": host})
            assert error_of(r) == (403, "foreign_host"), host
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
            assert (await client.get("/api/cameras", headers={"Host": host})).status_code == 200, host
    async with serving(ScriptedCamera("cam"), host="0.0.0.0", token="t") as (_, client):  # served to the network
        r = await client.get("/api/cameras", headers={"Host": "cams.example", "Authorization": "Bearer t"})
        assert r.status_code == 200


async def test_the_page_and_its_files_are_served_from_the_static_folder_only():
    from sinks.http.app import STATIC

    async with serving(ScriptedCamera("cam")) as (service, client):
        r = await client.get("/")
        if (STATIC / "index.html").is_file():
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        else:
            assert error_of(r) == (404, "not_found")
        for path in ("/static/..%2Fapp.py", "/static/%2E%2E%2Fapp.py", "/static/../app.py", "/static/.hidden",
                     "/static/%2e%2e", "/static/nothing.js", "/static/"):
            assert await raw_status(service.url, path) == 404, path  # sent as it is: no client normalises it
        for name in ("app.js", "style.css"):
            assert await raw_status(service.url, f"/static/{name}") == (200 if (STATIC / name).is_file() else 404)


class BrokenCamera(ScriptedCamera):
    def status(self):
        raise ZeroDivisionError("a bug")


async def test_our_own_bug_is_a_json_500_and_logged_with_its_traceback(caplog):
    async with serving(BrokenCamera("cam")) as (_, client):
        r = await client.get("/api/cameras/cam")
        assert error_of(r) == (500, "internal_error") and r.json()["error"]["type"] == "server_error"
        assert "ZeroDivisionError: a bug" in caplog.text and "Traceback" in caplog.text
        assert (await client.get("/v1/models")).status_code == 200  # and the service goes on


class StallingCamera(ScriptedCamera):
    """Says its first word, then thinks for a long time."""

    async def _answer(self, q, on_text):
        on_text("Well,")
        await asyncio.sleep(60)


async def test_close_ends_open_streams_and_questions_promptly():
    cam = StallingCamera("cam")
    service = HttpService(HttpSettings(enabled=True, port=0), {"cam": cam}, "0.1.0")
    cam.bus.subscribe(service)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    await service.start()
    run = asyncio.create_task(service.run())
    await asyncio.sleep(0.05)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # the CLI's stay

    async with httpx2.AsyncClient(base_url=service.url, timeout=10.0) as client:
        async with client.stream("GET", "/api/events") as events, \
                client.stream("POST", "/api/cameras/cam/ask", json={"question": "Hm?", "stream": True}) as answer:
            lines = sse_events(answer)
            assert (await anext(lines)).json() == {"text": "Well,"}
            waiting = asyncio.create_task(client.post("/v1/chat/completions", json={
                "model": "cam", "messages": [{"role": "user", "content": "and?"}]}))
            await _until(lambda: cam.door.queued == 1)
            t0 = time.monotonic()
            await service.close()
            await asyncio.wait_for(run, 1)
            assert time.monotonic() - t0 < 2.0
            last = [e async for e in lines]
            assert [e.event for e in last] == ["error"] and last[0].json()["code"] == "unavailable"
            assert [e async for e in sse_events(events)] == []  # ended, not cut
            assert error_of(await waiting) == (503, "unavailable")
    await _until(lambda: cam.door.queued == 0 and not cam.door._busy)  # both questions withdrawn from the door
    cam.door.stop()


async def test_a_client_that_leaves_a_streamed_answer_withdraws_its_question():
    cam = StallingCamera("cam")
    async with serving(cam) as (_, client):
        for path, body in (("/api/cameras/cam/ask", {"question": "Hm?", "stream": True}),
                           ("/v1/chat/completions", {"model": "cam", "stream": True,
                                                     "messages": [{"role": "user", "content": "Hm?"}]})):
            async with client.stream("POST", path, json=body) as r:
                assert r.status_code == 200
                await anext(r.aiter_lines())
                assert cam.door._busy
            await _until(lambda: not cam.door._busy)  # the LLM is free for the next question


async def test_a_port_in_use_is_one_clear_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = HttpService(HttpSettings(enabled=True, port=port), {}, "0.1.0")
        with pytest.raises(Error) as e:
            await service.start()
        assert str(e.value) == f"http: cannot listen on 127.0.0.1:{port}: address already in use"
        await service.close()  # nothing to stop
    with pytest.raises(Error, match="http: cannot listen on no-such-host.invalid:0: "):
        await HttpService(HttpSettings(enabled=True, host="no-such-host.invalid", port=0, token="t"), {},
                          "0.1.0").start()


async def raw_status(url: str, path: str) -> int:
    """The status of GET `path`, sent byte for byte as given."""
    host, port = httpx2.URL(url).host, httpx2.URL(url).port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    status = int((await reader.readline()).split()[1])
    writer.close()
    return status


async def _until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)
