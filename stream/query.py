"""The query handler: runs the LLM over an immutable snapshot of the token memory.

The model family lays out the prompt (stream/vlm/base.py `VideoLM.layout`): the kept tokens in
temporal order at their original positions, with the question after the video. Questions arrive
already validated by the camera's door (stream/door.py); the only refusal left here is a memory
or budget that leaves nothing to look at. Ingest never waits: the snapshot is a copy and
generation runs on this handler's own thread.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pruning import Pruner, TokenMemory

from .errors import RequestError
from .events import Answer, Question
from .vlm.base import DEFAULT_SYSTEM, TIMESTAMP_MODES, LayoutSettings, VideoLM

__all__ = ["DEFAULT_SYSTEM", "TIMESTAMP_MODES", "QueryHandler", "QuerySettings"]


@dataclass(frozen=True)
class QuerySettings:
    llm_budget: int = 0  # visual tokens the LLM may see; 0 = all the memory holds
    max_new_tokens: int = 32
    timestamps: str = "mrope"
    system_prompt: str = DEFAULT_SYSTEM


class QueryHandler:
    """Answers questions about one camera's memory, one at a time."""

    def __init__(self, vlm: VideoLM, memory: TokenMemory, settings: QuerySettings = QuerySettings()):
        self.vlm = vlm
        self.memory = memory
        self.settings = settings
        self.layout = LayoutSettings(system_prompt=settings.system_prompt, timestamps=settings.timestamps)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm")

    @property
    def pruner(self) -> Pruner:
        return self.memory.pruner

    def ask(self, question: Question, on_text: Callable[[str], None] | None = None,
            stop: threading.Event | None = None) -> Answer:
        """Answer from the memory as it is now (blocking; use `aask` from async code); generation
        ends early once `stop` is set."""
        snap = self.memory.snapshot()
        if len(snap) == 0:
            raise RequestError("empty_memory", "the memory holds no video yet; ask again once frames have arrived")
        budget = question.llm_budget or self.settings.llm_budget or len(snap)
        rows = self.pruner.rank_for_query(snap, self.vlm.question_embeds(question.text), budget)
        seen = snap.select(rows)
        if len(seen) == 0:
            raise RequestError("empty_memory", "the query budget left no visual tokens to answer from")
        prompt = self.vlm.layout(seen, question.text, self.layout)
        gen = self.vlm.generate(prompt, question.max_new_tokens or self.settings.max_new_tokens, on_text, stop=stop)
        return Answer(
            text=gen.text, question=question.text, t_start=float(seen.pts.min()), t_end=float(seen.pts.max()),
            groups=int(seen.groups().numel()), tokens_used=len(seen), memory_tokens=len(snap),
            prompt_tokens=len(prompt), new_tokens=gen.new_tokens, ttft_s=gen.ttft_s, total_s=gen.total_s,
        )

    async def aask(self, question: Question, on_text: Callable[[str], None] | None = None) -> Answer:
        """`ask` on the LLM thread, so the event loop and ingest keep running. Cancelling it (the
        asker went away, the camera stops) also ends the generation after its current token."""
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        try:
            return await loop.run_in_executor(self._executor, self.ask, question, on_text, stop)
        except asyncio.CancelledError:
            stop.set()
            raise

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
