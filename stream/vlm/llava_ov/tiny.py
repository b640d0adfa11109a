"""A tiny random LLaVA-OneVision, for tests and the offline demo.

Built like `tiny-random` (stream/vlm/qwen2_5_vl/tiny.py, whose in-process tokenizer it reuses):
a Qwen2 LLM and a SigLIP tower from a small config, the tokenizer with `<image>` and `<video>`
added as special tokens (as the converter adds them to Qwen2's), the chat template the converter
ships, and a processor config with SigLIP's mean and std at the tower's size, as the released
checkpoints carry them. Saved under the cache and loaded through `from_pretrained` like a real
checkpoint. Seeded, so every build is identical.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..qwen2_5_vl.tiny import build_tokenizer, save_atomically
from .preprocess import SIGLIP_MEAN, SIGLIP_STD

log = logging.getLogger(__name__)

TINY_NAME = "tiny-random-llava-ov"
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
IMAGE_SIZE = 70  # 5 x 5 patches of 14, pooled to 3 x 3 tokens a frame
# the template transformers' LLaVA-OneVision converter gives the released checkpoints
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_ov_tokenizer():
    """The tiny Qwen tokenizer with LLaVA-OV's placeholders and chat template."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN, VIDEO_TOKEN]}, replace_extra_special_tokens=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(tokenizer, vocab_size: int = 512):
    """A LLaVA-OneVision config small enough for CPU tests; placeholder ids point into the tiny vocab."""
    from transformers import LlavaOnevisionConfig

    pad, eos = tokenizer.convert_tokens_to_ids("<|endoftext|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = dict(
        model_type="qwen2", vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
        bos_token_id=pad, eos_token_id=eos, pad_token_id=pad, initializer_range=0.2,
    )
    vision = dict(
        model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=14, vision_use_head=False,
    )
    return LlavaOnevisionConfig(
        text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN), tie_word_embeddings=False,
        initializer_range=0.2,
    )


def ensure_tiny_model(root: Path, seed: int = 0) -> Path:
    """Build (once) and save the tiny model, tokenizer and processor config under `root`; return
    the directory to load from."""
    from transformers import LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    path = root / TINY_NAME
    if all((path / f).exists() for f in ("config.json", "tokenizer.json", "preprocessor_config.json")):
        return path
    log.info("building tiny random LLaVA-OneVision in %s", path)
    tokenizer = build_ov_tokenizer()
    config = tiny_config(tokenizer)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    processor = LlavaOnevisionImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]],
        image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD),
    )
    return save_atomically(path, model, tokenizer, processor)
