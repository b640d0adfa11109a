"""Feeding a whole [T, H, W, D] clip through a TokenMemory, one group per second, as a camera would."""
from __future__ import annotations

import torch

from pruning import FrameTokens, TokenMemory, TokenSet


def stream(pruner, video: torch.Tensor, capacity: int, recent: int = 0) -> TokenMemory:
    """A memory that has ingested every group of `video` in order."""
    mem = TokenMemory(capacity=capacity, pruner=pruner, recent_groups=recent)
    for t in range(video.shape[0]):
        mem.add(FrameTokens(index=t, pts=float(t), tokens=video[t]))
    return mem


def flat(snap: TokenSet) -> torch.Tensor:
    """Each held token's flat index t*H*W + row*W + col in the dense clip."""
    h, w = snap.grid
    return snap.group * h * w + snap.row * w + snap.col
