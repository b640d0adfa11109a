"""Qwen3-VL (dense and MoE): the vision tower + merger as a rolling encoder that also keeps each
token's deepstack features, and the LLM over `inputs_embeds` with Qwen3-VL's own positions and
the deepstack features added inside it.

Prompt layout, question last so the video's KV can be reused between questions:
`[system + the user turn's opening][<t seconds><|vision_start|> group <|vision_end|>]...[question
+ assistant prompt]`, each held group a block of its own with nothing between blocks, as
`Qwen3VLProcessor` expands a video. t is the mean time of the group's frames, as the processor
computes it: the group's pts is its first frame's, so t = pts + (group_size - 1) x the frame
interval / 2, printed `:.1f`. Qwen3-VL carries time in that text (a group's tokens share one t
position), so both `timestamps` modes give this layout. The prefix ends at the last visual
token: the last group's `<|vision_end|>` opens the per-question suffix, so a new group is
appended to the prefix. The question follows `<|vision_end|>` directly, as the chat template
renders a video followed by text.

Positions (stream/vlm/qwen3_vl/positions.py): text at the running index, a group's tokens at
(c, c + row, c + col) after its `<|vision_start|>`, the cursor then c + max(H, W). (H, W) is the
memory's token grid (`rows.grid`), so the cursor does not depend on what was pruned from a
group, and a dense clip gets exactly `get_rope_index`'s positions; a camera changing resolution
re-positions the held groups once (the prompt cache sees new keys and redoes them), and a group
holding tokens beyond the grid (from before such a change) extends its own extent to cover them.
The grid aside, every prefix token depends on its own row and the rows before it only.

Deepstack: the tower also gives, per token, one feature per `deepstack_visual_indexes` entry
(ViT layers); the model adds feature j to the output of LLM decoder layer j on the visual rows. `encode` returns them with the tokens (extras {"deepstack": [n, H, W, D]}), the
memory keeps and evicts them with their token (a kept token holds 1 + n vectors of width D),
and `forward` hands each chunk's rows to the LLM, which it calls directly: the top-level
forward takes no deepstack arguments, only pixels.

Departures: a per-frame pixel budget of our own (stream/vlm/qwen3_vl/preprocess.py); a group
short of frames (the stream's last) is padded with its last frame, as the processor pads, but
labelled as a full group.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pruning import TokenSet

from ..base import LayoutSettings, Prompt, PromptPlan
from ..chat_llm import ChatLLM
from ..instance_cache import instance_cache
from ..positions import TextPart, VisualPart, plan_of
from ..qwen2_5_vl.tower import QwenTower, speed_up
from .positions import group_time, time_label
from .preprocess import DEFAULT_MEAN, DEFAULT_STD, geometry, normalization

DEEPSTACK = "deepstack"


def model_class(model_type: str):
    """The transformers class of a Qwen3-VL checkpoint (dense or MoE)."""
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    classes = {"qwen3_vl": Qwen3VLForConditionalGeneration, "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration}
    if model_type not in classes:
        raise ValueError(f"not a Qwen3-VL model type: {model_type!r} (expected one of {', '.join(classes)})")
    return classes[model_type]


class Qwen3_VL(QwenTower, ChatLLM):
    """A loaded Qwen3-VL or Qwen3-VL-MoE behind the `VideoLM` seam (stream/vlm/base.py)."""

    # EchoPrune on Qwen: tau 0.5, matching against the whole previous group (Sec. 4.3, App. B.4)
    pruner_defaults = {"echoprune": {"tau": 0.5, "radius": None}}

    def __init__(self, model, tokenizer, name: str, random_weights: bool, max_pixels: int,
                 mean: tuple[float, ...] = DEFAULT_MEAN, std: tuple[float, ...] = DEFAULT_STD):
        super().__init__(model, tokenizer, name, random_weights)
        self.geometry = geometry(model.config.vision_config, max_pixels, mean, std)
        self.deepstack_layers = len(model.config.vision_config.deepstack_visual_indexes)
        self.vision_start_id = int(model.config.vision_start_token_id)
        self.vision_end_id = int(model.config.vision_end_token_id)
        self.video_token_id = int(model.config.video_token_id)

    @classmethod
    def from_pretrained(cls, path: str, name: str, dtype: torch.dtype, device: str, max_pixels: int,
                        random_weights: bool) -> "Qwen3_VL":
        """Load a checkpoint directory or hub id (stream/vlm/registry.py picks this family for
        `qwen3_vl` and `qwen3_vl_moe`)."""
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        net = model_class(AutoConfig.from_pretrained(path).model_type).from_pretrained(path, dtype=dtype).to(device)
        speed_up(net)
        mean, std = normalization(path)
        return cls(net, tokenizer, name=name, random_weights=random_weights, max_pixels=max_pixels, mean=mean, std=std)

    def _grid_inputs(self, visual: torch.nn.Module, grid: torch.Tensor) -> dict[str, Any]:
        from transformers.vision_utils import (
            get_vision_attention_seqlens,
            get_vision_interpolation_indices_and_weights,
            get_vision_position_ids,
        )

        interp_indices, interp_weights = get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.config.spatial_merge_size)
        cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid, visual.config)
        return {"interp_indices": interp_indices, "interp_weights": interp_weights,
                "position_ids": get_vision_position_ids(grid, visual.spatial_merge_size),
                "cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}

    def _per_group(self, feats: Any, t: int, h: int, w: int) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Per group its [h, w, D] token grid and its deepstack features {"deepstack": [n, h, w, D]}."""
        grid = feats.pooler_output[0].reshape(t, h, w, -1)
        deep = torch.stack([f[0] for f in feats.deepstack_features]).reshape(-1, t, h, w, grid.shape[-1])
        return [(grid[k], {DEEPSTACK: deep[:, k]}) for k in range(t)]

    @instance_cache(maxsize=4096)
    def _label(self, text: str) -> torch.Tensor:
        """A group's timestamp text and `<|vision_start|>` (tokenized once per distinct label)."""
        return torch.cat([self.tokenize(text), torch.tensor([self.vision_start_id])])

    def plan(self, rows: Any, question: str, settings: LayoutSettings) -> PromptPlan:
        """The prompt for `question` over the laid-out rows (their group, pts, row and col, in
        (group, row, col) order, and the memory's `grid` where they carry it), with the video
        before everything that varies per question. Both `timestamps` modes: Qwen3-VL's time is
        the label text."""
        grid_h, grid_w = getattr(rows, "grid", (0, 0))
        n = len(rows.group)
        everything = torch.arange(n)
        starts = torch.searchsorted(rows.group, torch.unique_consecutive(rows.group)).tolist() + [n]
        parts: list[TextPart | VisualPart] = []
        text = self._before_video(settings.system_prompt)  # the text before the next block
        for a, b in zip(starts[:-1], starts[1:]):
            seconds = group_time(float(rows.pts[a]), self.group_size, settings.frame_interval_s)
            row, col = rows.row[a:b], rows.col[a:b]
            extent = max(int(grid_h), int(grid_w), int(row.max()) + 1, int(col.max()) + 1)
            parts += [TextPart(torch.cat([text, self._label(time_label(seconds))])),
                      VisualPart(everything[a:b], torch.zeros_like(row), row, col, extent)]
            text = torch.tensor([self.vision_end_id])
        prefix_end = len(parts)
        parts.append(TextPart(torch.cat([text, self.chat_parts(settings.system_prompt, question)[1]])))
        return plan_of(parts, prefix_end, self.video_token_id)

    def layout(self, seen: TokenSet, question: str, settings: LayoutSettings) -> Prompt:
        """The whole prompt for `question` over the kept tokens `seen` (in temporal order), with
        their deepstack features in prompt order."""
        plan = self.plan(seen, question, settings)
        rows = plan.visual[plan.visual >= 0]
        extras = {DEEPSTACK: seen.extras[DEEPSTACK][rows]} if DEEPSTACK in seen.extras else {}
        return Prompt(plan, self.embed(plan, seen.tokens[rows]), extras=extras)

    def _deepstack_args(self, n: int, visual: torch.Tensor | None,
                        extras: Mapping[str, torch.Tensor] | None) -> dict[str, Any]:
        """The LLM's deepstack arguments for a chunk of `n` tokens: none without visual tokens."""
        if visual is None or not bool(visual.any()):
            return {}
        if visual.shape != (n,):
            raise ValueError(f"visual mask of shape {tuple(visual.shape)} for {n} tokens")
        deep = (extras or {}).get(DEEPSTACK)
        k = int(visual.sum())
        if deep is None or tuple(deep.shape[:2]) != (k, self.deepstack_layers):
            got = "none" if deep is None else tuple(deep.shape)
            raise ValueError(f"{k} visual tokens need deepstack features [{k}, {self.deepstack_layers}, D]; got {got}")
        deep = deep.to(self.device, self.dtype)
        return {"visual_pos_masks": visual.to(self.device).unsqueeze(0),
                "deepstack_visual_embeds": [deep[:, j] for j in range(self.deepstack_layers)]}

    @torch.inference_mode()
    def forward(self, cache: Any, embeds: torch.Tensor, position_ids: torch.Tensor, logits: bool,
                visual: torch.Tensor | None = None, extras: Mapping[str, torch.Tensor] | None = None
                ) -> torch.Tensor | None:
        """The LLM over `embeds` on `cache`, deepstack feature j added after decoder layer j on
        the visual rows (`visual`, their features in `extras["deepstack"]`), as the model's own
        forward adds them."""
        n = cache.get_seq_length() + embeds.shape[1]
        mask = torch.ones(1, n, dtype=torch.long, device=self.device)
        hidden = self.model.model.language_model(
            inputs_embeds=embeds, position_ids=position_ids.to(self.device), attention_mask=mask,
            past_key_values=cache, use_cache=True, **self._deepstack_args(embeds.shape[1], visual, extras),
        ).last_hidden_state
        return self.model.lm_head(hidden[0, -1]) if logits else None
