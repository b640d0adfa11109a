"""Frame preprocessing for Qwen3-VL, in numpy: the Qwen resize and patchify of
stream/vlm/qwen2_5_vl/preprocess.py with Qwen3-VL's geometry (16-pixel patches, 2x2 merge,
2-frame temporal patches, all read from the checkpoint's config) and its normalisation (mean
and std from the checkpoint's preprocessor config, 0.5 when it names none).

Departure: a fixed per-frame pixel budget of our own (`max_pixels`, sides multiples of
patch x merge = 32, at least 2 x 2 tokens). transformers' Qwen3-VL video processor budgets a
whole clip (frames x height x width under one limit), so its frame size shrinks as the clip
grows; a stream has no end, and every group must come out the same size however long it runs.
In numpy because the video processor needs torchvision, which has no CPU build here; on a GPU
the torch twin (stream/vlm/preprocess_torch.py) does the same with this geometry.
"""
from __future__ import annotations

import json
import logging

from ..qwen2_5_vl.preprocess import VisionGeometry

log = logging.getLogger(__name__)

DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)
PREPROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")  # video first: what we feed


def normalization(path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from the checkpoint's (video) preprocessor config, else Qwen3-VL's 0.5."""
    from transformers.utils import cached_file

    for name in PREPROCESSOR_FILES:
        found = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
        if found is None:
            continue
        with open(found) as f:
            cfg = json.load(f)
        if "image_mean" in cfg and "image_std" in cfg:
            return tuple(map(float, cfg["image_mean"])), tuple(map(float, cfg["image_std"]))
    log.info("no image_mean/image_std in %s's preprocessor config; using Qwen3-VL's 0.5", path)
    return DEFAULT_MEAN, DEFAULT_STD


def geometry(vision_config, max_pixels: int, mean: tuple[float, ...] = DEFAULT_MEAN,
             std: tuple[float, ...] = DEFAULT_STD) -> VisionGeometry:
    """The vision tower's patch geometry with our per-frame budget."""
    factor = vision_config.patch_size * vision_config.spatial_merge_size
    return VisionGeometry(
        patch_size=vision_config.patch_size, merge_size=vision_config.spatial_merge_size,
        temporal_patch_size=vision_config.temporal_patch_size, min_pixels=4 * factor ** 2, max_pixels=max_pixels,
        mean=tuple(mean), std=tuple(std),
    )
