"""Qwen2.5-VL backend: the vision tower + merger as a rolling encoder, and the LLM over
`inputs_embeds` with our own M-RoPE positions.

`QwenVL.load("tiny-random")` builds the tiny model (stream/vlm/tiny.py) and loads it back; any
other name is a hub id or a local directory handed to the same `from_pretrained`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..positions import TextPart, VisualPart, build_positions
from .preprocess import VisionGeometry, frames_to_pairs, patchify
from .tiny import TINY_NAME, ensure_tiny_model

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUPPORTED_TYPES = ("qwen2_5_vl",)
VIDEO_PLACEHOLDER = "\x00video\x00"


@dataclass(frozen=True)
class Generation:
    text: str
    new_tokens: int
    ttft_s: float
    total_s: float


class _FirstTokenStreamer:
    """Records when the first new token appears and streams decoded text to a callback."""

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


class QwenVL:
    """A loaded Qwen2.5-VL with the pieces the pipeline uses."""

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

    @classmethod
    def load(cls, model: str = TINY_NAME, dtype: str = "float32", device: str = "cpu",
             max_pixels: int = 448 * 448, cache: Path | None = None) -> "QwenVL":
        """Load by hub id or local path through `from_pretrained`; `tiny-random` is built first."""
        from transformers import AutoConfig, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        random_weights = model == TINY_NAME
        path = str(ensure_tiny_model(cache)) if random_weights else model
        config = AutoConfig.from_pretrained(path)
        if config.model_type not in SUPPORTED_TYPES:
            raise ValueError(f"model {model!r} is a {config.model_type!r}; supported: {', '.join(SUPPORTED_TYPES)}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        net = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=DTYPES[dtype]).to(device)
        log.info("loaded %s (%s, %s)%s", model, dtype, device, " with RANDOM weights" if random_weights else "")
        return cls(net, tokenizer, name=model, random_weights=random_weights, max_pixels=max_pixels)

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
        """Frame groups (each up to `temporal_patch_size` RGB frames) -> one [gh/2, gw/2, D]
        token grid per group. Groups of one size go through the tower in one call: Qwen's
        vision attention is per temporal group, so this equals encoding them one by one."""
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

    def question_embeds(self, question: str) -> torch.Tensor:
        """The LLM input-embedding rows of the question's tokens [L, D] (for query-aware pruning)."""
        return self.embed_ids(self.tokenize(question)).float()

    def chat_parts(self, system: str, user: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The chat template rendered around the video: (ids before the video, ids after it up
        to the assistant prompt). The caller adds the vision start/end tokens."""
        text = self.tokenizer.apply_chat_template(
            [{"role": "system", "content": system},
             {"role": "user", "content": f"{VIDEO_PLACEHOLDER}\n{user}"}],
            tokenize=False, add_generation_prompt=True,
        )
        before, after = text.split(VIDEO_PLACEHOLDER)
        return self.tokenize(before), self.tokenize(after)

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
    def generate(self, embeds: torch.Tensor, positions: torch.Tensor, max_new_tokens: int,
                 on_text: Callable[[str], None] | None = None) -> Generation:
        """Greedy decoding over `inputs_embeds` with explicit positions and attention mask."""
        streamer = _FirstTokenStreamer(self.tokenizer, on_text)
        t0 = time.perf_counter()
        out = self.model.generate(
            inputs_embeds=embeds, position_ids=positions,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device),
            max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
            eos_token_id=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id,
        )
        total = time.perf_counter() - t0
        ids = out[0].tolist()
        while ids and ids[-1] in self.eos_ids:
            ids.pop()
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        ttft = (streamer.first_token_at - t0) if streamer.first_token_at else total
        return Generation(text=text, new_tokens=len(out[0]), ttft_s=ttft, total_s=total)
