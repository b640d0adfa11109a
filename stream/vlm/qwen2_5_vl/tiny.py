"""A tiny random Qwen2.5-VL and an in-process tokenizer, for tests and the offline demo.

No weights can be downloaded here, so `tiny-random` builds a model from a small config (sized
like transformers' own model tests), trains a byte-level BPE tokenizer in-process,
saves both to a cache directory and returns that directory: stream/vlm/registry.py then loads it
through the same `from_pretrained` path a real checkpoint takes. Seeded, so every build is identical.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TINY_NAME = "tiny-random"
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = (
    "what is happening in the video? is anyone at the door? a person walks in from the left. "
    "the truck left at noon. a red box moves across the room. the sign says open. yes no maybe. "
    "describe the scene. how many objects are there? when did the car arrive? the light is on. "
    "0 1 2 3 4 5 6 7 8 9 seconds minutes hour camera frame memory answer question."
)


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE trained on a small built-in corpus, with Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(tokenizer, vocab_size: int = 512):
    """A Qwen2.5-VL config small enough for CPU tests; special ids point into the tiny vocab."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        initializer_range=0.2,
    )
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
        tokens_per_second=2, initializer_range=0.2,
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )


def ensure_tiny_model(root: Path, seed: int = 0) -> Path:
    """Build (once) and save the tiny model + tokenizer under `root`; return the directory to load from."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = root / TINY_NAME
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    log.info("building tiny random Qwen2.5-VL in %s", path)
    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer)
    torch.manual_seed(seed)
    return save_atomically(path, Qwen2_5_VLForConditionalGeneration(config).eval(), tokenizer)


def save_atomically(path: Path, *parts) -> Path:
    """`save_pretrained` each of `parts` (model, tokenizer, processor) into `path`, atomically: a
    concurrent build of the same path (two test processes) keeps the first one. Every family's
    tiny model is saved this way."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    for part in parts:
        part.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(tmp)
    else:
        tmp.rename(path)
    return path
