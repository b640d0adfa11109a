"""Which family serves a checkpoint, chosen by its `config.model_type`.

Adding a family is one folder under stream/vlm/ and one line in `FAMILIES`. Families are imported
only when a checkpoint of theirs is loaded. `tiny-random` names a test model that is built into
the cache first and then loaded through the same `from_pretrained` path as a real checkpoint.
"""
from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import torch

from ..errors import ConfigError
from .base import VideoLM

log = logging.getLogger(__name__)

FAMILIES = {
    "qwen2_5_vl": "stream.vlm.qwen2_5_vl:Qwen2_5_VL",
    "qwen3_vl": "stream.vlm.qwen3_vl:Qwen3_VL",
    "qwen3_vl_moe": "stream.vlm.qwen3_vl:Qwen3_VL",
    "llava_onevision": "stream.vlm.llava_ov:LlavaOneVision",
}
TINY_MODELS = {  # name -> builder(root) returning the directory it saved the model in
    "tiny-random": "stream.vlm.qwen2_5_vl.tiny:ensure_tiny_model",
    "tiny-random-qwen3-vl": "stream.vlm.qwen3_vl.tiny:ensure_tiny_model",
    "tiny-random-llava-ov": "stream.vlm.llava_ov.tiny:ensure_tiny_model",
}
FAMILY_NAMES = {  # model types of one family, by the name people know it by
    "Qwen2.5-VL": ("qwen2_5_vl",), "Qwen3-VL": ("qwen3_vl", "qwen3_vl_moe"), "LLaVA-OneVision": ("llava_onevision",),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def unsupported(name: str, model_type: str) -> str | None:
    """Why checkpoint `name` of `model_type` cannot be served, naming the families that can; or None."""
    if model_type in FAMILIES:
        return None
    families = "; ".join(f"{family} ({', '.join(types)})" for family, types in FAMILY_NAMES.items())
    return f"model {name!r} is a {model_type!r} checkpoint; supported families (model types): {families}"


def vectors_per_token(config) -> int:
    """Vectors a kept token holds in the memory: the token, plus Qwen3-VL's deepstack features."""
    return 1 + len(getattr(getattr(config, "vision_config", None), "deepstack_visual_indexes", None) or ())


def _resolve(target: str):
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def cache_dir() -> Path:
    """Where built models live: $STREAMPRUNE_CACHE, else ~/.cache/streamprune."""
    return Path(os.environ.get("STREAMPRUNE_CACHE", Path.home() / ".cache" / "streamprune"))


LOCAL_PREFIXES = ("/", "./", "../", "~")  # a name starting so is a path, never a hub id


def local_checkpoint_problem(name: str) -> str | None:
    """Why `name`, meant as a local checkpoint, cannot be loaded, or None (a usable directory, a
    hub id or a test model). A name is meant as local when it exists or starts like a path:
    without this, a mistyped path reaches the hub client as a malformed repo id."""
    if name in TINY_MODELS:
        return None
    path = Path(name).expanduser()
    if not (path.exists() or name.startswith(LOCAL_PREFIXES)):
        return None
    if not path.exists():
        return f"no such checkpoint directory: {name}"
    if not path.is_dir():
        return f"{name} is a file; expected a checkpoint directory (with config.json)"
    if not (path / "config.json").is_file():
        return f"{name} has no config.json; expected a checkpoint directory"
    return None


def checkpoint_path(name: str, cache: Path | None = None) -> str:
    """What `from_pretrained` loads for `name`: a test model's directory (built once into
    `cache`), else `name` itself (a hub id or a local directory)."""
    if name in TINY_MODELS:
        return str(_resolve(TINY_MODELS[name])(cache or cache_dir()))
    if (problem := local_checkpoint_problem(name)) is not None:
        raise ConfigError(problem)
    return str(Path(name).expanduser())


def model_config(name: str, cache: Path | None = None):
    """The checkpoint's transformers config (no weights are read), for checks before loading."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(checkpoint_path(name, cache))


def hidden_size(config) -> int:
    """Width of a visual token in the memory: the LLM's hidden size (the merger projects to it)."""
    return int(config.get_text_config().hidden_size)


def load_model(name: str, dtype: str = "float32", device: str = "cpu", max_pixels: int = 448 * 448,
               cache: Path | None = None) -> VideoLM:
    """Load a checkpoint (hub id, local directory, or a `TINY_MODELS` name) into its family."""
    from transformers import AutoConfig

    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    path = checkpoint_path(name, cache)
    model_type = AutoConfig.from_pretrained(path).model_type
    if (problem := unsupported(name, model_type)) is not None:
        raise ConfigError(problem)
    random_weights = name in TINY_MODELS
    vlm = _resolve(FAMILIES[model_type]).from_pretrained(path, name=name, dtype=DTYPES[dtype], device=device,
                                                      max_pixels=max_pixels, random_weights=random_weights)
    log.info("loaded %s as %s (%s, %s)%s", name, model_type, dtype, device,
             " with RANDOM weights" if random_weights else "")
    return vlm
