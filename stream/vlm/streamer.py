"""Streams generated text to a callback, records when the first new token appeared, and stops
a generation nobody waits for any more."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch
from transformers import StoppingCriteria


class FirstTokenStreamer:
    """A transformers `generate` streamer: `first_token_at` is the time to first token, and
    `on_text` gets each newly printable piece of the decoded answer."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.first_token_at: float | None = None
        self.ids: list[int] = []
        self._sent = 0
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt ids
            self._prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.ids.extend(value.flatten().tolist())
        if self.on_text is not None:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            if len(text) > self._sent and not text.endswith("\ufffd"):
                self.on_text(text[self._sent:])
                self._sent = len(text)

    def end(self) -> None:
        """Nothing buffered: `put` already flushed everything printable."""


class StopWhenSet(StoppingCriteria):
    """Ends greedy decoding after the current token once `flag` is set (an asker went away, the
    service is stopping): a cancelled answer costs at most one more token, not `max_new_tokens`."""

    def __init__(self, flag: threading.Event):
        self.flag = flag

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool, device=input_ids.device)
