"""The query handler: answers a camera's questions from its token memory on the LLM's thread.

The model family lays out the prompt (stream/vlm/base.py): the kept tokens in temporal order at
their original positions, the question after the video. Two paths, the same answer:
- `cached` (the default when every held token is shown): the camera's prompt cache
  (stream/prompt_cache.py) already holds the KV of the system text and the video, kept current
  in the background as groups arrive; the question prefills only what it lacks (its own tokens,
  and at most the newest groups when ingest is ahead of the cache), with no copy of the memory.
- `full`: the whole prompt is prefilled for this question alone. Taken with `prompt_cache`
  off, when a question budget (`llm_budget` below what the memory holds) has a query-aware
  ranking pick a question-dependent subset, which no shared prefix can serve, and when the
  prompt would not fit in the cache's limit. With `layer_pruning` set, this prefill drops
  visual tokens inside the LLM at the schedule's stages (stream/vlm/layer_pruning.py); the
  cached path never does: its shared KV is question-independent, and the question's suffix
  runs over all of it (docs/DESIGN.md, "Layer pruning and the prompt cache").
A pruner whose `query_layer` is K ranks by the question's hidden states at decoder layer
K (`VideoLM.question_states`), not by its input embeddings.
Questions arrive already validated by the camera's door (stream/door.py); the only refusal left
here is a memory or budget that leaves nothing to look at.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from pruning import Pruner, TokenMemory

from .errors import RequestError
from .events import Answer, Question
from .prompt_cache import UNBOUNDED, PromptCache
from .vlm.base import DEFAULT_SYSTEM, TIMESTAMP_MODES, Generation, LayoutSettings, VideoLM

__all__ = ["DEFAULT_SYSTEM", "TIMESTAMP_MODES", "QueryHandler", "QuerySettings"]

log = logging.getLogger(__name__)

CACHED, FULL = "cached", "full"


@dataclass(frozen=True)
class QuerySettings:
    llm_budget: int = 0  # visual tokens the LLM may see; 0 = all the memory holds
    max_new_tokens: int = 32
    timestamps: str = "mrope"
    system_prompt: str = DEFAULT_SYSTEM
    prompt_cache: bool = True
    prompt_cache_tokens: int = UNBOUNDED  # the cache's limit in prompt tokens
    frame_interval_s: float = 0.5  # between sampled frames (1 / sampler fps)
    layer_pruning: tuple[tuple[int, float], ...] = ()  # (layer, keep share) stages on the full path; () = off


class QueryHandler:
    """Answers questions about one camera's memory, one at a time, and keeps its prompt cache."""

    def __init__(self, vlm: VideoLM, memory: TokenMemory, settings: QuerySettings = QuerySettings()):
        self.vlm = vlm
        self.memory = memory
        self.settings = settings
        self.layout = LayoutSettings(system_prompt=settings.system_prompt, timestamps=settings.timestamps,
                                     frame_interval_s=settings.frame_interval_s)
        self.cache = PromptCache(vlm, memory, self.layout, settings.prompt_cache_tokens) if settings.prompt_cache else None
        self.paths = {CACHED: 0, FULL: 0}
        self.refresh_errors = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm")
        self._lock = threading.Lock()
        self._waiting = 0  # questions submitted to the LLM thread and not started
        self._refresh_pending = False
        self._closed = False

    @property
    def pruner(self) -> Pruner:
        return self.memory.pruner

    def ask(self, question: Question, on_text: Callable[[str], None] | None = None,
            stop: threading.Event | None = None) -> Answer:
        """Answer from the memory as it is now, on the LLM thread (blocking; use `aask` from
        async code); generation ends early once `stop` is set."""
        return self._submit(question, on_text, stop or threading.Event()).result()

    def _submit(self, question: Question, on_text, stop: threading.Event) -> Future:
        with self._lock:
            self._waiting += 1
        return self._executor.submit(self._started, question, on_text, stop)

    def _started(self, question: Question, on_text, stop: threading.Event) -> Answer:
        with self._lock:
            self._waiting -= 1
        return self._answer_now(question, on_text, stop)

    def _answer_now(self, question: Question, on_text, stop: threading.Event) -> Answer:
        """The LLM thread's part of `ask`: only this thread touches the prompt cache."""
        t0 = time.perf_counter()
        max_new = question.max_new_tokens or self.settings.max_new_tokens
        while True:
            lay = self.memory.layout()
            held = int(lay.group.numel())
            if held == 0:
                raise RequestError("empty_memory", "the memory holds no video yet; ask again once frames have arrived")
            budget = question.llm_budget or self.settings.llm_budget or held
            if self.cache is None or budget < held:
                break
            plan = self.vlm.plan(lay, question.text, self.layout)
            if not self.cache.fits(len(plan) + max_new):
                self.cache.stats.over_limit += 1
                break
            want = self.cache.sync(plan, lay.stamp)
            prompt = self.cache.prompt(plan, lay.version)
            if prompt is None:  # ingest changed the memory between its columns and its vectors
                continue
            try:
                gen = self.vlm.generate(prompt, max_new, on_text, cache=self.cache.kv, stop=stop)
            except BaseException:
                self.cache.drop()
                raise
            self.cache.extended(want, plan.prefix_len)
            groups = int(lay.group.unique_consecutive().numel())
            return self._answer(question, gen, t0, CACHED, len(plan) - prompt.start, len(plan),
                                float(lay.pts[0]), float(lay.pts[-1]), groups, held, held)
        return self._full(question, max_new, on_text, stop, t0)

    def _full(self, question: Question, max_new: int, on_text, stop, t0: float) -> Answer:
        """Rank the memory in place (ingest waits meanwhile) and copy only the rows picked."""
        query = self._query_embeds(question.text).to(self.memory.device)
        with self.memory.frozen() as view:
            held = len(view)
            if held == 0:
                raise RequestError("empty_memory", "the memory holds no video yet; ask again once frames have arrived")
            budget = question.llm_budget or self.settings.llm_budget or held
            rows = self.pruner.rank_for_query(view, query, budget)
            seen = view.select(rows).columns_on_host()
        if len(seen) == 0:
            raise RequestError("empty_memory", "the query budget left no visual tokens to answer from")
        prompt = self.vlm.layout(seen, question.text, self.layout)
        gen = self.vlm.generate(prompt, max_new, on_text, stop=stop, layer_schedule=self.settings.layer_pruning)
        return self._answer(question, gen, t0, FULL, len(prompt), len(prompt), float(seen.pts.min()),
                            float(seen.pts.max()), int(seen.groups().numel()), len(seen), held)

    def _query_embeds(self, text: str):
        """What the pruner ranks by: the question's hidden states at its `query_layer`, when it
        names one (HieraVid's instruction state, Eq. 8), else its input embeddings."""
        layer = self.pruner.query_layer
        return self.vlm.question_embeds(text) if layer is None else self.vlm.question_states(text, layer)

    def _answer(self, question: Question, gen: Generation, t0: float, path: str, prefilled: int, prompt_tokens: int,
                t_start: float, t_end: float, groups: int, used: int, held: int) -> Answer:
        before = time.perf_counter() - t0 - gen.total_s  # layout, ranking, gathering: before the prefill
        self.paths[path] += 1
        return Answer(
            text=gen.text, question=question.text, t_start=t_start, t_end=t_end, groups=groups, tokens_used=used,
            memory_tokens=held, prompt_tokens=prompt_tokens, prefilled_tokens=prefilled, prompt_path=path,
            new_tokens=gen.new_tokens, ttft_s=before + gen.ttft_s, total_s=before + gen.total_s,
            layer_visual_tokens=gen.stage_tokens[-1] if gen.stage_tokens else 0,
        )

    async def aask(self, question: Question, on_text: Callable[[str], None] | None = None) -> Answer:
        """`ask` on the LLM thread, so the event loop and ingest keep running. Cancelling it (the
        asker went away, the camera stops) also ends the generation after its current token."""
        stop = threading.Event()
        job = self._submit(question, on_text, stop)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            stop.set()
            if job.cancel():  # it never started, so it never counted itself out of the waiting
                with self._lock:
                    self._waiting -= 1
            raise

    def refresh_soon(self) -> None:
        """Have the LLM thread bring the prompt cache current once it is free (thread-safe;
        called by ingest after each group; one pending refresh covers any number of groups)."""
        if self.cache is None:
            return
        with self._lock:
            if self._refresh_pending or self._closed:
                return
            self._refresh_pending = True
            self._executor.submit(self._refresh)

    def _refresh(self) -> None:
        with self._lock:
            self._refresh_pending = False
        try:
            self.cache.refresh(lambda: self._waiting > 0 or self._closed)
        except Exception:
            self.refresh_errors += 1
            log.exception("keeping the prompt cache current failed; the next question prefills what it lacks")

    def cache_report(self) -> dict:
        """The prompt cache for the camera's status: {} when it is off."""
        if self.cache is None:
            return {}
        return {**self.cache.report(), "answers_cached": self.paths[CACHED], "answers_full": self.paths[FULL],
                "refresh_errors": self.refresh_errors}

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)

