"""The vision tower's patch embedding as one matrix product instead of a Conv3d.

Qwen2.5-VL's and Qwen3-VL's patch embedding is a Conv3d whose kernel equals its stride, applied
to rows that are already one patch each ([N, C*T*P*P], in the kernel's own (C, T, P, P) order):
it is a linear map of each row. On this project's CPU the convolution took 16 ms for 8 tiny
groups against 3 ms as a matrix product (at Qwen2.5-VL-7B's width, 148 against 19 ms per 8
patches' worth of a 448x448 pair), the same result to 4e-6 in float32 (another summation order).
`install(model)` swaps it in; the weights stay the original's (`proj`), so the state dict is
unchanged.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

KNOWN = ("Qwen2_5_VisionPatchEmbed", "Qwen3VLVisionPatchEmbed", "Qwen3VLMoeVisionPatchEmbed")


class LinearPatchEmbed(nn.Module):
    """A Conv3d patch embedding (kernel = stride) applied as `F.linear` on the patch rows."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.proj = original.proj  # the Conv3d: its weight [D, C, T, P, P] is the matrix
        self.embed_dim = original.embed_dim

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        rows = hidden_states.reshape(-1, w[0].numel()).to(w.dtype)
        return nn.functional.linear(rows, w.reshape(w.shape[0], -1), self.proj.bias)


def install(model: nn.Module) -> bool:
    """Swap `LinearPatchEmbed` into a loaded Qwen2.5-VL / Qwen3-VL tower; False when the model
    has no patch embedding it knows (left alone, logged at debug)."""
    visual = getattr(getattr(model, "model", model), "visual", None)
    embed = getattr(visual, "patch_embed", None)
    if embed is None or type(embed).__name__ not in KNOWN:
        log.debug("patch embedding of %s is not one it knows, left alone", type(model).__name__)
        return False
    visual.patch_embed = LinearPatchEmbed(embed)
    return True
