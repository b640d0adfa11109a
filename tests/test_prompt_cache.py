"""The per-camera prompt cache (stream/prompt_cache.py): an answer on it equals the answer with
the whole prompt prefilled, however the memory changed under it (evictions, a reconnect, a scene
cut, merges into held rows, questions and groups arriving together, a watch check cut short); a
question prefills only what the cache lacks; the cache stays inside its limit; a bad limit is a
config error naming its field. Tiny random model, float32: equal answers mean equal greedy tokens."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest
import torch
from transformers import DynamicCache

from pruning import FrameTokens, TokenMemory, get_pruner
from stream.door import Door, DoorSettings
from stream.errors import ConfigError, RequestError
from stream.events import Answer, Question
from stream.prompt_cache import MIB, limit_tokens
from stream.query import QueryHandler, QuerySettings
from stream.vlm.base import LayoutSettings
from stream.vlm.kv_cache import CacheFull, crop_to

MODES = ["mrope", "text"]
QUESTIONS = ("what is happening?", "is anyone at the door?", "when did the car arrive?")
MAX_NEW = 8
H, W = 4, 6  # 24 tokens a group


def _groups(n: int, seed: int = 0, drift: float = 0.3, cut: int | None = None, h: int = H, w: int = W,
            dim: int = 64, pts_jump: dict[int, float] | None = None) -> list[FrameTokens]:
    """A token stream around one scene (`drift` is the change from group to group); from group
    `cut` on, another scene; from group k in `pts_jump` on, pts shifted by its value."""
    gen = torch.Generator().manual_seed(seed)
    scene = torch.randn(h, w, dim, generator=gen)
    out, shift = [], 0.0
    for g in range(n):
        if g == cut:
            scene = 3.0 * torch.randn(h, w, dim, generator=gen)
        shift += (pts_jump or {}).get(g, 0.0)
        out.append(FrameTokens(g, g * 1.0 + shift, scene + drift * torch.randn(h, w, dim, generator=gen)))
    return out


def _memory(pruner: str = "echoprune", capacity: int = 60, recent_groups: int = 1,
            evict_slack: int = 12) -> TokenMemory:
    """Small against a 24-token group: with the slack, the store evicts every group or two."""
    return TokenMemory(capacity, get_pruner(pruner), recent_groups=recent_groups, evict_slack=evict_slack)


@contextmanager
def _handlers(vlm, mem: TokenMemory, **settings):
    """A handler on the prompt cache and one prefilling every question whole, over one memory."""
    cached = QueryHandler(vlm, mem, QuerySettings(max_new_tokens=MAX_NEW, **settings))
    full = QueryHandler(vlm, mem, QuerySettings(max_new_tokens=MAX_NEW, prompt_cache=False, **settings))
    try:
        yield cached, full
    finally:
        cached.close()
        full.close()


def _refresh(handler: QueryHandler) -> int:
    return handler.cache.refresh(lambda: False)


def _same(a: Answer, b: Answer) -> None:
    """The cached answer `a` is the uncached answer `b`, over the same evidence."""
    assert (a.prompt_path, b.prompt_path) == ("cached", "full")
    assert (a.text, a.new_tokens) == (b.text, b.new_tokens), (a, b)
    assert (a.prompt_tokens, a.tokens_used, a.groups, a.t_start, a.t_end) == \
           (b.prompt_tokens, b.tokens_used, b.groups, b.t_start, b.t_end)


def _walk(vlm, mem: TokenMemory, groups: list[FrameTokens], mode: str, refresh_every: int = 2,
          reconnect_at: int | None = None) -> tuple[list[Answer], dict]:
    """Feed `groups` one at a time, refreshing the cache after every `refresh_every`-th (so ingest
    is sometimes ahead of it) and asking both handlers after each; every pair must agree."""
    answers = []
    with _handlers(vlm, mem, timestamps=mode) as (cached, full):
        for i, group in enumerate(groups):
            if i == reconnect_at:
                mem.reset_stream()
            mem.add(group)
            if i % refresh_every == 0:
                _refresh(cached)
            q = Question(QUESTIONS[i % len(QUESTIONS)])
            a = cached.ask(q)
            _same(a, full.ask(q))
            answers.append(a)
        return answers, cached.cache_report()


def _depends_on_the_video(answers: list[Answer]) -> None:
    """The comparison means something: answers vary with the memory and run several tokens."""
    assert len({(a.question, a.text) for a in answers}) > len(QUESTIONS), [a.text for a in answers]
    assert sum(a.new_tokens for a in answers) > 2 * len(answers)


# -- cached answers equal uncached ones ---------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pruner", ["echoprune", "forestprune", "dtd"])
def test_answers_match_over_a_long_stream_with_evictions(vlm, mode, pruner):
    """Eviction changes early rows every group or two: each time the cache rewinds to the first
    changed row, and the answer still equals a full prefill."""
    mem = _memory(pruner)
    answers, report = _walk(vlm, mem, _groups(30), mode)
    assert mem.tokens_evicted > 0 and len(mem) <= 60 + 24
    assert report["rewinds"] >= 10 and report["reprefilled_tokens"] > 0
    assert report["answers_cached"] == 30 and report["over_limit"] == 0
    _depends_on_the_video(answers)


@pytest.mark.parametrize("mode", MODES)
def test_answers_match_across_a_reconnect(vlm, mode):
    """A reconnect resets the pruner's stream state and a live source continues after a pts gap;
    the cache follows."""
    groups = _groups(24, seed=1, pts_jump={12: 30.0})
    answers, report = _walk(vlm, _memory(), groups, mode, reconnect_at=12)
    assert answers[-1].t_end == 53.0 and report["answers_cached"] == 24
    _depends_on_the_video(answers)


@pytest.mark.parametrize("mode", MODES)
def test_answers_match_across_a_scene_cut(vlm, mode):
    """The token stream changes abruptly mid-stream (the pruner then evicts differently)."""
    answers, report = _walk(vlm, _memory(), _groups(24, seed=2, cut=10), mode, refresh_every=3)
    assert report["rewinds"] > 0
    _depends_on_the_video(answers)


@pytest.mark.parametrize("mode", MODES)
def test_answers_match_when_hieravid_merges_into_held_rows(vlm, mode):
    """HieraVid folds a static token into its run's head in an earlier group, changing a row the
    cache holds. No recent window and no eviction here, so every rewind is such a merge."""
    mem = TokenMemory(10_000, get_pruner("hieravid"), recent_groups=0)
    answers, report = _walk(vlm, mem, _groups(20, seed=4, drift=0.1), mode, refresh_every=1)
    assert 0 < mem.tokens_evicted == mem.tokens_seen - len(mem) and mem.tokens_seen < mem.capacity  # all merges
    assert report["rewinds"] > 0 and report["reprefilled_tokens"] > 0
    _depends_on_the_video(answers)


@pytest.mark.parametrize("mode", MODES)
async def test_two_questions_at_once_while_groups_arrive(vlm, mode):
    """Two `aask` on one handler at once while ingest (here the event loop's thread) adds groups
    and schedules refreshes, so the memory changes under the LLM thread mid-question: each answer
    equals a full prefill over the memory as it was for it (replayed: the memory after group k
    depends only on groups 0..k, and an answer names its newest group)."""
    groups = _groups(24, seed=5)
    mem = _memory()
    for g in groups[:3]:
        mem.add(g)
    handler = QueryHandler(vlm, mem, QuerySettings(timestamps=mode, max_new_tokens=MAX_NEW))

    async def ingest():
        for g in groups[3:]:
            mem.add(g)
            handler.refresh_soon()
            await asyncio.sleep(0.01)

    answers: list[Answer] = []
    feeding = asyncio.create_task(ingest())
    try:
        while not feeding.done():
            answers += await asyncio.gather(handler.aask(Question(QUESTIONS[0])), handler.aask(Question(QUESTIONS[1])))
            await asyncio.sleep(0.003 * (len(answers) % 4))  # now and then a gap, for a refresh to run in
        await feeding
        report = handler.cache_report()
    finally:
        handler.close()
    assert report["refresh_errors"] == 0 and report["answers_cached"] == len(answers)
    assert len({a.t_end for a in answers}) >= 3, [a.t_end for a in answers]
    replay = _memory()
    with _handlers(vlm, replay, timestamps=mode) as (_, full):
        fed = 0
        for a in sorted(answers, key=lambda a: a.t_end):
            while fed <= int(a.t_end):
                replay.add(groups[fed])
                fed += 1
            _same(a, full.ask(Question(a.question)))


async def test_a_watch_check_cut_short_by_a_question_leaves_the_cache_exact(vlm):
    """Through the camera's door on one handler: a question preempts a watch check mid-answer
    (its generation stops after a token, on the shared KV) while a group arrives; the question,
    a later complete watch check and another question all equal full prefills."""
    groups = _groups(10, seed=6)
    mem = _memory()
    for g in groups[:6]:
        mem.add(g)
    watch_q = "what is happening? Answer yes or no first."
    with _handlers(vlm, mem) as (cached, full):
        door = Door("cam", cached.aask, settings=DoorSettings(watch_share=1.0))
        _refresh(cached)
        started = threading.Event()
        check = asyncio.create_task(door.ask(Question(watch_q, origin="watch", max_new_tokens=1024),
                                             on_text=lambda _text: started.set()))
        while not started.is_set() and not check.done():
            await asyncio.sleep(0.005)
        mem.add(groups[6])
        cached.refresh_soon()
        answer = await door.ask(Question(QUESTIONS[0]))
        with pytest.raises(RequestError) as e:
            await check
        assert e.value.code == "preempted", "the watch check ended before the question came"
        _same(answer, full.ask(Question(QUESTIONS[0])))
        mem.add(groups[7])
        cached.refresh_soon()
        done = await door.ask(Question(watch_q, origin="watch", max_new_tokens=MAX_NEW))
        _same(done, full.ask(Question(watch_q)))
        answer = await door.ask(Question(QUESTIONS[1]))
        _same(answer, full.ask(Question(QUESTIONS[1])))
        assert door.errors == {"preempted": 1}


def test_a_reader_failing_mid_answer_leaves_the_cache_exact(vlm):
    """An `on_text` consumer that raises ends the answer part-way (after the new group and the
    question went onto the KV); the next answer still equals a full prefill."""
    groups = _groups(8, seed=7)
    mem = _memory()
    for g in groups[:5]:
        mem.add(g)

    def gone(_text):
        raise ConnectionError("the asker went away")

    with _handlers(vlm, mem) as (cached, full):
        _refresh(cached)
        mem.add(groups[5])
        with pytest.raises(ConnectionError):
            cached.ask(Question(QUESTIONS[0]), on_text=gone)
        mem.add(groups[6])
        _same(cached.ask(Question(QUESTIONS[0])), full.ask(Question(QUESTIONS[0])))


# -- what a question prefills -------------------------------------------------------------------


def _suffix(vlm, handler: QueryHandler, question: str) -> int:
    """Prompt tokens after the cacheable prefix: what a current cache leaves a question."""
    plan = vlm.plan(handler.memory.layout(), question, handler.layout)
    return len(plan) - plan.prefix_len


def _prefix(vlm, handler: QueryHandler) -> int:
    return vlm.plan(handler.memory.layout(), "", handler.layout).prefix_len


@pytest.mark.parametrize("mode", MODES)
def test_a_current_cache_leaves_only_the_question_to_prefill(vlm, mode):
    """With the cache current, a question prefills its own suffix: the same for a small and a
    large memory, and again for a repeated question (the answer is cropped off the KV)."""
    prefilled = []
    for n in (2, 8):
        mem = TokenMemory(10_000, get_pruner("recent"), recent_groups=1)
        for g in _groups(n, seed=8):
            mem.add(g)
        with _handlers(vlm, mem, timestamps=mode) as (cached, _):
            assert _refresh(cached) == _prefix(vlm, cached)
            first, again = cached.ask(Question(QUESTIONS[0])), cached.ask(Question(QUESTIONS[0]))
            suffix = _suffix(vlm, cached, QUESTIONS[0])
            assert first.prompt_path == "cached"
            assert first.prefilled_tokens == first.prompt_tokens - _prefix(vlm, cached)
            assert first.prefilled_tokens == again.prefilled_tokens == suffix < 64
            assert cached.cache.held == _prefix(vlm, cached)
            prefilled.append((first.prefilled_tokens, first.prompt_tokens))
    (small, small_prompt), (large, large_prompt) = prefilled
    assert small == large and large_prompt - small_prompt >= 6 * H * W


@pytest.mark.parametrize("mode", MODES)
def test_a_group_ingested_after_the_last_refresh_is_prefilled_with_the_question(vlm, mode):
    """Ingest ahead of the cache: the question prefills the newest group too (its tokens, and its
    time label in text mode), and leaves it cached for the next one."""
    mem = TokenMemory(10_000, get_pruner("recent"), recent_groups=2)
    groups = _groups(5, seed=9)
    for g in groups[:4]:
        mem.add(g)
    with _handlers(vlm, mem, timestamps=mode) as (cached, _):
        _refresh(cached)
        before = _prefix(vlm, cached)
        current = cached.ask(Question(QUESTIONS[0]))
        mem.add(groups[4])
        after = _prefix(vlm, cached)
        behind = cached.ask(Question(QUESTIONS[0]))
        caught_up = cached.ask(Question(QUESTIONS[0]))
    grew = after - before
    assert (grew == H * W) if mode == "mrope" else (H * W < grew <= H * W + 12)
    assert behind.prefilled_tokens == _suffix(vlm, cached, QUESTIONS[0]) + grew
    assert behind.prefilled_tokens - current.prefilled_tokens == grew
    assert caught_up.prefilled_tokens == current.prefilled_tokens


def test_the_whole_prompt_is_prefilled_without_the_cache_or_for_a_question_budget(vlm):
    """With the cache off every question prefills its whole prompt; with it on, a question budget
    below what the memory holds picks a question-dependent subset, which takes the full path."""
    mem = TokenMemory(10_000, get_pruner("echoprune"), recent_groups=1)
    for g in _groups(6, seed=10):
        mem.add(g)
    held = len(mem)
    with _handlers(vlm, mem) as (cached, full):
        _refresh(cached)
        off = full.ask(Question(QUESTIONS[0]))
        budget = cached.ask(Question(QUESTIONS[0], llm_budget=held // 2))
        whole = cached.ask(Question(QUESTIONS[0], llm_budget=held))
        report = cached.cache_report()
    assert off.prompt_path == "full" and off.prefilled_tokens == off.prompt_tokens
    assert budget.prompt_path == "full" and budget.prefilled_tokens == budget.prompt_tokens
    assert budget.tokens_used == held // 2 < budget.memory_tokens == held
    assert whole.prompt_path == "cached" and whole.prefilled_tokens < 64 and whole.tokens_used == held
    assert (report["answers_cached"], report["answers_full"]) == (1, 1)


# -- the cache's bound --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_the_cache_never_exceeds_its_limit(vlm, mode):
    """Over a long stream the KV buffer stays within limit x bytes per token; a question whose
    prompt and answer would not fit takes the full path (counted) and answers the same."""
    limit = {"mrope": 290, "text": 430}[mode]  # between the prompt's shortest and longest in this stream
    per = vlm.kv_bytes_per_token
    mem = _memory(capacity=120, recent_groups=2, evict_slack=60)
    paths = []
    with _handlers(vlm, mem, timestamps=mode, prompt_cache_tokens=limit) as (cached, full):
        for i, group in enumerate(_groups(30, seed=11)):
            mem.add(group)
            _refresh(cached)
            assert cached.cache.kv.nbytes() <= limit * per
            q = Question(QUESTIONS[i % len(QUESTIONS)])
            a, b = cached.ask(q), full.ask(q)
            assert cached.cache.kv.nbytes() <= limit * per
            fits = a.prompt_tokens + MAX_NEW <= limit
            assert a.prompt_path == ("cached" if fits else "full")
            assert (a.text, a.new_tokens, a.prompt_tokens) == (b.text, b.new_tokens, b.prompt_tokens)
            paths.append(a.prompt_path)
        report = cached.cache_report()
    assert paths.count("cached") >= 5 and paths.count("full") >= 5, paths
    assert report["limit_tokens"] == limit and report["bytes"] <= limit * per
    assert report["answers_full"] == paths.count("full") and report["over_limit"] >= paths.count("full")


def test_the_growable_kv_buffer_equals_a_dynamic_cache(vlm):
    """BufferedCache (written in place, cropped by a length, doubled when full) gives the logits a
    transformers DynamicCache gives for one prefill of the same tokens: chunks that cross its
    growth points, a crop back and a prefill over the cropped part."""
    gen = torch.Generator().manual_seed(12)
    n = 700
    embeds = torch.randn(1, n, vlm.hidden_size, generator=gen)
    positions = torch.arange(n).expand(3, 1, n)

    def reference(end: int) -> torch.Tensor:
        return vlm.forward(DynamicCache(config=vlm.model.config), embeds[:, :end], positions[..., :end], logits=True)

    buf = vlm.new_cache(n)
    for a, b in ((0, 100), (100, 300), (300, 330)):  # grows past 256
        out = vlm.forward(buf, embeds[:, a:b], positions[..., a:b], logits=True)
    torch.testing.assert_close(out, reference(330), atol=1e-5, rtol=1e-5)
    crop_to(buf, 150)
    assert buf.get_seq_length() == 150
    for a, b in ((150, 151), (151, 520), (520, n)):  # overwrites the cropped rows, grows past 512
        out = vlm.forward(buf, embeds[:, a:b], positions[..., a:b], logits=True)
        torch.testing.assert_close(out, reference(b), atol=1e-5, rtol=1e-5)
    assert buf.nbytes() <= n * vlm.kv_bytes_per_token
    with pytest.raises(CacheFull):
        vlm.forward(buf, embeds[:, :1], positions[..., :1] + n, logits=True)


@pytest.mark.parametrize("mode, question", [
    ("mrope", "x" * 40),
    ("text", "x" * 40),  # one time label per held group, which the sizing does not count
    ("mrope", "\U0001F6AA" * 40),  # a character can be several tokens (this one: 4 here)
], ids=["mrope", "text", "mrope-non-ascii"])
def test_the_smallest_limit_the_config_accepts_serves_a_full_memory_from_the_cache(vlm, mode, question):
    """`limit_tokens` refuses a limit the memory at its fullest, a question of `max_question_chars`
    and its answer cannot fit in; a limit it accepts must then serve every such question from
    the cache, not quietly send it down the full path."""
    per, chars = vlm.kv_bytes_per_token, len(question)
    layout = LayoutSettings(timestamps=mode)
    mem = TokenMemory(256, get_pruner("echoprune"), recent_groups=1, evict_slack=64)

    def accepted(tokens: int) -> bool:
        try:
            limit_tokens(vlm, (tokens * per + per // 2) / MIB, mem, layout, MAX_NEW, chars)
        except ConfigError as e:
            assert e.path == "query.prompt_cache_mib"
            return False
        return True

    lo, hi = 1, 1 << 20
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if accepted(mid) else (mid + 1, hi)
    side = int(vlm.max_tokens_per_group ** 0.5)  # groups as large as the pixel budget allows
    paths = []
    with _handlers(vlm, mem, timestamps=mode, prompt_cache_tokens=lo) as (cached, _):
        for group in _groups(40, seed=13, h=side, w=side):
            mem.add(group)
            _refresh(cached)
            a = cached.ask(Question(question))
            paths.append((a.prompt_path, a.prompt_tokens))
    assert all(path == "cached" for path, _ in paths), f"limit {lo} tokens; (path, prompt tokens): {paths}"


# -- a bad limit --------------------------------------------------------------------------------


def test_a_cache_limit_too_small_for_the_memory_is_one_config_error_line(tmp_path, model_cache):
    """Found once the model says its KV size: still one line on stderr naming the field and the
    size to set, exit 2, no traceback, and no stream run."""
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('[memory]\ncapacity = 100000\n[query]\nprompt_cache_mib = 1\n[output]\nstatus_interval_s = 0.0\n')
    env = {**os.environ, "STREAMPRUNE_CACHE": str(model_cache)}
    r = subprocess.run([sys.executable, "-m", "stream.cli", "run", str(cfg), "--no-interactive"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    errors = r.stderr.splitlines()
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(errors) == 1, errors
    assert errors[0].startswith("streamprune: config error: query.prompt_cache_mib: "), errors
    assert "1 MiB holds 2048 prompt tokens" in errors[0] and "set at least" in errors[0]
    assert "Traceback" not in r.stdout + r.stderr
    assert "source, sampled at" not in r.stdout and "summary:" not in r.stdout  # no camera started


def test_a_negative_cache_limit_is_refused_when_the_config_loads(tmp_path):
    from stream.config import load_config

    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[query]\nprompt_cache_mib = -1\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert e.value.path == "query.prompt_cache_mib" and "out of range" in e.value.detail


# -- through a camera ---------------------------------------------------------------------------


async def test_a_camera_answers_from_its_background_refreshed_cache(vlm):
    """The camera's ingest schedules refreshes on the LLM thread as groups arrive: before anyone
    asks, its status shows the cache holding the memory's prompt prefix; then a question
    prefills only itself and answers as a full prefill would."""
    from stream.camera import Camera
    from stream.config import from_dict

    cfg = from_dict({
        "name": "cam", "source": {"kind": "synthetic", "fps": 4.0, "duration_s": 16.0, "seed": 1},
        "sampler": {"fps": 2.0}, "memory": {"pruner": "echoprune", "capacity": 400, "recent_groups": 2},
        "query": {"max_new_tokens": MAX_NEW}, "output": {"status_interval_s": 0.0},
    })
    async with Camera(cfg, vlm) as cam:
        await cam.done()
        want = _prefix(vlm, cam.queries)
        for _ in range(500):
            cache = cam.status().prompt_cache
            if cache["tokens"] == want:
                break
            await asyncio.sleep(0.01)
        assert cache["tokens"] == want > len(cam.memory), cache
        assert cache["answers_cached"] == 0 and cache["background_ms"] > 0 and cache["refresh_errors"] == 0
        assert cache["bytes"] >= want * cache["kv_bytes_per_token"]
        answer = await cam.ask(Question(QUESTIONS[0]))
        cache = cam.status().prompt_cache
    assert cam.memory.groups_seen == 16 and cam.memory.tokens_evicted > 0
    assert answer.prompt_path == "cached"
    assert answer.prefilled_tokens == answer.prompt_tokens - want < answer.prompt_tokens // 10
    assert cache["answers_cached"] == 1 and cache["answers_full"] == 0
    full = QueryHandler(vlm, cam.memory, QuerySettings(max_new_tokens=MAX_NEW, prompt_cache=False))
    try:
        _same(answer, full.ask(Question(QUESTIONS[0])))
    finally:
        full.close()


# -- the background refresh keeps working -------------------------------------------------------


async def test_a_question_cancelled_while_waiting_does_not_stop_the_background_refresh(vlm):
    """A question cancelled before the LLM thread took it (its asker went away; the door
    preempting a watch check queued behind a refresh) must not leave the refresh believing a
    question still waits: groups arriving later are still brought into the cache in the
    background, and the next question prefills only itself."""
    mem = TokenMemory(10_000, get_pruner("recent"), recent_groups=1)
    groups = _groups(6, seed=14)
    for g in groups[:3]:
        mem.add(g)
    handler = QueryHandler(vlm, mem, QuerySettings(max_new_tokens=MAX_NEW))
    try:
        _refresh(handler)
        started = threading.Event()
        long = asyncio.create_task(handler.aask(Question(QUESTIONS[0], max_new_tokens=1024),
                                                on_text=lambda _text: started.set()))
        while not started.is_set() and not long.done():
            await asyncio.sleep(0.005)
        waiting = asyncio.create_task(handler.aask(Question(QUESTIONS[1])))
        await asyncio.sleep(0.02)  # queued behind the long answer
        waiting.cancel()
        long.cancel()
        await asyncio.gather(long, waiting, return_exceptions=True)
        for g in groups[3:]:
            mem.add(g)
            handler.refresh_soon()
        want = _prefix(vlm, handler)
        for _ in range(200):
            if handler.cache.held == want:
                break
            await asyncio.sleep(0.01)
        held = handler.cache.held
        answer = await handler.aask(Question(QUESTIONS[0]))
    finally:
        handler.close()
    assert held == want, f"the background refresh stopped: the cache holds {held} of {want} prefix tokens"
    assert answer.prefilled_tokens == answer.prompt_tokens - want
