"""End to end: synthetic camera -> tiny model -> pruned memory -> answers, and ingest during queries."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from stream.answer import QueryError
from stream.config import from_dict
from stream.pipeline import CameraPipeline


def _config(**over):
    base = {
        "name": "cam",
        "source": {"kind": "synthetic", "fps": 4.0, "duration_s": 16.0, "seed": 1},
        "sampler": {"fps": 2.0},
        "memory": {"pruner": "echoprune", "capacity": 400, "recent_groups": 2},
        "query": {"max_new_tokens": 8},
        "output": {"status_interval_s": 0.0},
    }
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return from_dict(base)


async def test_synthetic_stream_to_three_answers(vlm):
    records = []

    async def emit(r):
        records.append(r)

    cfg = _config(questions=[{"at_s": 4.0, "text": "What is happening?"},
                             {"at_s": 10.0, "text": "Is anyone at the door?"},
                             {"at_s": 99.0, "text": "What does the sign say?"}])
    pipe = CameraPipeline(cfg, vlm, emit=emit)
    t0 = time.monotonic()
    try:
        await asyncio.gather(pipe.run(), pipe.scripted_questions())
    finally:
        pipe.close()
    assert time.monotonic() - t0 < 60
    answers = [r for r in records if r["type"] == "answer"]
    assert [a["question"] for a in answers] == [q.text for q in cfg.questions]
    for a in answers:
        assert isinstance(a["text"], str) and a["new_tokens"] >= 1
        assert 0 < a["tokens_used"] <= a["memory_tokens"] <= 400 + 2 * a["tokens_used"]
        assert 0.0 <= a["t_start"] <= a["t_end"] <= 16.0
        assert a["groups_covered"] >= 1 and 0 < a["ttft_s"] <= a["total_s"]
        assert a["camera"] == "cam" and a["pruner"] == "echoprune" and a["model"] == "tiny-random"
        json.dumps(a)
    assert answers[0]["t_end"] >= 4.0 - 1.0  # asked once the stream reached 4 s
    assert answers[-1]["t_end"] >= 14.0  # the last one saw the end of the stream
    s = pipe.summary()
    assert s["frames_in"] == 64 and s["groups_encoded"] == 16 and s["dropped"] == 0
    assert s["tokens_kept"] <= 400 + 2 * (s["tokens_seen"] // 16)


async def test_ingest_continues_while_a_query_runs(vlm):
    cfg = _config(source={"duration_s": 30.0, "fps": 8.0, "realtime": True, "speed": 4.0},
                  query={"max_new_tokens": 120})
    pipe = CameraPipeline(cfg, vlm)
    run = asyncio.create_task(pipe.run())
    try:
        while pipe.memory.groups_seen < 3:
            await asyncio.sleep(0.02)
        marks = []

        def slow_reader(_text):  # a consumer reading the streamed answer slowly
            marks.append((time.monotonic(), pipe.encoder.stats.groups_encoded))
            time.sleep(0.05)

        answer = await pipe.ask("What is happening?", on_text=slow_reader)
        assert answer.new_tokens > 20, "the tiny model stopped early; the test needs a long generation"
        first, last = marks[0], marks[-1]
        assert last[0] - first[0] > 1.0
        assert last[1] - first[1] >= 2, f"no groups encoded during generation: {marks[0]} .. {marks[-1]}"
    finally:
        pipe.source.close()
        await asyncio.wait_for(run, 30)
        pipe.close()


async def test_bad_questions_get_clear_errors(vlm):
    records = []

    async def emit(r):
        records.append(r)

    pipe = CameraPipeline(_config(query={"max_question_chars": 20}), vlm, emit=emit)
    try:
        with pytest.raises(QueryError) as e:
            await pipe.ask("what happened?")
        assert e.value.code == "empty_memory"
        await pipe.run()
        for q, code in (("", "empty_question"), ("   ", "empty_question"), ("x" * 21, "question_too_long")):
            assert await pipe.ask_or_report(q, request_id="r1") is None
            assert records[-1] == {**records[-1], "type": "error", "code": code, "id": "r1"}
        with pytest.raises(QueryError) as e:
            await pipe.ask("ok?", llm_budget=0)
        assert e.value.code == "bad_llm_budget"
        small = await pipe.ask("ok?", llm_budget=50)
        assert small.tokens_used == 50
    finally:
        pipe.close()


@pytest.mark.parametrize("mode", ["mrope", "text"])
def test_prompt_layouts_keep_temporal_order(vlm, mode):
    import torch

    from pruning import FrameTokens, TokenMemory, get_pruner
    from stream.query import QueryHandler, QuerySettings
    from stream.vlm.positions import VisualPart, build_positions

    mem = TokenMemory(30, get_pruner("recent"), recent_groups=1)
    for g in range(4):
        mem.add(FrameTokens(g, g * 1.0, torch.randn(3, 4, vlm.hidden_size)))
    handler = QueryHandler(vlm, mem, QuerySettings(timestamps=mode))
    snap = mem.snapshot()
    parts = handler.build_prompt(snap, "what?")
    visual = [p for p in parts if isinstance(p, VisualPart)]
    assert sum(len(p.tokens) for p in visual) == len(snap)
    pos = build_positions(parts)
    assert pos.shape[1] == sum(len(p.ids) if hasattr(p, "ids") else len(p.tokens) for p in parts)
    if mode == "text":
        assert len(visual) == len(snap.groups())
    answer = handler.ask("what is happening?")
    assert answer.groups_covered == len(snap.groups()) and answer.t_end == 3.0
    handler.close()


@pytest.mark.parametrize("pruner", ["echoprune", "moprune", "hieravid", "forestprune", "uniform", "recent", "dtd", "random"])
async def test_every_pruner_runs_from_its_config_key(vlm, pruner):
    cfg = _config(source={"duration_s": 10.0}, memory={"pruner": pruner, "capacity": 150, "recent_groups": 1},
                  query={"max_new_tokens": 4, "llm_budget": 120}, questions=[{"at_s": 99.0, "text": "what happened?"}])
    records = []

    async def emit(r):
        records.append(r)

    pipe = CameraPipeline(cfg, vlm, emit=emit)
    try:
        await asyncio.gather(pipe.run(), pipe.scripted_questions())
    finally:
        pipe.close()
    (answer,) = [r for r in records if r["type"] == "answer"]
    per_group = pipe.memory.tokens_seen // pipe.memory.groups_seen
    assert answer["pruner"] == pruner and answer["tokens_used"] <= 120
    assert len(pipe.memory) <= 150 + per_group
    assert pipe.memory.groups_seen == 10


async def test_reconnect_resets_the_pruner_at_the_first_group_of_the_new_connection(vlm):
    import numpy as np

    from stream.types import Frame

    records = []

    async def emit(r):
        records.append(r)

    pipe = CameraPipeline(_config(), vlm, emit=emit)
    resets = []
    pipe.memory.pruner.reset = lambda: resets.append(pipe.memory.groups_seen)
    try:
        await pipe._on_source_state("cam", "reconnecting", "streaming", {"state": "streaming", "stream_start_pts": 3.0})
        assert records[-1]["type"] == "source_state" and records[-1]["new"] == "streaming"

        async def frames():
            img = np.zeros((120, 160, 3), np.uint8)
            for i in range(12):
                yield Frame(i, i * 0.5, img)

        await pipe.encoder.run(frames())
    finally:
        pipe.close()
    assert resets == [3]  # groups start at pts 0, 1, 2 (two frames each); the reset lands before the group at 3.0
    assert pipe.encoder.reset_at_pts is None


async def test_a_slow_encoder_batches_waiting_groups_instead_of_queueing(vlm):
    import numpy as np

    from pruning import TokenMemory, get_pruner
    from stream.encoder import RollingEncoder
    from stream.types import Frame

    mem = TokenMemory(10_000, get_pruner("recent"), recent_groups=2)
    enc = RollingEncoder(vlm, mem, max_batch=8, max_pending=6, drop_when_behind=True)

    async def burst():  # a camera delivering far faster than the encoder can keep up
        img = np.zeros((240, 320, 3), np.uint8)
        for i in range(80):
            yield Frame(i, i * 0.5, img)
            await asyncio.sleep(0)

    try:
        await enc.run(burst())
    finally:
        enc.close()
    s = enc.stats
    assert s.max_backlog <= 6
    assert s.groups_encoded + s.groups_dropped == 40
    assert s.batches < s.groups_encoded  # waiting groups went through the tower together
    assert mem.groups_seen == s.groups_encoded
