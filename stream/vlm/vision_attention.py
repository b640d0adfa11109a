"""The vision tower's chunked attention in one SDPA call per layer instead of a Python loop.

Qwen2.5-VL's and Qwen3-VL's vision attention, outside flash attention, splits q/k/v by
`cu_seqlens` (Qwen2.5-VL: windows, or frames in its full-attention blocks; Qwen3-VL: frames) and
calls attention once per chunk in a Python loop: on a GPU the tower then costs launches, not
arithmetic. `BatchedVisionAttention` computes all chunks in one
`torch.nn.functional.scaled_dot_product_attention` call: equal chunks are a reshape to
[chunks, heads, len, head_dim]; unequal ones are gathered into chunks padded to the longest, with a
key-padding mask, and gathered back. The chunk layout (and its one host sync) is worked out once
per distinct `cu_seqlens` tensor, not per layer: every block of a kind gets the same tensor object
in a forward, and a cache shared by the tower's blocks holds it. The Qwen families pass tensors
they made once per grid and `prime` with their lengths, so their calls pay no sync at all.

`install(model)` swaps it into every vision block of a loaded model; the parameters stay the
original's (same `qkv` and `proj` modules, so the state dict's keys and values are unchanged).
"""
from __future__ import annotations

import logging
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pruning import host_sync

log = logging.getLogger(__name__)

# Vision attention classes whose forward this module reproduces (same qkv/proj/rotary/cu_seqlens
# contract; checked equal in tests/test_vision_attention.py).
KNOWN = ("Qwen2_5_VLVisionAttention", "Qwen3VLVisionAttention", "Qwen3VLMoeVisionAttention")
# Implementations whose non-flash path is the per-chunk loop; any other (flash: already varlen;
# flex, kernels: the user's choice) is left alone.
LOOPED = (None, "sdpa", "eager")


@dataclass(frozen=True)
class ChunkPlan:
    """How the chunks of one `cu_seqlens` map onto a [chunks, len] grid. `gather` (tokens into
    padded rows), `key_mask` and `scatter` (padded rows back to tokens) are None when the chunks
    are equal and a reshape does."""
    chunks: int
    length: int
    gather: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    scatter: torch.Tensor | None = None


class PlanCache:
    """Chunk plans by `cu_seqlens` tensor object (held alive, so its id is not reused), then by
    lengths and device: a forward's first layer of a kind pays the one host sync, the others find the
    tensor, and a tensor `prime`d with its lengths costs none. LRUs: a forward has at most two kinds
    (Qwen2.5-VL's windows and frames)."""

    def __init__(self, size: int = 8, tensors: int = 256):
        self.size = size  # distinct layouts (their index tensors) kept
        self.tensors = tensors  # cu_seqlens tensors known: a family's tower inputs keep two per grid
        self.syncs = 0  # host syncs paid (one per new cu_seqlens tensor), for tests and profiling
        self.by_tensor: OrderedDict[int, tuple[torch.Tensor, ChunkPlan]] = OrderedDict()
        self.by_lengths: OrderedDict[tuple[tuple[int, ...], torch.device], ChunkPlan] = OrderedDict()

    def get(self, cu_seqlens: torch.Tensor) -> ChunkPlan:
        key = id(cu_seqlens)
        hit = self.by_tensor.get(key)
        if hit is not None and hit[0] is cu_seqlens:
            self.by_tensor.move_to_end(key)
            return hit[1]
        lengths = tuple((cu_seqlens[1:] - cu_seqlens[:-1]).tolist())  # the one host sync
        self.syncs += 1
        return self.prime(cu_seqlens, lengths)

    def prime(self, cu_seqlens: torch.Tensor, lengths: tuple[int, ...]) -> ChunkPlan:
        """The plan of `cu_seqlens`, whose chunk `lengths` the caller knows on the host: a tensor
        made once and passed to every forward (the families' cached tower inputs) never costs a
        sync, not even the first time."""
        key = id(cu_seqlens)
        layout = (lengths, cu_seqlens.device)  # the plan's index tensors live on that device
        plan = self.by_lengths.get(layout)
        if plan is None:
            plan = build_plan(lengths, cu_seqlens.device)
            _put(self.by_lengths, layout, plan, self.size)
        else:
            self.by_lengths.move_to_end(layout)
        _put(self.by_tensor, key, (cu_seqlens, plan), self.tensors)
        return plan


def _put(cache: OrderedDict, key: Any, value: Any, size: int) -> None:
    cache[key] = value
    while len(cache) > size:
        cache.popitem(last=False)


def build_plan(lengths: tuple[int, ...], device: torch.device) -> ChunkPlan:
    """The [chunks, longest] layout of chunks of `lengths` (in token order); index tensors built
    on the host and copied to `device` once, as normal tensors even when the first forward ran in
    inference mode: a later forward under autograd saves them for backward."""
    with torch.inference_mode(False):
        return _build_plan(lengths, device)


