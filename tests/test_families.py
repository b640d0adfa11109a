"""Every model family end to end, with its tiny test model: the demo, every pruner from its config
key (query-aware ranking included), the family's pruner defaults, an answer through MQTT and over
HTTP, and a checkpoint of a family streamprune does not serve."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

import pruning
from mqtt_broker import Listener, unique_prefix
from stream.camera import Camera
from stream.config import from_dict
from stream.events import Question
from stream.vlm.registry import load_model

CLI = [sys.executable, "-m", "stream.cli"]
TINY = {"qwen2_5_vl": "tiny-random", "qwen3_vl": "tiny-random-qwen3-vl", "llava_onevision": "tiny-random-llava-ov"}
ECHOPRUNE = {"qwen2_5_vl": {"tau": 0.5, "radius": None}, "qwen3_vl": {"tau": 0.5, "radius": None},
             "llava_onevision": {"tau": 0.1, "radius": 1}}  # the paper's setting per family (Sec. 4.3)


@pytest.fixture(scope="module", params=list(TINY))
def family(request, model_cache):
    return request.param, load_model(TINY[request.param], cache=model_cache)


def _config(name: str, **over) -> object:
    base = {"name": "cam", "model": {"name": name},
            "source": {"kind": "synthetic", "fps": 4.0, "duration_s": 6.0, "width": 160, "height": 120},
            "memory": {"capacity": 120, "recent_groups": 2}, "query": {"max_new_tokens": 3},
            "output": {"status_interval_s": 0.0}}
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return from_dict(base)


@pytest.mark.parametrize("name", [TINY["qwen3_vl"], TINY["llava_onevision"]])  # tiny-random: tests/test_cli.py
def test_the_demo_answers_with_each_tiny_model(tmp_path, model_cache, name):
    env = {**os.environ, "STREAMPRUNE_CACHE": str(model_cache)}
    r = subprocess.run(CLI + ["demo", "--model", name, "--visuals", str(tmp_path)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Q: ") == 3 and r.stdout.count("A: ") == 3 and "covering" in r.stdout
    assert f"loading {name}" in r.stdout and "Traceback" not in r.stderr


async def test_every_pruner_answers_from_its_config_key_with_each_family(family):
    kind, vlm = family
    for name in pruning.PRUNERS:
        cam = Camera(_config(vlm.name, memory={"pruner": name}), vlm)
        async with cam:
            await cam.done()
            whole = await cam.ask(Question("What is in view?"))
            picked = await cam.ask(Question("Is anyone there?", llm_budget=20))
        assert whole.pruner == name and whole.model == vlm.name and whole.prompt_path == "cached", name
        assert whole.tokens_used == whole.memory_tokens <= 120 + 2 * vlm.max_tokens_per_group
        assert picked.prompt_path == "full" and 0 < picked.tokens_used <= 20, name  # query-aware ranking
        assert 0.0 <= whole.t_start <= whole.t_end <= 6.0 and whole.new_tokens >= 1


def test_each_family_applies_its_papers_pruner_defaults_unless_set(family):
    kind, vlm = family
    cam = Camera(_config(vlm.name, memory={"pruner": "echoprune"}), vlm)
    assert {k: getattr(cam.pruner, k) for k in ("tau", "radius")} == ECHOPRUNE[kind]
    cam = Camera(_config(vlm.name, memory={"pruner": "echoprune", "params": {"tau": 0.3}}), vlm)
    assert cam.pruner.tau == 0.3 and cam.pruner.radius == ECHOPRUNE[kind]["radius"]


async def test_each_family_answers_through_mqtt(family, broker):
    from sinks.mqtt import MqttService
    from stream.mqtt_settings import MqttSettings

    _, vlm = family
    cam = Camera(_config(vlm.name), vlm)
    prefix = unique_prefix()
    service = MqttService(MqttSettings(enabled=True, host=broker.host, port=broker.port, prefix=prefix), {"cam": cam})
    cam.bus.subscribe(service)
    async with cam:
        await cam.done()
        task = asyncio.create_task(service.run())
        try:
            await asyncio.wait_for(service.connected.wait(), 10)
            async with Listener(broker, f"{prefix}/cam/answer") as L:
                await L.publish(f"{prefix}/cam/ask", json.dumps({"id": "q1", "question": "What is in view?"}))
                answer = (await L.next_on(f"{prefix}/cam/answer")).json()
        finally:
            await service.close()
            await asyncio.wait_for(task, 10)
    assert answer["id"] == "q1" and answer["model"] == vlm.name and answer["groups"] >= 1


async def test_each_family_answers_over_http(family):
    import httpx2

    from sinks.http import HttpService
    from stream.http_settings import HttpSettings

    _, vlm = family
    cam = Camera(_config(vlm.name), vlm)
    service = HttpService(HttpSettings(enabled=True, port=0), {"cam": cam}, "test")
    cam.bus.subscribe(service)
    async with cam:
        await cam.done()
        await service.start()
        try:
            async with httpx2.AsyncClient(base_url=service.url, timeout=30) as client:
                r = await client.post("/v1/chat/completions", json={
                    "model": "cam", "messages": [{"role": "user", "content": "What is in view?"}], "max_tokens": 3})
        finally:
            await service.close()
    assert r.status_code == 200, r.text
    assert r.json()["streamprune"]["groups"] >= 1 and r.json()["usage"]["completion_tokens"] >= 1


def test_a_checkpoint_of_an_unserved_family_is_one_line_and_exit_2(tmp_path, model_cache):
    from transformers import Qwen2Config

    ckpt = tmp_path / "qwen2"
    Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(ckpt)
    env = {**os.environ, "STREAMPRUNE_CACHE": str(model_cache)}
    r = subprocess.run(CLI + ["demo", "--model", str(ckpt)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"streamprune: config error: model.name: model {str(ckpt)!r} is a 'qwen2' checkpoint; "
                                "supported families (model types): Qwen2.5-VL (qwen2_5_vl); Qwen3-VL (qwen3_vl, "
                                "qwen3_vl_moe); LLaVA-OneVision (llava_onevision)")
