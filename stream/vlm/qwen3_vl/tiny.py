"""A tiny random Qwen3-VL (and its MoE variant) for tests and the offline demo.

`tiny-random-qwen3-vl` is built like `tiny-random` (stream/vlm/qwen2_5_vl/tiny.py, whose
in-process tokenizer with Qwen's special tokens it shares): a seeded model from a small config,
saved with the tokenizer to a cache directory that stream/vlm/registry.py then loads through the
same `from_pretrained` path a real checkpoint takes. Three deepstack features (ViT layers 0-2
into LLM layers 0-2), so the side features are exercised. `head_dim` is set: the dense text
config's default is 128, not hidden / heads.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..qwen2_5_vl.tiny import SPECIAL_TOKENS, build_tokenizer, save_atomically

log = logging.getLogger(__name__)

TINY_NAME = "tiny-random-qwen3-vl"
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)


def tiny_config(tokenizer, moe: bool = False, vocab_size: int = 512):
    """A Qwen3-VL config (Qwen3-VL-MoE with `moe`) small enough for CPU tests; special ids point
    into the tiny vocab."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    special = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    text = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2]},
        initializer_range=0.2, **special, **(MOE if moe else {}),
    )
    vision = dict(
        depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=16,
        spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 2],
        initializer_range=0.2,
    )
    return (Qwen3VLMoeConfig if moe else Qwen3VLConfig)(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False, **special,
    )


def save_tiny_model(path: Path, moe: bool = False, seed: int = 0) -> Path:
    """Build the tiny model + tokenizer and save them to `path` (atomically: a concurrent build
    of the same path keeps the first one)."""
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    log.info("building tiny random Qwen3-VL%s in %s", "-MoE" if moe else "", path)
    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer, moe=moe)
    torch.manual_seed(seed)
    model = (Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration)(config).eval()
    return save_atomically(path, model, tokenizer)


def ensure_tiny_model(root: Path) -> Path:
    """Build (once) and save the tiny dense model under `root`; return the directory to load from."""
    path = root / TINY_NAME
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    return save_tiny_model(path)
