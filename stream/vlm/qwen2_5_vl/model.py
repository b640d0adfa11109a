"""Qwen2.5-VL: the vision tower + merger as a rolling encoder, and the LLM over `inputs_embeds`
with our own M-RoPE positions (absolute-time aligned, anchored at the first kept group).

Prompt layout, question last so the video block's KV can be reused between questions:
`[system + the user turn's opening][video][span line + "\n" + question + assistant prompt]`.
- `timestamps = "mrope"` (Qwen2.5-VL's own rule): one vision block, time carried by the t
  positions; the line after it names the covered span.
- `timestamps = "text"` (Qwen3-VL's rule): each group is `<t seconds>` text and its own vision
  block; no span line.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pruning import TokenSet

from ..base import Generation, LayoutSettings, Prompt
from ..positions import TextPart, VisualPart, build_positions
from ..streamer import FirstTokenStreamer, StopWhenSet
from .positions import group_time_text, time_offsets
from .preprocess import VisionGeometry, frames_to_pairs, patchify

VIDEO_PLACEHOLDER = "\x00video\x00"


class Qwen2_5_VL:
    """A loaded Qwen2.5-VL behind the `VideoLM` seam (stream/vlm/base.py)."""

    def __init__(self, model, tokenizer, name: str, random_weights: bool, max_pixels: int):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.random_weights = random_weights
        vc = model.config.vision_config
        self.geometry = VisionGeometry(
            patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
            temporal_patch_size=vc.temporal_patch_size, max_pixels=max_pixels,
        )
        self.tokens_per_second = float(vc.tokens_per_second)
        self.hidden_size = int(model.config.text_config.hidden_size)
        self.eos_ids = self._eos_ids()
        self.vision_start_id = int(model.config.vision_start_token_id)
        self.vision_end_id = int(model.config.vision_end_token_id)
        self.video_token_id = int(model.config.video_token_id)

    @classmethod
    def from_pretrained(cls, path: str, name: str, dtype: torch.dtype, device: str, max_pixels: int,
                        random_weights: bool) -> "Qwen2_5_VL":
        """Load a checkpoint directory or hub id (stream/vlm/registry.py picks this family)."""
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        tokenizer = AutoTokenizer.from_pretrained(path)
        net = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device)
        return cls(net, tokenizer, name=name, random_weights=random_weights, max_pixels=max_pixels)

    @property
    def group_size(self) -> int:
        return self.geometry.temporal_patch_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id or self.model.config.text_config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        return sorted({int(i) for i in ids if i is not None} | ({int(im_end)} if im_end is not None else set()))

    @torch.inference_mode()
    def encode(self, groups: list[list[np.ndarray]]) -> list[torch.Tensor]:
        """Frame groups (each up to `group_size` RGB frames) -> one [gh/2, gw/2, D] token grid
        per group. Groups of one size go through the tower in one call: Qwen's vision attention
        is per temporal group, so this equals encoding them one by one."""
        out: list[torch.Tensor | None] = [None] * len(groups)
        stacks = [frames_to_pairs(g, self.geometry) for g in groups]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, s in enumerate(stacks):
            by_shape.setdefault(s.shape[1:], []).append(i)
        m = self.geometry.merge_size
        for idxs in by_shape.values():
            pixels, (t, gh, gw) = patchify(np.concatenate([stacks[i] for i in idxs]), self.geometry)
            feats = self.model.model.get_video_features(
                pixel_values_videos=torch.from_numpy(pixels).to(self.device),
                video_grid_thw=torch.tensor([[t, gh, gw]], device=self.device),
            ).pooler_output[0]
            grid = feats.reshape(t, gh // m, gw // m, -1).cpu()
            for k, i in enumerate(idxs):
                out[i] = grid[k]
        return out  # type: ignore[return-value]

    def tokenize(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)

    @torch.inference_mode()
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids.to(self.device)).cpu()

    def question_embeds(self, text: str) -> torch.Tensor:
        """The LLM input-embedding rows of the question's tokens [L, D] (for query-aware pruning)."""
        return self.embed_ids(self.tokenize(text)).float()

    def chat_parts(self, system: str, after_video: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The chat template rendered around the video: (ids before it, ids after it up to the
        assistant prompt). The video opens the user turn, so the ids before it depend on the
        system prompt only. The caller adds the vision start/end tokens."""
        text = self.tokenizer.apply_chat_template(
            [{"role": "system", "content": system},
             {"role": "user", "content": f"{VIDEO_PLACEHOLDER}{after_video}"}],
            tokenize=False, add_generation_prompt=True,
        )
        before, after = text.split(VIDEO_PLACEHOLDER)
        return self.tokenize(before), self.tokenize(after)

    def layout(self, seen: TokenSet, question: str, settings: LayoutSettings) -> Prompt:
        """The prompt for `question` over the kept tokens `seen` (in temporal order), with the
        video placed before everything that varies per question."""
        t0, t1 = float(seen.pts.min()), float(seen.pts.max())
        span = f"Video from {t0:.1f} s to {t1:.1f} s of the stream." if settings.timestamps == "mrope" else ""
        before, after = self.chat_parts(settings.system_prompt, f"{span}\n{question}")
        vs, ve = torch.tensor([self.vision_start_id]), torch.tensor([self.vision_end_id])
        parts: list[TextPart | VisualPart] = [TextPart(before)]
        if settings.timestamps == "mrope":
            parts += [TextPart(vs), _visual(seen, time_offsets(seen.pts, t0, self.tokens_per_second)), TextPart(ve)]
        else:
            for g in seen.groups().tolist():
                sub = seen.select(torch.nonzero(seen.group == g).flatten())
                parts += [TextPart(torch.cat([self.tokenize(group_time_text(float(sub.pts[0]))), vs])),
                          _visual(sub, torch.zeros(len(sub), dtype=torch.long)), TextPart(ve)]
        prefix_len = sum(_length(p) for p in parts)
        parts.append(TextPart(after))
        embeds, positions = self.embed_parts(parts)
        ids = torch.cat([p.ids if isinstance(p, TextPart) else torch.full((len(p.tokens),), self.video_token_id)
                         for p in parts])
        return Prompt(inputs_embeds=embeds, position_ids=positions, prefix_len=prefix_len, ids=ids, parts=tuple(parts))

    @torch.inference_mode()
    def embed_parts(self, parts: list[TextPart | VisualPart]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_embeds [1, L, D], position_ids [3, 1, L]) for a prompt."""
        emb = self.model.get_input_embeddings()
        chunks = []
        for part in parts:
            if isinstance(part, TextPart):
                chunks.append(emb(part.ids.to(self.device)))
            else:
                chunks.append(part.tokens.to(self.device, self.dtype))
        embeds = torch.cat(chunks).unsqueeze(0)
        return embeds, build_positions(parts).unsqueeze(1).to(self.device)

    @torch.inference_mode()
    def generate(self, prompt: Prompt, max_new_tokens: int, on_text: Callable[[str], None] | None = None,
                 cache: Any = None, stop: threading.Event | None = None) -> Generation:
        """Greedy decoding over `inputs_embeds` with explicit positions and attention mask.

        `cache` (a transformers `Cache`) may hold the KV of the prompt's first tokens, at most
        `prefix_len` of them: `generate` prefills only the rest, then crops the cache back, so
        the caller keeps its prefix."""
        held = 0 if cache is None else cache.get_seq_length()
        if held > prompt.prefix_len:
            raise ValueError(f"the cache holds {held} tokens, more than the prompt's prefix of {prompt.prefix_len}")
        streamer = FirstTokenStreamer(self.tokenizer, on_text)
        t0 = time.perf_counter()
        try:
            out = self.model.generate(
                inputs_embeds=prompt.inputs_embeds, position_ids=prompt.position_ids,
                attention_mask=torch.ones(prompt.inputs_embeds.shape[:2], dtype=torch.long, device=self.device),
                past_key_values=cache, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                eos_token_id=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id,
                stopping_criteria=[StopWhenSet(stop)] if stop is not None else None,
            )
        finally:
            if cache is not None and cache.get_seq_length() > held:
                cache.crop(held - cache.get_seq_length())
        total = time.perf_counter() - t0
        ids = out[0].tolist()
        while ids and ids[-1] in self.eos_ids:
            ids.pop()
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        ttft = (streamer.first_token_at - t0) if streamer.first_token_at else total
        return Generation(text=text, new_tokens=len(out[0]), ttft_s=ttft, total_s=total)


def _visual(s: TokenSet, t: torch.Tensor) -> VisualPart:
    return VisualPart(tokens=s.tokens, t=t, row=s.row, col=s.col, extras=dict(s.extras) or None)


def _length(part: TextPart | VisualPart) -> int:
    return int(part.ids.numel()) if isinstance(part, TextPart) else len(part.tokens)
