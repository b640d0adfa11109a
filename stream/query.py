"""The query handler: runs the LLM over an immutable snapshot of the token memory.

Prompt layout: [system][video][question], where the video is the kept tokens in temporal
order at their original (t, row, col) M-RoPE positions, either
- `timestamps = "mrope"` (Qwen2.5-VL's own rule): one vision block, time carried by
  absolute-time-aligned t positions, preceded by one line of text naming the covered span; or
- `timestamps = "text"` (Qwen3-VL's rule): each group is `<t seconds>` text, then its own
  vision block, so the model reads each group's time.
Ingest never waits: the snapshot is a copy and generation runs on an executor thread.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from pruning import Pruner, TokenMemory, TokenSet

from .answer import Answer, QueryError
from .vlm.positions import TextPart, VisualPart, group_time_text, time_offsets
from .vlm.qwen import QwenVL

log = logging.getLogger(__name__)

TIMESTAMP_MODES = ("mrope", "text")
DEFAULT_SYSTEM = (
    "You are watching a live camera. The video below is what your memory kept of the stream; "
    "answer the question about it briefly and say when things happened."
)


@dataclass(frozen=True)
class QuerySettings:
    llm_budget: int = 0  # visual tokens the LLM may see; 0 = all the memory holds
    max_new_tokens: int = 32
    max_question_chars: int = 500
    timestamps: str = "mrope"
    system_prompt: str = DEFAULT_SYSTEM


class QueryHandler:
    """Answers questions about one camera's memory."""

    def __init__(self, vlm: QwenVL, memory: TokenMemory, settings: QuerySettings = QuerySettings()):
        if settings.timestamps not in TIMESTAMP_MODES:
            raise ValueError(f"timestamps must be one of {', '.join(TIMESTAMP_MODES)}, got {settings.timestamps!r}")
        self.vlm = vlm
        self.memory = memory
        self.settings = settings
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm")
        self.last_answer: Answer | None = None

    @property
    def pruner(self) -> Pruner:
        return self.memory.pruner

    def validate(self, question: str, llm_budget: int | None = None, max_new_tokens: int | None = None) -> str:
        """The cleaned question, or a QueryError naming what is wrong with the request."""
        if not isinstance(question, str) or not question.strip():
            raise QueryError("empty_question", "the question is empty")
        question = question.strip()
        limit = self.settings.max_question_chars
        if len(question) > limit:
            raise QueryError("question_too_long", f"the question has {len(question)} characters; the limit is {limit}")
        if llm_budget is not None and (not isinstance(llm_budget, int) or llm_budget < 1):
            raise QueryError("bad_llm_budget", f"llm_budget must be a positive integer, got {llm_budget!r}")
        if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= 1024):
            raise QueryError("bad_max_new_tokens", f"max_new_tokens must be an integer in 1..1024, got {max_new_tokens!r}")
        return question

    def ask(self, question: str, llm_budget: int | None = None, max_new_tokens: int | None = None,
            on_text: Callable[[str], None] | None = None) -> Answer:
        """Answer from the memory as it is now (blocking; use `aask` from async code)."""
        question = self.validate(question, llm_budget, max_new_tokens)
        snap = self.memory.snapshot()
        if len(snap) == 0:
            raise QueryError("empty_memory", "the memory holds no video yet; ask again once frames have arrived")
        budget = llm_budget or self.settings.llm_budget or len(snap)
        q_embeds = self.vlm.question_embeds(question)
        rows = self.pruner.rank_for_query(snap, q_embeds, budget)
        seen = snap.select(rows)
        if len(seen) == 0:
            raise QueryError("empty_memory", "the query budget left no visual tokens to answer from")
        parts = self.build_prompt(seen, question)
        embeds, positions = self.vlm.embed_parts(parts)
        gen = self.vlm.generate(embeds, positions, max_new_tokens or self.settings.max_new_tokens, on_text)
        answer = Answer(
            text=gen.text, ttft_s=gen.ttft_s, total_s=gen.total_s, tokens_used=len(seen),
            groups_covered=int(seen.groups().numel()), t_start=float(seen.pts.min()),
            t_end=float(seen.pts.max()), question=question, prompt_tokens=int(embeds.shape[1]),
            new_tokens=gen.new_tokens, memory_tokens=len(snap),
        )
        self.last_answer = answer
        return answer

    async def aask(self, question: str, llm_budget: int | None = None, max_new_tokens: int | None = None,
                   on_text: Callable[[str], None] | None = None) -> Answer:
        """`ask` on the LLM thread, so the event loop and ingest keep running."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: self.ask(question, llm_budget, max_new_tokens, on_text))

    def build_prompt(self, seen: TokenSet, question: str) -> list[TextPart | VisualPart]:
        """[system][video][question] as text and visual parts, in temporal order."""
        vlm = self.vlm
        vs, ve = torch.tensor([vlm.vision_start_id]), torch.tensor([vlm.vision_end_id])
        t0, t1 = float(seen.pts.min()), float(seen.pts.max())
        header = "" if self.settings.timestamps == "text" else f"Video from {t0:.1f} s to {t1:.1f} s of the stream."
        before, after = vlm.chat_parts(self.settings.system_prompt, question)
        parts: list[TextPart | VisualPart] = [TextPart(torch.cat([before, vlm.tokenize(header)]) if header else before)]
        if self.settings.timestamps == "mrope":
            parts += [TextPart(vs), self._visual(seen, time_offsets(seen.pts, t0, vlm.tokens_per_second)), TextPart(ve)]
        else:
            for g in seen.groups().tolist():
                sub = seen.select(torch.nonzero(seen.group == g).flatten())
                parts += [TextPart(torch.cat([vlm.tokenize(group_time_text(float(sub.pts[0]))), vs])),
                          self._visual(sub, torch.zeros(len(sub), dtype=torch.long)), TextPart(ve)]
        parts.append(TextPart(after))
        return parts

    @staticmethod
    def _visual(s: TokenSet, t: torch.Tensor) -> VisualPart:
        return VisualPart(tokens=s.tokens, t=t, row=s.row, col=s.col, extras=dict(s.extras) or None)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
