"""End to end through the camera service: synthetic camera -> tiny model -> pruned memory ->
answers through the one door, events on the bus, ingest during queries."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from stream.bus import Sink
from stream.camera import Camera
from stream.config import from_dict
from stream.errors import RequestError
from stream.events import Answer, Question, RequestFailed, SourceState


class Recorder(Sink):
    """Keeps every event it is handed."""

    def __init__(self):
        self.events = []

    async def handle(self, event):
        self.events.append(event)

    def of(self, kind):
        return [e for e in self.events if isinstance(e, kind)]


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


def _camera(cfg, vlm):
    cam = Camera(cfg, vlm)
    rec = Recorder()
    cam.bus.subscribe(rec)
    return cam, rec


async def test_synthetic_stream_to_three_answers(vlm):
    cfg = _config(questions=[{"at_s": 4.0, "text": "What is happening?"},
                             {"at_s": 10.0, "text": "Is anyone at the door?"},
                             {"at_s": 99.0, "text": "What does the sign say?"}])
    cam, rec = _camera(cfg, vlm)
    t0 = time.monotonic()
    async with cam:
        await cam.done()
    assert time.monotonic() - t0 < 60
    answers = rec.of(Answer)
    assert [a.question for a in answers] == [q.text for q in cfg.questions]
    for a in answers:
        assert isinstance(a.text, str) and a.new_tokens >= 1
        assert 0 < a.tokens_used <= a.memory_tokens <= 400 + 2 * a.tokens_used
        assert 0.0 <= a.t_start <= a.t_end <= 16.0
        assert a.groups >= 1 and 0 < a.ttft_s <= a.total_s
        assert a.camera == "cam" and a.pruner == "echoprune" and a.model == "tiny-random" and a.origin == "script"
        json.dumps(a.to_dict())
    assert answers[0].t_end >= 4.0 - 1.0  # asked once the stream reached 4 s
    assert answers[-1].t_end >= 14.0  # the last one saw the end of the stream
    s = cam.summary()
    assert s["frames_in"] == 64 and s["groups_encoded"] == 16 and s["dropped"] == 0 and s["answers"] == 3
    assert s["tokens_kept"] <= 400 + 2 * (s["tokens_seen"] // 16)
    status = cam.status()
    assert status.answers == 3 and status.source["state"] == "stopped" and status.source["frames"] == 64


async def test_ingest_continues_while_a_query_runs(vlm):
    cfg = _config(source={"duration_s": 30.0, "fps": 8.0, "realtime": True, "speed": 4.0},
                  query={"max_new_tokens": 120})
    async with Camera(cfg, vlm) as cam:
        while cam.memory.groups_seen < 3:
            await asyncio.sleep(0.02)
        marks = []

        def slow_reader(_text):  # a consumer reading the streamed answer slowly
            marks.append((time.monotonic(), cam.encoder.stats.groups_encoded))
            time.sleep(0.05)

        answer = await cam.ask(Question("What is happening?"), on_text=slow_reader)
        assert answer.new_tokens > 20, "the tiny model stopped early; the test needs a long generation"
        first, last = marks[0], marks[-1]
        assert last[0] - first[0] > 1.0
        assert last[1] - first[1] >= 2, f"no groups encoded during generation: {marks[0]} .. {marks[-1]}"


async def test_bad_questions_get_clear_errors(vlm):
    cam, rec = _camera(_config(query={"max_question_chars": 20}), vlm)
    async with cam:
        with pytest.raises(RequestError) as e:
            await cam.ask(Question("what happened?"))
        assert e.value.code == "empty_memory"
        await cam.done()
        for q, code in (("", "empty_question"), ("   ", "empty_question"), ("x" * 21, "question_too_long")):
            with pytest.raises(RequestError) as e:
                await cam.ask(Question(q, id="r1"))
            assert e.value.code == code
            last = rec.of(RequestFailed)[-1]
            assert (last.code, last.id, last.camera) == (code, "r1", "cam")
        with pytest.raises(RequestError) as e:
            await cam.ask(Question("ok?", llm_budget=0))
        assert e.value.code == "bad_llm_budget"
        small = await cam.ask(Question("ok?", llm_budget=50))
        assert small.tokens_used == 50
        assert cam.status().errors == {"empty_memory": 1, "empty_question": 2, "question_too_long": 1,
                                       "bad_llm_budget": 1}


async def test_a_stop_answers_waiting_questions_with_unavailable(vlm):
    cfg = _config(source={"duration_s": 30.0, "fps": 8.0, "realtime": True, "speed": 4.0},
                  query={"max_new_tokens": 200, "queue_size": 2})
    cam, rec = _camera(cfg, vlm)
    async with cam:
        while cam.memory.groups_seen < 2:
            await asyncio.sleep(0.02)
        def slow_reader(_text):  # holds the first answer open until the stop
            time.sleep(0.1)

        asks = [asyncio.create_task(cam.ask(Question(f"question {i}?", id=i), on_text=slow_reader)) for i in range(4)]
        await asyncio.sleep(0.2)
    results = await asyncio.gather(*asks, return_exceptions=True)
    codes = sorted(r.code for r in results if isinstance(r, RequestError))
    assert codes == ["busy", "unavailable", "unavailable", "unavailable"]
    assert sorted(e.code for e in rec.of(RequestFailed)) == codes


@pytest.mark.parametrize("pruner", ["echoprune", "moprune", "hieravid", "forestprune", "uniform", "recent", "dtd", "random"])
async def test_every_pruner_runs_from_its_config_key(vlm, pruner):
    cfg = _config(source={"duration_s": 10.0}, memory={"pruner": pruner, "capacity": 150, "recent_groups": 1},
                  query={"max_new_tokens": 4, "llm_budget": 120}, questions=[{"at_s": 99.0, "text": "what happened?"}])
    cam, rec = _camera(cfg, vlm)
    async with cam:
        await cam.done()
    (answer,) = rec.of(Answer)
    per_group = cam.memory.tokens_seen // cam.memory.groups_seen
    assert answer.pruner == pruner and answer.tokens_used <= 120
    assert len(cam.memory) <= 150 + per_group
    assert cam.memory.groups_seen == 10


async def test_reconnect_resets_the_pruner_at_the_first_group_of_the_new_connection(vlm):
    import numpy as np

    from stream.types import Frame

    cam, rec = _camera(_config(), vlm)
    resets = []
    cam.memory.pruner.reset = lambda: resets.append(cam.memory.groups_seen)
    try:
        await cam._on_source_state("cam", "reconnecting", "streaming", {"state": "streaming", "stream_start_pts": 3.0})
        assert rec.of(SourceState)[-1].new == "streaming"

        async def frames():
            img = np.zeros((120, 160, 3), np.uint8)
            for i in range(12):
                yield Frame(i, i * 0.5, img)

        await cam.encoder.run(frames())
    finally:
        await cam.stop()
    assert resets == [3]  # groups start at pts 0, 1, 2 (two frames each); the reset lands before the group at 3.0
    assert cam.encoder.reset_at_pts is None


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


async def test_a_cut_in_the_video_is_published_once_at_its_group(vlm, tmp_path):
    """A file that cuts from black to white at 3 s: the camera publishes one `scene_change`,
    for the group the cut starts, whether its verdict arrives with that group (CPU) or later."""
    import numpy as np
    from clips import write_h264

    from stream.events import GroupAdded, SceneChange

    black, white = np.zeros((120, 160, 3), np.uint8), np.full((120, 160, 3), 255, np.uint8)
    write_h264(tmp_path / "cut.mp4", [black] * 12 + [white] * 12, fps=4)
    cfg = from_dict({"name": "cam", "source": {"kind": "file", "path": str(tmp_path / "cut.mp4")},
                     "sampler": {"fps": 2.0}, "memory": {"pruner": "echoprune", "capacity": 400, "recent_groups": 2},
                     "output": {"status_interval_s": 0.0}})
    cam, rec = _camera(cfg, vlm)
    async with cam:
        await cam.done()
    assert [g.pts for g in rec.of(GroupAdded)] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # 6 s, a pair of frames a second
    assert [(e.camera, e.group, e.pts) for e in rec.of(SceneChange)] == [("cam", 3, 3.0)]
