"""LLaVA-OneVision: the SigLIP tower, projector and pooling as a rolling encoder, and the Qwen2 LLM
over `inputs_embeds` with 1-D positions.

Encoding: a group is one frame. Each frame is resized straight to the tower's square input
(stream/vlm/llava_ov/preprocess.py), and the model's own `get_video_features` runs the tower, the
projector and the per-frame bilinear pooling of its P x P patches to ceil(P/2) x ceil(P/2)
tokens (196 at 384 px). Frames are independent in all three, so a batch of frames equals them
one by one; the learned `image_newline` row that call appends after the last frame is dropped,
and the prompt adds it once (below).

Prompt layout, the chat template LLaVA-OV's converter ships, question last so the video's KV can
be reused between questions: `[system][user turn's opening][frames][newline + question part]`,
that is `<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n`, the frames' tokens, then
the newline vector and `\n{question}<|im_end|>\n<|im_start|>assistant\n`.
- The system message is there only when `system_prompt` is set (LLaVA-OV has no default one).
  The text is rendered here rather than by the tokenizer's template: a converted checkpoint's
  tokenizer may carry Qwen2-Instruct's template, which adds its own system prompt.
- The frames' tokens follow each other in (group, row, col) order, as the processor expands
  `<video>`. The video ends with one learned newline vector (`image_newline`), after the last
  frame only. In the plan it is a `<video>` id that shows no row, at index `prefix_len`: the
  processor's last `<video>` placeholder, which `embed` fills with `image_newline`. It opens the
  per-question suffix, so the prefix ends at the last visual token and a new frame appends to it;
  being outside the prefix, it is in no `PromptPlan.key`, and it never changes anyway.
- A plan's keys also carry each visual token's (row, col) in its frame (`CellPlan`): the
  positions do not say which token of a frame sits where, so after an eviction inside a frame
  the id, position and stamp alone would not show that the token there changed.
- Time: LLaVA-OV's native layout has none. With `timestamps = "mrope"` (no M-RoPE here) the
  prompt is that native layout. With `"text"` each frame's tokens are preceded by a
  `<t seconds>` label (the Qwen3-VL style label, a departure from the native layout for
  streams that need "when"): a frame's label depends on its own pts only, so a new frame still
  appends label and tokens to the prefix.

Positions: 1-D, the running index `torch.arange(L)[None]`, as the model's own forward numbers
them; a pruned frame simply has fewer tokens, so a row's position is the count of tokens before
it (an earlier eviction moves it, and the prompt cache redoes the prompt from the evicted row
on, as for any change there). Always given with a full-length attention mask: transformers
takes 1-D positions without a mask or a cache as packed sequences.

`max_pixels` does not apply: the tower's input size is fixed (`vision_config.image_size`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pruning import host_sync

from .. import preprocess_torch
from ..base import LayoutSettings, PromptPlan
from ..chat_llm import ChatLLM
from ..instance_cache import instance_cache
from ..qwen2_5_vl.positions import group_time_text
from .preprocess import FrameGeometry, checkpoint_normalisation, preprocess_frame


@dataclass(frozen=True)
class CellPlan(PromptPlan):
    """A plan whose keys also name each visual token's cell (row, col) in its frame. A frame's
    tokens share one stamp, and a running 1-D position says only how many tokens come before, so
    without the cell a token evicted from a frame would leave the next one of that frame with the
    key it had: same id, position and stamp, another vector."""

    cells: torch.Tensor  # [L, 2] long: a visual token's (row, col); -1 for text

    def key(self, stamps: torch.Tensor) -> torch.Tensor:
        return torch.cat([super().key(stamps), self.cells[:self.prefix_len]], dim=1)


class LlavaOneVision(ChatLLM):
    """A loaded LLaVA-OneVision behind the `VideoLM` seam (stream/vlm/base.py)."""

    # EchoPrune on LLaVA-OneVision: tau 0.1, matching in the 3x3 window around each token (Sec. 4.3, App. B.3)
    pruner_defaults = {"echoprune": {"tau": 0.1, "radius": 1}}
    preprocess_on_device: bool | None = None  # `prepare` in torch on the model's device; None: unless that is the CPU

    def __init__(self, model, tokenizer, name: str, random_weights: bool, geometry: FrameGeometry):
        super().__init__(model, tokenizer, name, random_weights)
        self.geometry = geometry
        vc = model.config.vision_config
        self.side = math.ceil((vc.image_size // vc.patch_size) / 2)  # pooled tokens per frame side
        self.video_token_id = int(model.config.video_token_id)

    @classmethod
    def from_pretrained(cls, path: str, name: str, dtype: torch.dtype, device: str, max_pixels: int,
                        random_weights: bool) -> "LlavaOneVision":
        """Load a checkpoint directory or hub id (stream/vlm/registry.py picks this family);
        `max_pixels` is not used (the tower's input size is fixed)."""
        from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

        tokenizer = AutoTokenizer.from_pretrained(path)
        net = LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device)
        mean, std = checkpoint_normalisation(path)
        geometry = FrameGeometry(size=int(net.config.vision_config.image_size), mean=mean, std=std)
        return cls(net, tokenizer, name=name, random_weights=random_weights, geometry=geometry)

    @property
    def group_size(self) -> int:
        return 1

    @property
    def max_tokens_per_group(self) -> int:
        return self.side * self.side

    def prepare(self, group: list[np.ndarray]) -> np.ndarray | torch.Tensor:
        """One frame's tower input [3, S, S] (`VideoLM.prepare`), on the model's device or the host."""
        if len(group) != 1:
            raise ValueError(f"a LLaVA-OneVision group is one frame; got a group of {len(group)}")
        if preprocess_torch.runs_on_device(self.preprocess_on_device, self.device):
            return preprocess_torch.preprocess_frame_torch(group[0], self.geometry, self.device)
        return preprocess_frame(group[0], self.geometry)

    def encode(self, groups: list[list[np.ndarray]]) -> list[torch.Tensor]:
        return self.encode_prepared([self.prepare(g) for g in groups])

    @torch.inference_mode()
    def encode_prepared(self, prepared: list[np.ndarray]) -> list[torch.Tensor]:
        """Prepared frames -> one [ceil(P/2), ceil(P/2), D] token grid each, all in one call (the
        tower, projector and pooling work frame by frame)."""
        if not prepared:
            return []
        pixels = torch.stack([torch.as_tensor(p) for p in prepared])[None]
        feats = self.model.model.get_video_features(
            pixel_values_videos=host_sync.to_device(pixels, self.device).to(self.dtype)).pooler_output[0, :-1]
        return list(feats.reshape(len(prepared), self.side, self.side, -1))

    @instance_cache(maxsize=4096)
    def _label(self, text: str) -> torch.Tensor:
        """A frame's timestamp text (tokenized once per distinct label)."""
        return self.tokenize(text)

    @instance_cache(maxsize=64)
    def _before_video(self, system: str) -> torch.Tensor:
        """The system message (when there is one) and the opening of the user turn."""
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return self.tokenize(f"{head}<|im_start|>user\n")

    def _after_video(self, question: str) -> torch.Tensor:
        """The question and the assistant prompt, after the video's newline."""
        return self.tokenize(f"\n{question}<|im_end|>\n<|im_start|>assistant\n")

    def plan(self, rows: Any, question: str, settings: LayoutSettings) -> PromptPlan:
        """The prompt for `question` over the laid-out rows (their group, pts, row and col, in
        (group, row, col) order): the video, its newline at `prefix_len`, then the question."""
        n = len(rows.group)
        every = torch.arange(n)
        parts = [(self._before_video(settings.system_prompt), None)]  # (ids, the rows they show or None)
        if settings.timestamps == "text" and n:
            starts = torch.searchsorted(rows.group, torch.unique_consecutive(rows.group)).tolist() + [n]
            for a, b in zip(starts[:-1], starts[1:]):
                parts += [(self._label(group_time_text(float(rows.pts[a]))), None),
                          (torch.full((b - a,), self.video_token_id), every[a:b])]
        else:
            parts.append((torch.full((n,), self.video_token_id), every))
        prefix_len = sum(len(i) for i, _ in parts)
        parts += [(torch.tensor([self.video_token_id]), None), (self._after_video(question), None)]
        ids = torch.cat([i for i, _ in parts]).to(torch.long)
        visual = torch.cat([torch.full((len(i),), -1, dtype=torch.long) if r is None else r for i, r in parts])
        cells = torch.full((len(ids), 2), -1, dtype=torch.long)
        is_vis = visual >= 0
        cells[is_vis] = torch.stack([rows.row, rows.col], dim=1).to(torch.long)[visual[is_vis]]
        return CellPlan(ids=ids, position_ids=torch.arange(len(ids))[None], visual=visual, prefix_len=prefix_len,
                        cells=cells)

    @torch.inference_mode()
    def embed(self, plan: PromptPlan, visual: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Input embeddings [1, end - start, D] of plan tokens start..end: the visual tokens among
        them from `visual` in order, the video's newline (at `prefix_len`) from `image_newline`."""
        end = len(plan) if end is None else end
        out = self.embed_visual(plan, visual, start, end)
        if start <= plan.prefix_len < end:
            out[plan.prefix_len - start] = self.model.model.image_newline.to(self.dtype)
        return out.unsqueeze(0)
