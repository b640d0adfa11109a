"""A KV cache that grows in place and crops by a length, for prompts kept and extended per camera.

transformers' `DynamicLayer` appends with `torch.cat`, which copies the whole cache on every
append (measured: 24-72 ms per 256-token group at 7B shapes on an H200, 317 ms at 16k tokens on
the CPU). A `BufferedLayer` writes new keys and values into a preallocated buffer that doubles
when full, up to a hard limit, and hands attention a view of its first `n` tokens; cropping only
moves `n`. The view is overwritten by later writes, so one cache serves one thread at a time:
the camera's LLM thread, which both extends the prefix and answers on it (cropped after use).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_BUFFER = 256


class CacheFull(RuntimeError):
    """A write would take the cache past its limit: the caller checks the room first."""


class BufferedLayer(DynamicLayer):
    def __init__(self, max_tokens: int):
        super().__init__()
        self.max_tokens = max_tokens
        self.n = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        need = self.n + key_states.shape[-2]
        if need > self.max_tokens:
            raise CacheFull(f"{need} tokens would pass the cache's limit of {self.max_tokens}")
        if self._k is None or need > self._k.shape[-2]:
            self._grow(key_states, value_states, need)
        self._k[..., self.n:need, :] = key_states
        self._v[..., self.n:need, :] = value_states
        self._set_length(need)
        return self.keys, self.values

    def _grow(self, k: torch.Tensor, v: torch.Tensor, need: int) -> None:
        old = 0 if self._k is None else self._k.shape[-2]
        size = min(self.max_tokens, max(need, 2 * old, MIN_BUFFER))
        new_k = k.new_empty(*k.shape[:-2], size, k.shape[-1])
        new_v = v.new_empty(*v.shape[:-2], size, v.shape[-1])
        if self.n:
            new_k[..., :self.n, :] = self._k[..., :self.n, :]
            new_v[..., :self.n, :] = self._v[..., :self.n, :]
        self._k, self._v = new_k, new_v

    def _set_length(self, n: int) -> None:
        self.n = n
        self.keys = self._k[..., :n, :] if self._k is not None else None
        self.values = self._v[..., :n, :] if self._v is not None else None

    def get_seq_length(self) -> int:
        return self.n

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        self._set_length(max(0, self.n + tokens_to_remove))

    def reset(self) -> None:
        self._set_length(0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self._k, self._v) if t is not None)


class BufferedCache(DynamicCache):
    """A `DynamicCache` whose layers are `BufferedLayer`s holding at most `max_tokens` each."""

    def __init__(self, config, max_tokens: int):
        super().__init__(config=config)
        sliding = [type(layer).__name__ for layer in self.layers if getattr(layer, "is_sliding", False)]
        if sliding:
            raise ValueError(f"the prompt cache does not serve sliding-window attention layers ({sliding[0]})")
        self.max_tokens = max_tokens
        self.layers = [BufferedLayer(max_tokens) for _ in self.layers]

    def nbytes(self) -> int:
        """Bytes allocated for keys and values now (at most `max_tokens` x bytes per token)."""
        return sum(layer.nbytes() for layer in self.layers)


def crop_to(cache, n: int) -> None:
    """Keep the first `n` tokens of any transformers cache."""
    held = cache.get_seq_length()
    if n < held:
        cache.crop(n - held)
