"""`streamprune run` with `[mqtt]` as a user runs it, against a real mosquitto: the will when the
process is killed, a clean stop, and config validation of `[mqtt]` and `[[watches]]`."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mqtt_broker import Listener, retained, unique_prefix
from stream.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
ANSWER_FIELDS = {"id", "camera", "question", "answer", "t_start", "t_end", "groups", "tokens_used", "ttft_s",
                 "total_s", "model", "pruner", "timestamp"}


def _config(tmp_path, broker, prefix, *, duration_s: float, realtime: bool) -> Path:
    """configs/mqtt.toml pointed at the test broker, with a small fast synthetic camera."""
    text = (ROOT / "configs" / "mqtt.toml").read_text()
    for old, new in (('name = "garage"', 'name = "cam"'), ("duration_s = 3600.0", f"duration_s = {duration_s}"),
                     ("realtime = true", f"realtime = {str(realtime).lower()}"), ("fps = 10.0", "fps = 4.0"),
                     ("fps = 1.0", "fps = 2.0"), ('host = "localhost"', f'host = "{broker.host}"'),
                     ("port = 1883", f"port = {broker.port}"), ('prefix = "streamprune"', f'prefix = "{prefix}"'),
                     ("max_new_tokens = 32", "max_new_tokens = 4"),
                     ("status_interval_s = 5.0", "status_interval_s = 1.0"),
                     ('jsonl = "out/mqtt/answers.jsonl"', f"jsonl = {json.dumps(str(tmp_path / 'a.jsonl'))}")):
        assert old in text, old
        text = text.replace(old, new)
    cfg = tmp_path / "mqtt.toml"
    cfg.write_text(text.replace("[source]\n", "[source]\nwidth = 160\nheight = 120\n"))
    return cfg


def _start(cfg: Path, model_cache) -> subprocess.Popen:
    env = {**os.environ, "STREAMPRUNE_CACHE": str(model_cache)}
    return subprocess.Popen([sys.executable, "-m", "stream.cli", "run", str(cfg)], cwd=cfg.parent, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def _ask(L: Listener, prefix: str, rid: str) -> dict:
    await L.publish(f"{prefix}/cam/ask", json.dumps({"id": rid, "question": "What do you see?"}))
    answer = await L.until(lambda: [m.json() for m in L.on(f"{prefix}/cam/answer") if m.json()["id"] == rid],
                           timeout=60, what="the answer")
    return answer[0]


async def test_killed_service_goes_offline_by_its_will(tmp_path, broker, model_cache):
    prefix = unique_prefix()
    proc = _start(_config(tmp_path, broker, prefix, duration_s=600.0, realtime=True), model_cache)
    try:
        async with Listener(broker, f"{prefix}/#") as L:
            await L.until(lambda: [m for m in L.on(f"{prefix}/status") if m.text == "online"], timeout=60,
                          what="online")
            await L.until(lambda: any(m.json().get("groups_encoded", 0) > 0 for m in L.on(f"{prefix}/cam/status")),
                          timeout=60, what="frames in the memory")
            a = await _ask(L, prefix, "k1")
            assert ANSWER_FIELDS <= set(a) and a["model"] == "tiny-random" and a["t_end"] >= a["t_start"] >= 0
            proc.send_signal(signal.SIGKILL)
            await L.until(lambda: [m for m in L.on(f"{prefix}/status") if m.text == "offline"], timeout=10,
                          what="offline")
    finally:
        proc.kill()
        proc.wait()
    assert (await retained(broker, f"{prefix}/status")).text == "offline"
    assert proc.returncode == -signal.SIGKILL


async def test_finite_source_keeps_serving_until_sigterm_then_stops_clean(tmp_path, broker, model_cache):
    prefix = unique_prefix()
    proc = _start(_config(tmp_path, broker, prefix, duration_s=3.0, realtime=False), model_cache)
    try:
        async with Listener(broker, f"{prefix}/#") as L:
            line = await asyncio.to_thread(proc.stdout.readline)
            while line and "still answering over MQTT" not in line:
                line = await asyncio.to_thread(proc.stdout.readline)
            assert line, proc.stderr.read()
            a = await _ask(L, prefix, "s1")  # after the stream ended: the memory still answers
            assert a["camera"] == "cam" and ANSWER_FIELDS <= set(a) and a["t_end"] >= 2.0
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0, proc.stderr.read()
            await L.until(lambda: [m for m in L.on(f"{prefix}/status") if m.text == "offline"], what="offline")
    finally:
        proc.kill()
        proc.wait()
    assert (await retained(broker, f"{prefix}/status")).text == "offline"
    lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert "s1" in {r.get("id") for r in lines if r["type"] == "answer"}  # MQTT answers reach the other sinks


async def test_sigterm_in_a_burst_of_long_questions_stops_clean_every_time(tmp_path, broker, model_cache):
    """SIGTERM while the LLM is generating a long answer and more questions wait, three times:
    exit 0 within a bound, `offline` retained, and every question one outcome (an answer, `busy`
    or `unavailable`); the generation in flight is cut, not finished."""
    for attempt in range(3):
        prefix = unique_prefix()
        proc = _start(_config(tmp_path, broker, prefix, duration_s=600.0, realtime=True), model_cache)
        try:
            async with Listener(broker, f"{prefix}/#") as L:
                await L.until(lambda: any(m.json().get("groups_encoded", 0) > 0
                                          for m in L.on(f"{prefix}/cam/status")), timeout=60, what="frames")
                for i in range(12):
                    await L.publish(f"{prefix}/cam/ask", json.dumps({"id": f"b{i}", "question": "Tell me all.",
                                                                     "max_new_tokens": 1024}))
                await L.until(lambda: [m for m in L.on(f"{prefix}/cam/status") if m.json()["queued"] > 0],
                              timeout=30, what="questions waiting")
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(proc.wait, 15) == 0, proc.stderr.read()
                await L.until(lambda: [m for m in L.on(f"{prefix}/status") if m.text == "offline"], what="offline")
                outcomes = [m.json() for m in L.messages if m.topic in (f"{prefix}/cam/answer", f"{prefix}/cam/error")]
        finally:
            proc.kill()
            proc.wait()
        assert (await retained(broker, f"{prefix}/status")).text == "offline", attempt
        assert sorted(o["id"] for o in outcomes) == sorted(f"b{i}" for i in range(12)), (attempt, outcomes)
        assert {o.get("code") for o in outcomes} <= {None, "busy", "unavailable"}, attempt
        assert any(o.get("code") == "unavailable" for o in outcomes), attempt


async def test_when_every_camera_has_failed_the_service_stops_offline_and_exits_1(tmp_path, broker, model_cache):
    prefix = unique_prefix()
    cfg = _config(tmp_path, broker, prefix, duration_s=600.0, realtime=True)
    text = cfg.read_text()
    start = text.index("[source]")
    end = text.index("\n[", start + 1)
    cfg.write_text(text[:start] + '[source]\nkind = "rtsp"\nurl = "rtsp://127.0.0.1:9/x"\nmax_reconnects = 0\n'
                   + text[end:])
    proc = _start(cfg, model_cache)
    try:
        code = await asyncio.to_thread(proc.wait, 60)
    finally:
        proc.kill()
        proc.wait()
    err = proc.stderr.read()
    assert code == 1, err
    assert "every camera failed" in err and "Traceback" not in err
    assert (await retained(broker, f"{prefix}/status")).text == "offline"


def test_shipped_mqtt_config_validates():
    cfg = load_config(ROOT / "configs" / "mqtt.toml")
    assert cfg.mqtt.enabled and cfg.mqtt.prefix == "streamprune" and len(cfg.watches) == 2
    assert load_config(ROOT / "configs" / "demo.toml").mqtt.enabled is False


@pytest.mark.parametrize("toml, needle", [
    ("[mqtt]\nport = 0\n", "mqtt.port: 0 is out of range"),
    ("[mqtt]\nhots = \"x\"\n", "mqtt.hots: unknown field; accepted fields: enabled, host, port"),
    ("[mqtt]\nkeepalive = \"soon\"\n", "mqtt.keepalive: expected an integer"),
    ("[mqtt]\nprefix = \"a/+/b\"\n", "mqtt.prefix: 'a/+/b' is not a topic prefix"),
    ("[mqtt]\ntls = true\nca_file = \"/no/ca.pem\"\n", "mqtt.ca_file: no such file: /no/ca.pem"),
    ("[mqtt]\nca_file = \"/etc/hostname\"\n", "mqtt.ca_file: set only with tls = true"),
    ("[mqtt]\nreconnect_min_s = 5.0\nreconnect_max_s = 1.0\n", "mqtt.reconnect_max_s: must be >= reconnect_min_s"),
    ("name = \"a/b\"\n[mqtt]\nenabled = true\n", "name: 'a/b' must not contain '/'"),
    ("[mqtt]\nenabled = true\n[[watches]]\nname = \"w\"\nquestion = \"q\"\n",
     "watches[0].every_s: the watch has no schedule"),
    ("[mqtt]\nenabled = true\n[[watches]]\nname = \"w\"\nquestion = \"q\"\nevery_s = \"often\"\n",
     "watches[0].every_s: expected a number"),
    ("[mqtt]\nenabled = true\n[[watches]]\nname = \"w\"\nquestion = \"q\"\nevery_s = 5\ntrigger = \"maybe\"\n",
     "watches[0].trigger: 'maybe' is not accepted; accepted values: yes, no"),
    ("[mqtt]\nenabled = true\n[[watches]]\nname = \"w\"\nquestion = \"\"\nevery_s = 5\n",
     "watches[0].question: must not be empty"),
    ("[mqtt]\nenabled = true\n[[watches]]\nname = \"w\"\nquestion = \"q\"\nevery_s = 5\ncamera = \"x\"\n",
     "watches[0].camera: no camera named 'x'"),
    ("[mqtt]\nenabled = true\n[[watches]]\nname = \"w\"\nquestion = \"q\"\nevery_s = 5\n"
     "[[watches]]\nname = \"w\"\nquestion = \"q2\"\non_scene_change = true\n", "watches[1].name: 'w' is used twice"),
])
def test_bad_mqtt_config_names_the_field(tmp_path, toml, needle):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert needle in str(e.value)
