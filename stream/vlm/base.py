"""The model seam: what the encoder and the query path need from a video LLM family.

A family (one folder under stream/vlm/, chosen by the checkpoint's `config.model_type` in
stream/vlm/registry.py) turns frame groups into token grids and lays out its own prompt text and
positions around the kept tokens: a `PromptPlan` says where each prompt token comes from, from
the rows' coordinates alone, and `embed` fills in vectors only for the tokens that need them.
Everything that varies per question comes after the video, so the KV of `plan[:prefix_len]`
is kept per camera and extended as groups arrive (stream/prompt_cache.py; docs/DESIGN.md
"Seams" and "The prompt cache").
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from pruning import TokenSet

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
    frame_interval_s: float = 0.5  # between sampled frames: a family that labels a group by the mean time of its frames (Qwen3-VL) needs it

    def __post_init__(self) -> None:
        if self.timestamps not in TIMESTAMP_MODES:
            raise ValueError(f"timestamps must be one of {', '.join(TIMESTAMP_MODES)}, got {self.timestamps!r}")


@dataclass(frozen=True)
class Columns:
    """The columns of held tokens a family's `plan` reads (a memory layout has them too): for
    plans of a few made-up tokens, to measure the text around them."""

    group: torch.Tensor  # [n] long
    pts: torch.Tensor  # [n] float64
    row: torch.Tensor  # [n] long
    col: torch.Tensor  # [n] long

    @classmethod
    def of(cls, groups: list[int], pts: list[float]) -> "Columns":
        """One token per group, at cell (0, 0)."""
        zero = torch.zeros(len(groups), dtype=torch.long)
        return cls(torch.tensor(groups, dtype=torch.long), torch.tensor(pts, dtype=torch.float64), zero, zero.clone())


@dataclass(frozen=True)
class PromptPlan:
    """Where every prompt token comes from, without any vector: built from the held rows' group,
    pts, row and col only, so it is cheap to build for every question and every cache check.

    `prefix_len` counts the leading tokens that do not depend on the question: the system text
    and the video block up to its last visual token (anything that closes the block goes after,
    so a new group is appended to the prefix and never inserted before a closing token). Every
    prefix token depends only on the rows before it, which is what lets a prompt cache keep the
    prefix's KV and redo it only from the first row that changed.
    """

    ids: torch.Tensor  # [L] long; the family's video placeholder id at each visual token
    position_ids: torch.Tensor  # the family's shape, last dim L (e.g. [3, 1, L] for M-RoPE)
    visual: torch.Tensor  # [L] long: the laid-out row each visual token shows; -1 for text
    prefix_len: int

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def key(self, stamps: torch.Tensor) -> torch.Tensor:
        """[prefix_len, K] int64: one row per prefix token that changes whenever the token's id,
        position or (for a visual token, through the memory's `stamps` of the laid-out rows) its
        vector does. Two prompts agree up to their first differing key row. Stamps change per
        group, not per token: a family whose positions do not name a visual token's cell (1-D
        running positions) adds the cell to its key (stream/vlm/llava_ov)."""
        n = self.prefix_len
        vis = self.visual[:n]
        stamp = torch.where(vis >= 0, stamps[vis.clamp_min(0)], torch.full_like(vis, -1)) if n else vis
        pos = self.position_ids[..., :n].reshape(-1, n)
        return torch.cat([self.ids[:n].unsqueeze(0), pos.to(torch.long), stamp.unsqueeze(0)]).T.contiguous()


@dataclass(frozen=True)
class Prompt:
    """A plan with the input embeddings of its tokens from `start` on (the tokens before `start`
    are already in the KV cache the prompt is generated on), and the per-token side features
    (`extras`, e.g. Qwen3-VL's deepstack) of the visual tokens among them, in prompt order: a
    family that feeds them to the LLM gets each chunk's rows with it (`visual_rows`)."""

    plan: PromptPlan
    inputs_embeds: torch.Tensor  # [1, L - start, D]
    start: int = 0
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)  # [visual tokens from start on, ...] each

    def visual_rows(self, a: int, b: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Tokens a..b (a >= start): which of them are visual ([b - a] bool) and their extras."""
        is_vis = self.plan.visual[a:b] >= 0
        if not self.extras:
            return is_vis, {}
        i = int((self.plan.visual[self.start:a] >= 0).sum())
        j = i + int(is_vis.sum())
        return is_vis, {k: v[i:j] for k, v in self.extras.items()}

    @property
    def ids(self) -> torch.Tensor:
        return self.plan.ids

    @property
    def position_ids(self) -> torch.Tensor:
        return self.plan.position_ids

    @property
    def prefix_len(self) -> int:
        return self.plan.prefix_len

    def __len__(self) -> int:
        return len(self.plan)


@dataclass(frozen=True)
class Generation:
    text: str
    new_tokens: int
    ttft_s: float  # from the start of the prefill to the first new token
    total_s: float
    stage_tokens: tuple[int, ...] = ()  # with a layer schedule: visual tokens per stage, layer 0 first


@runtime_checkable
class VideoLM(Protocol):
    """A loaded video LLM family, as the encoder and the query handler use it."""

    name: str
    random_weights: bool  # a test model: its answers are noise
    pruner_defaults: Mapping[str, Mapping[str, Any]]  # pruner -> the papers' parameters for this family

    @property
    def group_size(self) -> int:
        """Frames per temporal group (one `encode` group)."""

    @property
    def hidden_size(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def max_tokens_per_group(self) -> int:
        """The most visual tokens one group can have at the configured pixel budget."""

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one prompt token takes in the LLM's KV cache (every layer's keys and values)."""

    def encode(self, groups: list[list[np.ndarray]]
               ) -> list[torch.Tensor] | list[tuple[torch.Tensor, Mapping[str, torch.Tensor]]]:
        """Frame groups (up to `group_size` H x W x 3 uint8 RGB frames each) -> one [H, W, D]
        token grid per group; a family with per-token side features gives (grid, extras) instead,
        each extra [..., H, W, D] (`FrameTokens.extras`, e.g. Qwen3-VL's {"deepstack": [3, H, W, D]}).
        They stay on the model's device, where the memory keeps them. Equals
        `encode_prepared([prepare(g) for g in groups])`."""

    def prepare(self, group: list[np.ndarray]) -> Any:
        """One group's tower input (resized, normalised, patchified), made on the caller's
        thread without the model's weights, so each camera prepares its own while the shared
        tower runs (stream/encode_scheduler.py)."""

    def encode_prepared(self, prepared: list[Any]) -> list[Any]:
        """`encode`'s results for groups already prepared, in one pass of the tower per size."""

    def question_embeds(self, text: str) -> torch.Tensor:
        """The LLM input embeddings of the question's tokens [L, D], for query-aware ranking."""

    def question_states(self, text: str, layer: int) -> torch.Tensor:
        """Hidden states [L, D] of the question's chat-formatted tokens (the text that follows
        the video) at the input of decoder layer `layer`, run alone through the first `layer`
        layers (layer 0: their input embeddings), for query-aware ranking."""

    def check_layer_schedule(self, schedule: tuple[tuple[int, float], ...]) -> None:
        """A ValueError when `generate(..., layer_schedule=schedule)` cannot run on this model."""

    def plan(self, rows: Any, question: str, settings: LayoutSettings) -> PromptPlan:
        """The family's prompt around the laid-out rows `rows` (anything with the `group`, `pts`,
        `row` and `col` columns of held tokens in (group, row, col) order), question after the
        video."""

    def embed(self, plan: PromptPlan, visual: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Input embeddings [1, end - start, D] of plan tokens start..end; `visual` holds the
        vectors of the visual tokens among them, in prompt order."""

    def layout(self, seen: TokenSet, question: str, settings: LayoutSettings) -> Prompt:
        """The whole prompt for `question` over the kept tokens `seen`."""

    def new_cache(self, max_tokens: int) -> Any:
        """An empty KV cache for this LLM that never holds more than `max_tokens` tokens."""

    def forward(self, cache: Any, embeds: torch.Tensor, position_ids: torch.Tensor, logits: bool,
                visual: torch.Tensor | None = None, extras: Mapping[str, torch.Tensor] | None = None
                ) -> torch.Tensor | None:
        """Run `embeds` (at `position_ids`) through the LLM on `cache`, appending their KV; the
        last position's logits [vocab] when `logits`. `visual` ([n] bool) marks the visual tokens
        among them and `extras` holds their side features (Prompt.visual_rows), for a family
        whose LLM takes them (Qwen3-VL's deepstack); others ignore both."""

    def generate(self, prompt: Prompt, max_new_tokens: int, on_text: Callable[[str], None] | None = None,
                 cache: Any = None, stop: threading.Event | None = None,
                 layer_schedule: tuple[tuple[int, float], ...] = ()) -> Generation:
        """Greedy answer to `prompt`, streaming text to `on_text`. `cache`, when given, holds the
        KV of the prompt's first `prompt.start` tokens; the rest is prefilled onto it and the
        cache is left holding the prompt's prefix (`prefix_len` tokens). Decoding ends after the
        current token once `stop` is set. A `layer_schedule` (`(layer, keep share)` stages, no
        `cache`) drops visual tokens inside the LLM (stream/vlm/layer_pruning.py)."""
