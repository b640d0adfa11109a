"""Frame preprocessing in numpy, matching LLaVA-OneVision's processor for video frames (no torchvision).

A video frame is resized straight to the tower's square input (the aspect ratio is not kept:
LLaVA-OV's video path does not tile or pad), bicubic via PIL as the PIL image processor does,
divided by 255 and normalised, channels first. This equals the first patch (the plain resize) of
transformers' `LlavaOnevisionImageProcessorPil`; the video processor needs torchvision, which has
no CPU build here. stream/vlm/preprocess_torch.py is the torch twin for a model on a GPU.

Mean and std come from the checkpoint's own processor config when it names them (the converter
builds the checkpoint's processors from the SigLIP tower's, whose mean and std are 0.5), else
SigLIP's 0.5. Not from the class defaults: `LlavaOnevisionImageProcessor`'s are OpenAI CLIP's,
which the released checkpoints do not use.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
# where a checkpoint may carry its processor settings: transformers 5 writes one processor_config.json
# with a section per processor; earlier conversions wrote a file per processor
PROCESSOR_FILES = (("processor_config.json", ("video_processor", "image_processor")),
                   ("video_preprocessor_config.json", (None,)), ("preprocessor_config.json", (None,)))


@dataclass(frozen=True)
class FrameGeometry:
    """The tower's square input side and the normalisation applied to it."""

    size: int
    mean: tuple[float, float, float] = SIGLIP_MEAN
    std: tuple[float, float, float] = SIGLIP_STD


def checkpoint_normalisation(path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The image mean and std a checkpoint (directory or hub id) was converted with: the first of
    its processor configs that names both, else SigLIP's."""
    from transformers.utils import cached_file

    for name, sections in PROCESSOR_FILES:
        file = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
        if file is None:
            continue
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
        for section in sections:
            entry = data if section is None else data.get(section) or {}
            mean, std = entry.get("image_mean"), entry.get("image_std")
            if mean is not None and std is not None:
                return tuple(float(x) for x in mean), tuple(float(x) for x in std)
    log.info("no image mean/std in %s's processor configs; using SigLIP's (0.5)", path)
    return SIGLIP_MEAN, SIGLIP_STD


def preprocess_frame(image: np.ndarray, geo: FrameGeometry) -> np.ndarray:
    """H x W x 3 uint8 RGB -> [3, S, S] float32, as the tower takes it."""
    s = geo.size
    if image.shape[:2] != (s, s):
        image = np.asarray(Image.fromarray(image).resize((s, s), Image.BICUBIC))
    x = (image.astype(np.float32) / 255.0 - np.asarray(geo.mean, np.float32)) / np.asarray(geo.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
