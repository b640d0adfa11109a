"""Qwen3-VL's timestamps and M-RoPE rule (the model's own `get_rope_index`), for groups that may
be pruned.

Text (the chat text, each group's `<t seconds>` label, `<|vision_start|>`, `<|vision_end|>`)
sits at t = h = w = the running index. A group's tokens sit at (c, c + row, c + col), c being
the running position just after its `<|vision_start|>`: time is carried by the label text, not
by the t position. After a group the cursor moves to c + its extent, max(H, W) of its token
grid, whatever was pruned from it: a kept token keeps its dense (row, col), and its position
depends on its own coordinates and on the groups before it only. stream/vlm/positions.py builds
them: a group is a `VisualPart` with t = 0 and that extent.
"""
from __future__ import annotations


def group_time(pts: float, group_size: int, frame_interval_s: float) -> float:
    """The mean time of a group's frames, as the processor labels it (the mean of its first and
    last frame's time; `pts` is the first's)."""
    return (pts + (pts + (group_size - 1) * frame_interval_s)) / 2


def time_label(seconds: float) -> str:
    """The processor's label text, e.g. '<1.2 seconds>' for 1.25 s (`:.1f` rounds half to even)."""
    return f"<{seconds:.1f} seconds>"
