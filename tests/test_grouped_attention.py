"""The LLM's grouped-query attention on the CPU (stream/vlm/grouped_attention.py) equals
transformers' own SDPA path bit for bit, without copying the KV heads."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from stream.vlm import grouped_attention
from stream.vlm.registry import load_model


class Heads(nn.Module):
    """What the attention functions read from an attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def _qkv(q_heads: int, kv_heads: int, q_len: int, kv_len: int, dim: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, q_heads, q_len, dim, generator=g), torch.randn(1, kv_heads, kv_len, dim, generator=g),
            torch.randn(1, kv_heads, kv_len, dim, generator=g))


def _suffix_mask(q_len: int, kv_len: int) -> torch.Tensor:
    """A question of `q_len` tokens after `kv_len - q_len` cached ones: all of the cache, causal
    among itself."""
    mask = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool)
    mask[..., kv_len - q_len:] = torch.ones(q_len, q_len, dtype=torch.bool).tril()
    return mask


@pytest.mark.parametrize("heads", [(14, 2), (28, 4), (4, 2)])
@pytest.mark.parametrize("shape", [(56, 1056), (7, 3000), (300, 300)])
def test_a_masked_question_over_a_cache_equals_transformers_sdpa(heads, shape):
    q, k, v = _qkv(*heads, *shape)
    module, mask = Heads(heads[0] // heads[1]), _suffix_mask(*shape)
    ours, _ = grouped_attention.attention(module, q, k, v, mask, scaling=0.125)
    theirs, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.125)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("shape", [(200, 200), (50, 120), (1, 400)])
def test_unmasked_causal_and_single_query_calls_equal_transformers_sdpa(shape):
    q, k, v = _qkv(14, 2, *shape)
    module = Heads(7)
    assert torch.equal(grouped_attention.attention(module, q, k, v, None)[0], sdpa_attention_forward(module, q, k, v, None)[0])


@pytest.mark.parametrize("name", ["tiny-random", "tiny-random-qwen3-vl", "tiny-random-llava-ov"])
def test_every_familys_llm_gives_the_same_states_with_it_and_without(name, model_cache):
    """A prefill, then a question over its cache: the text model's hidden states with the grouped
    attention (installed when a family loads) equal transformers' "sdpa"."""
    vlm = load_model(name, cache=model_cache)
    text = vlm.model.model.language_model
    assert text.config._attn_implementation == grouped_attention.NAME
    ids = torch.randint(0, 100, (1, 300), generator=torch.Generator().manual_seed(1))

    @torch.inference_mode()
    def states() -> list[torch.Tensor]:
        cache = DynamicCache(config=vlm.model.config.text_config)
        first = text(input_ids=ids[:, :250], past_key_values=cache, use_cache=True).last_hidden_state
        then = text(input_ids=ids[:, 250:], past_key_values=cache, use_cache=True,
                    attention_mask=torch.ones(1, 300, dtype=torch.long)).last_hidden_state
        return [first, then]

    grouped = states()
    text.set_attn_implementation("sdpa")
    plain = states()
    assert all(torch.equal(a, b) for a, b in zip(grouped, plain))


def test_a_position_bias_goes_to_transformers_own_path():
    q, k, v = _qkv(14, 2, 20, 60)
    module, bias = Heads(7), torch.randn(1, 14, 20, 60)
    ours = grouped_attention.attention(module, q, k, v, _suffix_mask(20, 60), position_bias=bias)[0]
    assert torch.equal(ours, sdpa_attention_forward(module, q, k, v, _suffix_mask(20, 60), position_bias=bias)[0])
