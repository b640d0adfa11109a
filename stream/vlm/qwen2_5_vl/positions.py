"""Qwen2.5-VL's time rules on top of the shared M-RoPE builder (stream/vlm/positions.py)."""
from __future__ import annotations

import math

import torch


def time_offsets(pts: torch.Tensor, pts0: float, tokens_per_second: float) -> torch.Tensor:
    """Qwen2.5-VL absolute-time alignment: a group `s` seconds after the block's first group
    sits `floor(s * tokens_per_second)` temporal steps later. Equals HF's
    `floor(g * tokens_per_second * temporal_patch / fps)` when pts = g * temporal_patch / fps
    (the tiny epsilon absorbs float error in pts)."""
    return torch.floor((pts.double() - pts0) * tokens_per_second + 1e-6).to(torch.long)


def group_time_text(pts: float) -> str:
    """Per-group timestamp text (Qwen3-VL style), e.g. '<12.5 seconds>'."""
    return f"<{math.floor(pts * 10) / 10:.1f} seconds>"
