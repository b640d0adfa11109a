"""The query handler over the model seam: answers carry their evidence, budgets and token limits
come from the question first, an empty memory is a request error, and `aask` runs on the
handler's own thread."""
from __future__ import annotations

import threading

import pytest
import torch

from pruning import FrameTokens, TokenMemory, get_pruner
from stream.errors import RequestError
from stream.events import Question
from stream.query import QueryHandler, QuerySettings


def _memory(vlm, groups=4) -> TokenMemory:
    mem = TokenMemory(1000, get_pruner("recent"), recent_groups=1)
    gen = torch.Generator().manual_seed(0)
    for g in range(groups):
        mem.add(FrameTokens(g, g * 1.0, torch.randn(3, 4, vlm.hidden_size, generator=gen)))
    return mem


@pytest.mark.parametrize("mode", ["mrope", "text"])
def test_an_answer_carries_its_evidence(vlm, mode):
    mem = _memory(vlm)
    handler = QueryHandler(vlm, mem, QuerySettings(timestamps=mode, max_new_tokens=4))
    try:
        answer = handler.ask(Question("what is happening?"))
    finally:
        handler.close()
    assert answer.question == "what is happening?" and isinstance(answer.text, str)
    assert (answer.groups, answer.t_start, answer.t_end) == (4, 0.0, 3.0)
    assert answer.tokens_used == answer.memory_tokens == len(mem) == 48
    assert answer.prompt_tokens > answer.tokens_used and 1 <= answer.new_tokens <= 4
    assert 0 < answer.ttft_s <= answer.total_s
    assert (answer.camera, answer.model, answer.pruner, answer.id) == ("", "", "", None)  # the camera fills them


def test_budget_and_token_limit_come_from_the_question_first(vlm):
    handler = QueryHandler(vlm, _memory(vlm), QuerySettings(llm_budget=30, max_new_tokens=3))
    try:
        own = handler.ask(Question("what?", llm_budget=10, max_new_tokens=1))
        default = handler.ask(Question("what?"))
    finally:
        handler.close()
    assert (own.tokens_used, own.new_tokens) == (10, 1)
    assert default.tokens_used == 30 and 1 <= default.new_tokens <= 3


def test_an_empty_memory_is_a_request_error(vlm):
    handler = QueryHandler(vlm, TokenMemory(100, get_pruner("recent")), QuerySettings())
    try:
        with pytest.raises(RequestError) as e:
            handler.ask(Question("what happened?"))
    finally:
        handler.close()
    assert e.value.code == "empty_memory"


def test_a_bad_timestamps_mode_is_refused(vlm):
    with pytest.raises(ValueError, match="timestamps must be one of mrope, text"):
        QueryHandler(vlm, _memory(vlm), QuerySettings(timestamps="srt"))


async def test_aask_answers_on_the_handler_thread_and_streams_text(vlm):
    handler = QueryHandler(vlm, _memory(vlm), QuerySettings(max_new_tokens=6))
    threads = set()
    try:
        answer = await handler.aask(Question("what is happening?"),
                                    on_text=lambda _: threads.add(threading.current_thread().name))
        again = handler.ask(Question("what is happening?"))
    finally:
        handler.close()
    assert threads and all(name.startswith("llm") for name in threads)
    assert (answer.text, answer.new_tokens, answer.prompt_tokens) == (again.text, again.new_tokens, again.prompt_tokens)


def test_a_stopped_generation_ends_after_one_token(vlm):
    handler = QueryHandler(vlm, _memory(vlm), QuerySettings(max_new_tokens=48))
    try:
        full = handler.ask(Question("what is happening?"))
        stop = threading.Event()
        stop.set()
        cut = handler.ask(Question("what is happening?"), stop=stop)
    finally:
        handler.close()
    assert full.new_tokens == 48 and cut.new_tokens == 1


async def test_cancelling_aask_frees_the_llm_thread_within_a_token(vlm):
    """A cancelled question (its asker gone, the camera stopping) does not keep the LLM busy for
    its remaining tokens: the next question starts at once."""
    import asyncio
    import time

    handler = QueryHandler(vlm, _memory(vlm), QuerySettings(max_new_tokens=1))
    try:
        t0 = time.perf_counter()
        await handler.aask(Question("warm up?"))
        one = time.perf_counter() - t0
        started = threading.Event()
        long = asyncio.create_task(handler.aask(Question("what is happening?", max_new_tokens=1024),
                                                lambda _text: started.set()))
        while not started.is_set() and not long.done():
            await asyncio.sleep(0.01)
        long.cancel()
        t0 = time.perf_counter()
        await handler.aask(Question("and now?"))
        after_cancel = time.perf_counter() - t0
    finally:
        handler.close()
    assert after_cancel < 5 * one + 1.0, (after_cancel, one)


@pytest.mark.parametrize("name", ["echoprune", "hieravid", "moprune"])
def test_a_ranked_answer_equals_one_ranked_on_a_copy_of_the_memory(vlm, name):
    """The full path ranks the memory in place; the plain way (rank a snapshot, lay out its
    picked rows) gives the same prompt and the same answer, token for token."""
    mem = TokenMemory(40, get_pruner(name), recent_groups=2, evict_slack=8)
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(3, 4, vlm.hidden_size, generator=gen)
    for g in range(12):
        mem.add(FrameTokens(g, g * 0.5, base + 0.3 * torch.randn(3, 4, vlm.hidden_size, generator=gen)))
    question = Question("what moved near the door?", llm_budget=30, max_new_tokens=6)
    handler = QueryHandler(vlm, mem, QuerySettings())
    try:
        answer = handler.ask(question)
    finally:
        handler.close()
    assert answer.prompt_path == "full" and answer.tokens_used == 30 < answer.memory_tokens == len(mem)
    snap = mem.snapshot()
    layer = mem.pruner.query_layer
    query = vlm.question_embeds(question.text) if layer is None else vlm.question_states(question.text, layer)
    seen = snap.select(mem.pruner.rank_for_query(snap, query, 30))
    prompt = vlm.layout(seen, question.text, handler.layout)
    plain = vlm.generate(prompt, 6)
    assert (answer.text, answer.prompt_tokens) == (plain.text, len(prompt))
    assert (answer.t_start, answer.t_end, answer.groups) == (float(seen.pts.min()), float(seen.pts.max()),
                                                            int(seen.groups().numel()))
