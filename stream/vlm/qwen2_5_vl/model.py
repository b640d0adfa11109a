"""Qwen2.5-VL: the vision tower + merger as a rolling encoder, and the LLM over `inputs_embeds`
with our own M-RoPE positions (absolute-time aligned, anchored at the first kept group).

Prompt layout, question last so the video block's KV can be reused between questions:
`[system + the user turn's opening][video][span line + "\n" + question + assistant prompt]`.
- `timestamps = "mrope"` (Qwen2.5-VL's own rule): one vision block, time carried by the t
  positions; the line after it names the covered span. The prefix ends at the last visual
  token: `<|vision_end|>` opens the per-question suffix, so a new group appends to the prefix.
  Positions are anchored at the first held group, so a visual token's position depends on its
  own coordinates and that group only (dropping the first group re-anchors, and the prompt cache
  redoes the whole block then, as it does for any change at its first row).
- `timestamps = "text"` (Qwen3-VL's rule): each group is `<t seconds>` text and its own vision
  block; no span line.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch


from .. import patch_embed, vision_attention
from .. import preprocess_torch
from ..base import LayoutSettings, PromptPlan
from ..chat_llm import ChatLLM
from ..positions import TextPart, VisualPart, plan_of
from .positions import group_time_text, time_offsets
from .preprocess import VisionGeometry, batches_by_shape, prepare_group



class Qwen2_5_VL(ChatLLM):
    """A loaded Qwen2.5-VL behind the `VideoLM` seam (stream/vlm/base.py)."""

    # EchoPrune on Qwen: tau 0.5, matching against the whole previous group (Sec. 4.3, App. B.4)
    pruner_defaults = {"echoprune": {"tau": 0.5, "radius": None}}
    preprocess_on_device: bool | None = None  # `prepare` in torch on the model's device; None: unless that is the CPU

    def __init__(self, model, tokenizer, name: str, random_weights: bool, max_pixels: int):
        super().__init__(model, tokenizer, name, random_weights)
        vc = model.config.vision_config
        self.geometry = VisionGeometry(
            patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
            temporal_patch_size=vc.temporal_patch_size, max_pixels=max_pixels,
        )
        self.tokens_per_second = float(vc.tokens_per_second)
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
        vision_attention.install(net)  # the tower's attention in one call per layer, not a loop
        patch_embed.install(net)  # its Conv3d patch embedding as one matrix product
        return cls(net, tokenizer, name=name, random_weights=random_weights, max_pixels=max_pixels)

    @property
    def group_size(self) -> int:
        return self.geometry.temporal_patch_size

    @property
    def max_tokens_per_group(self) -> int:
        return self.geometry.max_pixels // self.geometry.factor ** 2

    def prepare(self, group: list[np.ndarray]) -> tuple[np.ndarray | torch.Tensor, tuple[int, int, int]]:
        """One group's patches and grid (`VideoLM.prepare`), on the model's device or the host."""
        if preprocess_torch.runs_on_device(self.preprocess_on_device, self.device):
            return preprocess_torch.prepare_group_torch(group, self.geometry, self.device)
        return prepare_group(group, self.geometry)

    def encode(self, groups: list[list[np.ndarray]]) -> list[torch.Tensor]:
        return self.encode_prepared([self.prepare(g) for g in groups])

    @torch.inference_mode()
    def encode_prepared(self, prepared: list[tuple[np.ndarray, tuple[int, int, int]]]) -> list[torch.Tensor]:
        """Prepared groups -> one [gh/2, gw/2, D] token grid each. Groups of one size go through
        the tower in one call: Qwen's vision attention is per temporal group, so this equals
        encoding them one by one."""
        out: list[torch.Tensor | None] = [None] * len(prepared)
        m = self.geometry.merge_size
        for idxs, pixels, (t, gh, gw) in batches_by_shape(prepared):
            feats = self.model.model.get_video_features(
                pixel_values_videos=torch.as_tensor(pixels).to(self.device),
                video_grid_thw=torch.tensor([[t, gh, gw]], device=self.device),
            ).pooler_output[0]
            grid = feats.reshape(t, gh // m, gw // m, -1).cpu()
            for k, i in enumerate(idxs):
                out[i] = grid[k]
        return out  # type: ignore[return-value]

    @functools.lru_cache(maxsize=4096)
    def _label(self, text: str) -> torch.Tensor:
        """A group's timestamp text and `<|vision_start|>` (tokenized once per distinct label)."""
        return torch.cat([self.tokenize(text), torch.tensor([self.vision_start_id])])

    def plan(self, rows: Any, question: str, settings: LayoutSettings) -> PromptPlan:
        """The prompt for `question` over the laid-out rows (their group, pts, row and col, in
        (group, row, col) order), with the video before everything that varies per question."""
        t0, t1 = float(rows.pts[0]), float(rows.pts[-1])
        span = f"Video from {t0:.1f} s to {t1:.1f} s of the stream." if settings.timestamps == "mrope" else ""
        before, after = self._before_video(settings.system_prompt), self.chat_parts(settings.system_prompt, f"{span}\n{question}")[1]
        vs, ve = torch.tensor([self.vision_start_id]), torch.tensor([self.vision_end_id])
        everything = torch.arange(len(rows.group))
        parts: list[TextPart | VisualPart] = [TextPart(torch.cat([before, vs]))]
        if settings.timestamps == "mrope":
            parts.append(VisualPart(everything, time_offsets(rows.pts, t0, self.tokens_per_second), rows.row, rows.col))
            prefix_end = len(parts)
            parts.append(TextPart(torch.cat([ve, after])))
        else:
            starts = torch.searchsorted(rows.group, torch.unique_consecutive(rows.group)).tolist() + [len(rows.group)]
            for k, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
                if k:
                    parts.append(TextPart(self._label(group_time_text(float(rows.pts[a])))))
                parts += [VisualPart(everything[a:b], torch.zeros(b - a, dtype=torch.long), rows.row[a:b], rows.col[a:b]),
                          TextPart(ve)]
            parts[0] = TextPart(torch.cat([before, self._label(group_time_text(t0))]))
            prefix_end = len(parts)
            parts.append(TextPart(after))
        return plan_of(parts, prefix_end, self.video_token_id)
