"""HieraVid's layer-level balancing (Sec. 3.3): fewer visual tokens in deeper decoder layers.

Our own loop over the LLM's decoder layers (`model.model.language_model.layers`), calling each
layer as the text model's forward does (its rotary embeddings, a causal mask sized against the
layer's own cache, the cache), so nothing in the modeling file is forked. A schedule of stages
`[(l_1, k_1), (l_2, k_2), ...]` (layers increasing, keep shares non-increasing) says: from decoder
layer `l_i` on, only `round(k_i * n_0)` of the `n_0` visual tokens that entered the LLM take part
(at least one). What we implement, following Eq. 8 and 11:

- At the input of layer `l_i` (the residual stream after layer `l_i - 1`), each visual token `v`
  still held gets the relevance `r_v = softmax_v(h_t . h_v / sqrt(d))` (Eq. 8), where `h_t` is
  the hidden state of the prompt's last token (the one that predicts the answer: the paper's
  "last instruction token", Table 7) and `h_v` the visual token's hidden state at the same layer.
  The paper's min-max normalisation and the softmax keep the order, so the tokens with the
  largest `h_t . h_v` are kept; they stay in prompt order at their own positions.
- The stage's layers then run over the kept tokens only: `|H_v^i| = round(k_i n_0)` (Eq. 11
  with `k_i = prod (1 - R_prune)`), so each stage's layers hold that many visual tokens in their
  KV cache, and every decoded token attends to that many at those layers.
- Text tokens are never dropped.

Departures from the paper: the stages apply relevance alone (Eq. 8), not the relevance-weighted
segment DPP of Eq. 9-10 that the paper also runs per stage: inside the LLM the memory's segments
are not known to the model seam, and a DPP over thousands of hidden states per stage costs more
than the layers it saves at our sizes. The paper's segment merging and frame-level DPP happen
before the LLM, in the memory (pruning/hieravid.py).

A family whose `forward` feeds side features to the LLM (Qwen3-VL's deepstack, added to the
first layers' hidden states of the visual rows) overrides `ChatLLM.forward`; this loop does not
know those features, so such a family refuses a schedule. Families on `ChatLLM.forward`
(Qwen2.5-VL, LLaVA-OneVision) run it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers.masking_utils import create_causal_mask

from .base import Prompt

Schedule = tuple[tuple[int, float], ...]


def parse_schedule(value: Any) -> Schedule:
    """A schedule from plain data (`[[layer, keep], ...]`), or a ValueError saying what is wrong.
    Empty means off."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list of [layer, keep_ratio] pairs, got {value!r}")
    out: list[tuple[int, float]] = []
    for i, stage in enumerate(value):
        if not isinstance(stage, (list, tuple)) or len(stage) != 2:
            raise ValueError(f"stage {i}: expected [layer, keep_ratio], got {stage!r}")
        layer, keep = stage
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 1:
            raise ValueError(f"stage {i}: the layer must be an integer >= 1 (a decoder layer index), got {layer!r}")
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
            raise ValueError(f"stage {i}: the keep ratio must be a number in (0, 1], got {keep!r}")
        if out and layer <= out[-1][0]:
            raise ValueError(f"stage {i}: layers must increase, got {layer} after {out[-1][0]}")
        if out and keep > out[-1][1]:
            raise ValueError(f"stage {i}: keep ratios are shares of the visual tokens entering the LLM and "
                             f"must not increase, got {keep} after {out[-1][1]}")
        out.append((layer, float(keep)))
    return tuple(out)


def check_layers(schedule: Schedule, num_layers: int) -> None:
    """A ValueError when a stage starts at or past the model's last decoder layer."""
    for layer, _ in schedule:
        if layer >= num_layers:
            raise ValueError(f"stage at layer {layer}, but the LLM has {num_layers} decoder layers (0..{num_layers - 1})")


def kept_count(keep: float, n0: int) -> int:
    """Visual tokens a stage keeps of the `n0` entering the LLM: round(keep * n0), at least one."""
    return min(n0, max(1, math.floor(keep * n0 + 0.5))) if n0 else 0


