"""The model seam: what the encoder and the query path need from a video LLM family.

A family (one folder under stream/vlm/, chosen by the checkpoint's `config.model_type` in
stream/vlm/registry.py) turns frame groups into token grids and lays out its own prompt text and
positions around the kept tokens. Everything that varies per question comes after the video in a
`Prompt`, so the KV of `prompt[:prefix_len]` can be kept per camera and reused while the memory is
unchanged (docs/DESIGN.md "Seams").
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from pruning import TokenSet

from .positions import TextPart, VisualPart

TIMESTAMP_MODES = ("mrope", "text")
DEFAULT_SYSTEM = (
    "You are watching a live camera. The video below is what your memory kept of the stream; "
    "answer the question about it briefly and say when things happened."
)


@dataclass(frozen=True)
class LayoutSettings:
    """How a prompt tells the model when things happened.

    `timestamps = "mrope"`: one vision block whose time is carried by the positions, followed by a
    line naming the covered span; `"text"`: each group gets a `<t seconds>` text label and its own
    vision block.
    """

    system_prompt: str = DEFAULT_SYSTEM
    timestamps: str = "mrope"

    def __post_init__(self) -> None:
        if self.timestamps not in TIMESTAMP_MODES:
            raise ValueError(f"timestamps must be one of {', '.join(TIMESTAMP_MODES)}, got {self.timestamps!r}")


@dataclass(frozen=True)
class Prompt:
    """A laid-out prompt, ready for `generate`.

    `prefix_len` counts the leading tokens that do not depend on the question: they end exactly at
    the end of the video block, so two questions on an unchanged memory share them (ids, embeds
    and positions). `ids` holds the family's video placeholder id at each visual token.
    """

    inputs_embeds: torch.Tensor  # [1, L, D]
    position_ids: torch.Tensor  # the family's shape, e.g. [3, 1, L] for M-RoPE
    prefix_len: int
    ids: torch.Tensor  # [L] long
    parts: tuple[TextPart | VisualPart, ...]

    def __len__(self) -> int:
        return int(self.inputs_embeds.shape[1])


@dataclass(frozen=True)
class Generation:
    text: str
    new_tokens: int
    ttft_s: float
    total_s: float


@runtime_checkable
class VideoLM(Protocol):
    """A loaded video LLM family, as the encoder and the query handler use it."""

    name: str
    random_weights: bool  # a test model: its answers are noise

    @property
    def group_size(self) -> int:
        """Frames per temporal group (one `encode` group)."""

    @property
    def hidden_size(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def encode(self, groups: list[list[np.ndarray]]) -> list[torch.Tensor]:
        """Frame groups (up to `group_size` H x W x 3 uint8 RGB frames each) -> one [H, W, D]
        token grid per group."""

    def question_embeds(self, text: str) -> torch.Tensor:
        """The LLM input embeddings of the question's tokens [L, D], for query-aware ranking."""

    def layout(self, seen: TokenSet, question: str, settings: LayoutSettings) -> Prompt:
        """The family's prompt around the kept tokens `seen`, question after the video."""

    def generate(self, prompt: Prompt, max_new_tokens: int, on_text: Callable[[str], None] | None = None,
                 cache: Any = None, stop: threading.Event | None = None) -> Generation:
        """Greedy answer to `prompt`, streaming text to `on_text`. `cache`, when given, already
        holds the KV of the prompt's first tokens (at most `prefix_len`); only the rest is prefilled
        and the cache is left holding what it held. Decoding ends after the current token once
        `stop` is set."""
