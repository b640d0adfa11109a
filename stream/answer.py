"""What a question gets back. Plain data (no torch) so sinks can take it without a model."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Answer:
    """An answer and its evidence: the span of video the memory covered and what it cost.

    `tokens_used` counts the visual tokens the LLM saw; `t_start`/`t_end` are the pts (seconds
    since stream start) of the first and last group it saw.
    """

    text: str
    ttft_s: float
    total_s: float
    tokens_used: int
    groups_covered: int
    t_start: float
    t_end: float
    question: str = ""
    prompt_tokens: int = 0
    new_tokens: int = 0
    memory_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class QueryError(ValueError):
    """A request that cannot be answered; `code` is stable for machines, the message for people."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