@dataclass(frozen=True)
class StageTrace:
    """What one stage's layers ran over (for tests and the answer's evidence)."""

    first_layer: int
    end_layer: int
    visual_tokens: int
    text_tokens: int
    kept: torch.Tensor  # prompt indices of the tokens the stage's layers ran over


def relevance(hidden: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Eq. 8 without the order-keeping min-max: softmax over the visual tokens of the last
    token's hidden state dotted with each visual token's, over sqrt(d)."""
    h = hidden[0].float()
    scores = h[visual] @ h[-1] / math.sqrt(h.shape[-1])
    return torch.softmax(scores, dim=0)


class LayerPruned:
    """Prefill and decoding steps of one answer through our layer loop, on a fresh cache."""

    def __init__(self, lm: Any, schedule: Schedule):
        self.lm = lm
        self.text = lm.model.model.language_model
        self.config = self.text.config
        n = len(self.text.layers)
        check_layers(schedule, n)
        sliding = [t for t in getattr(self.config, "layer_types", None) or () if t != "full_attention"]
        if sliding:
            raise ValueError(f"layer pruning runs full-attention layers only, not {sliding[0]}")
        self.schedule = schedule
        bounds = [0] + [layer for layer, _ in schedule] + [n]
        self.stages = list(zip(bounds[:-1], bounds[1:]))  # [first, end) layer ranges
        self.trace: list[StageTrace] = []

    def run_layers(self, hidden: torch.Tensor, positions: torch.Tensor, cache: Any, first: int, end: int) -> torch.Tensor:
        """Decoder layers first..end-1 over `hidden`, as the text model's forward runs them."""
        positions = positions.to(hidden.device)
        text_positions = positions if positions.ndim == 2 else None  # Qwen2's 1-D rows; M-RoPE rows go as rotary only
        held = cache.layers[first].get_seq_length()
        mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden,
            attention_mask=torch.ones(1, held + hidden.shape[1], dtype=torch.long, device=hidden.device),
            past_key_values=cache, position_ids=text_positions, layer_idx=first,
        )
        rotary = self.text.rotary_emb(hidden, positions)
        for i in range(first, end):
            hidden = self.text.layers[i](hidden, attention_mask=mask, position_embeddings=rotary,
                                         position_ids=text_positions, past_key_values=cache, use_cache=True)
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.model.lm_head(self.text.norm(hidden[:, -1:]))[0, -1]

    @torch.inference_mode()
    def prefill(self, cache: Any, prompt: Prompt) -> torch.Tensor:
        """The whole prompt in one pass, dropping visual tokens at each stage; the last token's
        logits. One pass, not chunks: the relevance needs the last token's hidden state."""
        if prompt.start != 0 or cache.get_seq_length() != 0:
            raise ValueError("layer pruning prefills the whole prompt on an empty cache")
        if int(prompt.plan.visual[-1]) >= 0:
            raise ValueError("the prompt must end with a text token (its last token scores the visual ones)")
        hidden = prompt.inputs_embeds.to(self.lm.device, self.lm.dtype)
        kept = torch.arange(len(prompt))
        visual = prompt.plan.visual >= 0
        n0 = int(visual.sum())
        keeps = [1.0] + [k for _, k in self.schedule]
        self.trace = []
        for (first, end), keep in zip(self.stages, keeps):
            vis = visual[kept]
            want = kept_count(keep, n0)
            if int(vis.sum()) > want:
                rel = relevance(hidden, vis.to(hidden.device)).cpu()
                top = torch.topk(rel, want, sorted=False).indices
                stay = ~vis
                stay[torch.nonzero(vis).flatten()[top]] = True
                where = torch.nonzero(stay).flatten()
                hidden, kept = hidden[:, where.to(hidden.device)], kept[where]
                vis = visual[kept]
            self.trace.append(StageTrace(first, end, int(vis.sum()), int((~vis).sum()), kept))
            hidden = self.run_layers(hidden, prompt.position_ids[..., kept], cache, first, end)
        return self._logits(hidden)

    @torch.inference_mode()
    def step(self, cache: Any, embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One decoded token through every stage (each layer attends to what its cache holds)."""
        hidden = embeds.to(self.lm.device, self.lm.dtype)
        for first, end in self.stages:
            hidden = self.run_layers(hidden, position_ids, cache, first, end)
        return self._logits(hidden)

