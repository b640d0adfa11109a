"""M-RoPE position ids built by our own code (DESIGN.md "Positions").

A prompt is a list of parts: text token ids, or a visual block of kept tokens each carrying its
original (t, row, col) coordinates in the dense video. Text gets t = h = w = running index. A
visual block starting at index s places a token at (s + t, s + row, s + col); the text after it
starts at max(previous positions) + 1 (the rule the model was trained with). For a dense video
this equals the model's own `get_rope_index`; pruning only leaves gaps, which RoPE tolerates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TextPart:
    ids: torch.Tensor  # [k] long


@dataclass(frozen=True)
class VisualPart:
    tokens: torch.Tensor  # [n, D] projector outputs
    t: torch.Tensor  # [n] long, temporal offset from the block start
    row: torch.Tensor  # [n] long
    col: torch.Tensor  # [n] long
    extras: dict[str, torch.Tensor] | None = None


def time_offsets(pts: torch.Tensor, pts0: float, tokens_per_second: float) -> torch.Tensor:
    """Qwen2.5-VL absolute-time alignment: a group `s` seconds after the block's first group
    sits `floor(s * tokens_per_second)` temporal steps later. Equals HF's
    `floor(g * tokens_per_second * temporal_patch / fps)` when pts = g * temporal_patch / fps
    (the tiny epsilon absorbs float error in pts)."""
    return torch.floor((pts.double() - pts0) * tokens_per_second + 1e-6).to(torch.long)


def build_positions(parts: list[TextPart | VisualPart]) -> torch.Tensor:
    """Position ids [3, L] for the concatenated parts."""
    out = []
    cursor = 0
    for part in parts:
        if isinstance(part, TextPart):
            k = int(part.ids.numel())
            out.append(torch.arange(cursor, cursor + k).expand(3, k))
            cursor += k
        else:
            if part.t.numel() == 0:
                continue
            pos = torch.stack([part.t, part.row, part.col]) + cursor
            out.append(pos)
            cursor = int(pos.max()) + 1
    return torch.cat(out, dim=1) if out else torch.zeros(3, 0, dtype=torch.long)


def group_time_text(pts: float) -> str:
    """Per-group timestamp text (Qwen3-VL style), e.g. '<12.5 seconds>'."""
    return f"<{math.floor(pts * 10) / 10:.1f} seconds>"
