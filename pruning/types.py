"""Types shared by the encoder and the pruners: what one temporal group of tokens is
(docs/DESIGN.md, "Core types")."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import torch


@dataclass(frozen=True)
class FrameTokens:
    """One temporal group (Qwen: two frames) of visual tokens in the LLM embedding space.

    `tokens` is [H, W, D]; `extras` holds per-token side features whose last three leading
    dims are H, W (e.g. Qwen3-VL deepstack [L, H, W, D]) and that travel with every kept token.
    """

    index: int
    pts: float
    tokens: torch.Tensor
    extras: Mapping[str, torch.Tensor] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.tokens.shape[0]), int(self.tokens.shape[1])