def _build_plan(lengths: tuple[int, ...], device: torch.device) -> ChunkPlan:
    n, longest = len(lengths), max(lengths)
    if all(x == longest for x in lengths):
        return ChunkPlan(n, longest)
    lens = torch.tensor(lengths, dtype=torch.long)
    starts = torch.cumsum(lens, 0) - lens
    offsets = torch.arange(longest)
    valid = offsets[None, :] < lens[:, None]  # [n, longest]
    gather = torch.where(valid, starts[:, None] + offsets[None, :], 0).flatten()
    scatter = valid.flatten().nonzero().squeeze(1)
    return ChunkPlan(n, longest, *(host_sync.to_device(x, device) for x in (gather, valid[:, None, None, :], scatter)))


class BatchedVisionAttention(nn.Module):
    """A drop-in for a Qwen vision block's attention: same parameters (the original's `qkv` and
    `proj` modules), same rotary (the model file's `apply_rotary_pos_emb_vision`), all chunks of
    `cu_seqlens` in one SDPA call. If the config is switched to flash attention after install,
    the original forward runs (its varlen path needs no loop)."""

    def __init__(self, original: nn.Module, rotary: Callable, plans: PlanCache):
        super().__init__()
        self.qkv, self.proj = original.qkv, original.proj
        self.config = original.config
        self.dim, self.num_heads, self.head_dim = original.dim, original.num_heads, original.head_dim
        self.num_key_value_groups = original.num_key_value_groups
        self.scaling, self.attention_dropout = original.scaling, original.attention_dropout
        self.is_causal = original.is_causal
        self.original_class = type(original)
        self._rotary = rotary
        self._plans = plans

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                max_seqlen: int | None = None, **kwargs) -> torch.Tensor:
        if self.config._attn_implementation not in LOOPED:
            return self.original_class.forward(self, hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        seq = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = self._rotary(q, k, cos, sin)  # [seq, heads, head_dim] each
        plan = self._plans.get(cu_seqlens)
        n, length = plan.chunks, plan.length
        if plan.gather is None:
            q, k, v = (x.reshape(n, length, self.num_heads, -1).transpose(1, 2) for x in (q, k, v))
        else:
            padded = torch.stack((q, k, v)).index_select(1, plan.gather)  # [3, n * length, heads, head_dim]
            q, k, v = padded.reshape(3, n, length, self.num_heads, -1).transpose(2, 3).unbind(0)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=plan.key_mask, scale=self.scaling,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )  # [n, heads, length, head_dim]
        out = out.transpose(1, 2).reshape(n * length, -1)
        if plan.scatter is not None:
            out = out.index_select(0, plan.scatter)
        return self.proj(out)


def prime(model: nn.Module, cu_seqlens: torch.Tensor, lengths: tuple[int, ...]) -> None:
    """Tell the installed blocks of `model` the chunk lengths of `cu_seqlens` (nothing to do
    where none are installed)."""
    for block in getattr(_vision_tower(model), "blocks", ()):
        if isinstance(block.attn, BatchedVisionAttention):
            block.attn._plans.prime(cu_seqlens, lengths)
            return


def _vision_tower(model: nn.Module) -> nn.Module | None:
    for path in (("model", "visual"), ("visual",)):
        obj: Any = model
        for name in path:
            obj = getattr(obj, name, None)
        if obj is not None:
            return obj
    return None


def install(model: nn.Module) -> int:
    """Swap `BatchedVisionAttention` into every vision block of a loaded Qwen2.5-VL / Qwen3-VL
    model; return how many were swapped. A tower whose attention class it does not know, or
    whose attention implementation is not the looped sdpa/eager one (flash is varlen already),
    is left alone (logged at debug). Idempotent: installed blocks are skipped."""
    visual = _vision_tower(model)
    blocks = getattr(visual, "blocks", None)
    if blocks is None:
        log.debug("vision attention: no vision blocks on %s, left alone", type(model).__name__)
        return 0
    plans, swapped = PlanCache(), 0
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if isinstance(attn, BatchedVisionAttention):
            continue
        name = type(attn).__name__
        rotary = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb_vision", None)
        if name not in KNOWN or rotary is None:
            log.debug("vision attention: block %d's %s is not one it knows, left alone", i, name)
            continue
        impl = getattr(attn.config, "_attn_implementation", None)
        if impl not in LOOPED:
            log.debug("vision attention: block %d uses %r (no per-chunk loop), left alone", i, impl)
            continue
        block.attn = BatchedVisionAttention(attn, rotary, plans)
        swapped += 1
    if swapped:
        log.debug("vision attention: %d blocks of %s batched", swapped, type(model).__name__)
    return swapped
