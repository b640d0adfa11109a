"""Greedy decoding on a KV cache, shared by the families: prefill what the cache lacks, then one
token at a time, streaming text and stopping early when asked.

Our own loop rather than transformers' `generate`: `generate` needs `inputs_embeds` for the whole
prompt even when a cache holds most of it, cannot prefill `inputs_embeds` in chunks, and keeps
the cache it was given grown by the answer. Each step feeds the new token at the last position
+ 1 on every position row (what `generate` does; tested equal to it token for token). With a
layer schedule, the prefill and every step go through our own loop over the decoder layers,
which drops visual tokens at the schedule's stages (stream/vlm/layer_pruning.py).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from .base import Generation, Prompt
from .kv_cache import crop_to
from .layer_pruning import LayerPruned, Schedule

PREFILL_CHUNK = 1024  # tokens per forward when prefilling a long prompt


class TextStream:
    """Decodes the answer as it grows; `on_text` gets each newly printable piece."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self._sent = 0

    def put(self, token: int) -> None:
        self.ids.append(token)
        if self.on_text is not None:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            if len(text) > self._sent and not text.endswith("\ufffd"):
                self.on_text(text[self._sent:])
                self._sent = len(text)


def prefill(lm: Any, cache: Any, prompt: Prompt, end: int | None = None, logits: bool = False,
            chunk: int = PREFILL_CHUNK) -> torch.Tensor | None:
    """Run prompt tokens from `cache.get_seq_length()` (at least `prompt.start`) to `end` onto
    `cache`, `chunk` tokens per forward (chunked prefill equals one-shot prefill); the last
    token's logits when `logits`."""
    end = len(prompt) if end is None else end
    held = cache.get_seq_length()
    out = None
    while held < end:
        stop = min(end, held + chunk)
        embeds = prompt.inputs_embeds[:, held - prompt.start: stop - prompt.start]
        visual, extras = prompt.visual_rows(held, stop)
        out = lm.forward(cache, embeds, prompt.position_ids[..., held:stop], logits=logits and stop == end,
                         visual=visual, extras=extras)
        held = stop
    return out


@torch.inference_mode()
def generate(lm: Any, prompt: Prompt, max_new_tokens: int, on_text: Callable[[str], None] | None = None,
             cache: Any = None, stop: threading.Event | None = None, layer_schedule: Schedule = ()) -> Generation:
    """Greedy answer to `prompt` (see `VideoLM.generate`)."""
    own = cache is None
    if layer_schedule and not own:
        raise ValueError("layer pruning needs the whole prompt on a cache of its own, not a shared prefix")
    if own:
        cache = lm.new_cache(len(prompt) + max_new_tokens)
    held = cache.get_seq_length()
    if not prompt.start <= held <= prompt.prefix_len:
        raise ValueError(f"the cache holds {held} tokens; the prompt's embeddings start at token {prompt.start} "
                         f"and its prefix ends at {prompt.prefix_len}")
    pruned = LayerPruned(lm, layer_schedule) if layer_schedule else None
    stream = TextStream(lm.tokenizer, on_text)
    t0 = time.perf_counter()
    ttft = None
    try:
        if pruned is None:
            logits = prefill(lm, cache, prompt, logits=True)
        else:
            logits = pruned.prefill(cache, prompt)
        position = prompt.position_ids[..., -1:]
        while True:
            token = int(logits.argmax())
            stream.put(token)
            if ttft is None:
                ttft = time.perf_counter() - t0
            if token in lm.eos_ids or len(stream.ids) >= max_new_tokens or (stop is not None and stop.is_set()):
                break
            position = position + 1
            embeds = lm.embed_ids(torch.tensor([[token]]))
            if pruned is None:
                logits = lm.forward(cache, embeds, position, logits=True)
            else:
                logits = pruned.step(cache, embeds, position)
    finally:
        if not own:
            crop_to(cache, prompt.prefix_len)
    total = time.perf_counter() - t0
    ids = list(stream.ids)
    while ids and ids[-1] in lm.eos_ids:
        ids.pop()
    text = lm.tokenizer.decode(ids, skip_special_tokens=True).strip()
    stages = tuple(t.visual_tokens for t in pruned.trace) if pruned is not None else ()
    return Generation(text=text, new_tokens=len(stream.ids), ttft_s=ttft if ttft is not None else total, total_s=total,
                      stage_tokens=stages)
