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

from typing import Any

import torch

from ..base import LayoutSettings, PromptPlan
from ..chat_llm import ChatLLM
from ..instance_cache import instance_cache
from ..positions import TextPart, VisualPart, plan_of
from .positions import group_time_text, time_offsets
from .preprocess import VisionGeometry
from .tower import QwenTower, speed_up


class Qwen2_5_VL(QwenTower, ChatLLM):
    """A loaded Qwen2.5-VL behind the `VideoLM` seam (stream/vlm/base.py)."""

    # EchoPrune on Qwen: tau 0.5, matching against the whole previous group (Sec. 4.3, App. B.4)
    pruner_defaults = {"echoprune": {"tau": 0.5, "radius": None}}

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
        speed_up(net)
        return cls(net, tokenizer, name=name, random_weights=random_weights, max_pixels=max_pixels)

    def _grid_inputs(self, visual: torch.nn.Module, grid: torch.Tensor) -> dict[str, Any]:
        from transformers.utils.generic import get_max_seqlen
        from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

        cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid, visual.config)
        window_index, cu_window_seqlens = get_vision_window_index(
            grid, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
            patch_size=visual.patch_size)
        return {"position_ids": get_vision_position_ids(grid, visual.spatial_merge_size),
                "cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen,
                "window_index": window_index, "cu_window_seqlens": cu_window_seqlens,
                "max_window_seqlen": get_max_seqlen(cu_window_seqlens, visual.config)}

    def _per_group(self, feats: Any, t: int, h: int, w: int) -> list[torch.Tensor]:
        """One [h, w, D] token grid per group, on the model's device (where the memory lives)."""
        return list(feats.pooler_output[0].reshape(t, h, w, -1))

    @instance_cache(maxsize=4096)
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
