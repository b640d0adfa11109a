"""M-RoPE position ids built by our own code, shared by the Qwen families (docs/DESIGN.md "Positions").

A prompt is a list of parts: text token ids, or a visual block of kept tokens each carrying its
original (t, row, col) coordinates in the dense video. Text gets t = h = w = running index. A
visual block starting at index s places a token at (s + t, s + row, s + col); the text after it
starts at max(previous positions) + 1 (the rule the model was trained with; transformers 5.x's own
`get_rope_index` departs from it after long videos, so it equals ours on short dense clips only).
Pruning only leaves gaps, which RoPE tolerates. A block with an `extent` (Qwen3-VL's groups)
moves the cursor by that much instead, whatever was pruned from it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import PromptPlan


@dataclass(frozen=True)
class TextPart:
    ids: torch.Tensor  # [k] long


@dataclass(frozen=True)
class VisualPart:
    rows: torch.Tensor  # [n] long: which laid-out rows (held tokens) the block shows, in order
    t: torch.Tensor  # [n] long, temporal offset from the block start
    row: torch.Tensor  # [n] long
    col: torch.Tensor  # [n] long
    extent: int | None = None  # how far the cursor moves past the block's start; None: past its largest position


def build_positions(parts: list[TextPart | VisualPart]) -> torch.Tensor:
    """Position ids [3, L] for the concatenated parts."""
    out = []
    cursor = 0
    for part in parts:
        if isinstance(part, TextPart):
            k = int(part.ids.numel())
            out.append(torch.arange(cursor, cursor + k).expand(3, k))
            cursor += k
        elif part.extent is not None:
            out.append(torch.stack([part.t, part.row, part.col]) + cursor)
            cursor += part.extent
        elif part.t.numel():
            pos = torch.stack([part.t, part.row, part.col]) + cursor
            out.append(pos)
            cursor = int(pos.max()) + 1
    return torch.cat(out, dim=1) if out else torch.zeros(3, 0, dtype=torch.long)


def plan_of(parts: list[TextPart | VisualPart], prefix_end: int, video_token_id: int) -> PromptPlan:
    """The M-RoPE plan of the concatenated parts: text ids as they are, each visual token as the
    video placeholder showing its row; the prefix is the first `prefix_end` parts."""
    ids, visual = [], []
    for part in parts:
        if isinstance(part, TextPart):
            ids.append(part.ids)
            visual.append(torch.full((len(part.ids),), -1, dtype=torch.long))
        else:
            ids.append(torch.full((len(part.rows),), video_token_id, dtype=torch.long))
            visual.append(part.rows)
    prefix_len = sum(len(v) for v in visual[:prefix_end])
    return PromptPlan(ids=torch.cat(ids), position_ids=build_positions(parts).unsqueeze(1), visual=torch.cat(visual),
                      prefix_len=prefix_len)
