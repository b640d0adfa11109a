"""Frame preprocessing in numpy, matching the Qwen2/2.5-VL processor (no torchvision).

Resize to a pixel budget with the processor's `smart_resize` rule (sides multiples of
patch*merge), bicubic via PIL as the PIL image processor does, rescale, normalise with CLIP
mean/std, then patchify a frame pair into the [T*gh*gw, C*2*P*P] rows the vision tower takes.
A frame longer than `MAX_ASPECT` times its width (2000x8), which the processor refuses, is first
letterboxed with black to that ratio, so a camera with an odd size still gets encoded; every
other frame is processed exactly as the processor does (tiny ones are scaled up to the budget).
In numpy because transformers' video and fast image processors need torchvision, which has no
CPU build here; stream/vlm/preprocess_torch.py is the torch twin for a model on a GPU, and shares
this module's frame-size rules (`letterbox`, `budget_size`, `stack_pairs`, `patch_grid`).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
MAX_ASPECT = 200  # smart_resize refuses a longer side more than this many times the shorter


@dataclass(frozen=True)
class VisionGeometry:
    """How frames become patches: the model's patch/merge sizes and our pixel budget."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 448 * 448
    mean: tuple[float, float, float] = tuple(CLIP_MEAN.tolist())
    std: tuple[float, float, float] = tuple(CLIP_STD.tolist())

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The Qwen processor's target size: sides divisible by `factor`, area within the budget."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(
            f"aspect ratio must be below {MAX_ASPECT}, got {max(height, width) / min(height, width):.1f}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def letterbox(image: np.ndarray) -> np.ndarray:
    """Pad the short side with black, centred, until the long side is at most `MAX_ASPECT`
    times it; other frames are returned as they are."""
    h, w = image.shape[:2]
    short = math.ceil(max(h, w) / MAX_ASPECT)
    if min(h, w) >= short:
        return image
    before = (short - min(h, w)) // 2
    pad = (before, short - min(h, w) - before)
    return np.pad(image, (pad, (0, 0), (0, 0)) if h < w else ((0, 0), pad, (0, 0)))


def budget_size(image, geo: VisionGeometry) -> tuple[int, int]:
    """The (h, w) a letterboxed H x W x 3 frame (array or tensor) is resized to."""
    h, w = image.shape[:2]
    return smart_resize(h, w, geo.factor, geo.min_pixels, geo.max_pixels)


def pil_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """H x W x 3 uint8 -> `size` (h, w), bicubic via PIL as the PIL image processor does."""
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC))


def resize_frame(image: np.ndarray, geo: VisionGeometry) -> np.ndarray:
    """H x W x 3 uint8 -> the budgeted size, bicubic (PIL), still uint8 (letterboxed first if
    too long for the processor)."""
    image = letterbox(image)
    size = budget_size(image, geo)
    return image if size == image.shape[:2] else pil_resize(image, size)


def patch_grid(shape: tuple[int, ...], geo: VisionGeometry) -> tuple[int, int, int]:
    """The patch grid (T, gh, gw) of [F, H, W, C] frames of one size; ValueError unless they tile
    into temporal x (patch*merge)^2 blocks."""
    f, h, w, _ = shape
    p, m, tp = geo.patch_size, geo.merge_size, geo.temporal_patch_size
    if f % tp or h % (p * m) or w % (p * m):
        raise ValueError(f"frames {tuple(shape)} do not tile into {tp}x{p * m}x{p * m} patches")
    return f // tp, h // p, w // p


def patchify(frames: np.ndarray, geo: VisionGeometry) -> tuple[np.ndarray, tuple[int, int, int]]:
    """[F, H, W, 3] uint8 frames of one size (F a multiple of the temporal patch) ->
    (pixel rows [T*gh*gw, C*tp*P*P] float32, grid (T, gh, gw))."""
    t, gh, gw = patch_grid(frames.shape, geo)
    c = frames.shape[-1]
    p, m, tp = geo.patch_size, geo.merge_size, geo.temporal_patch_size
    x = frames.reshape(t, tp, gh // m, m, p, gw // m, m, p, c).transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    rows = x.reshape(t * gh * gw, c, tp * p * p).astype(np.float32)  # reordered as uint8, converted once
    np.divide(rows, 255.0, out=rows)
    np.subtract(rows, np.asarray(geo.mean, np.float32)[:, None], out=rows)
    np.divide(rows, np.asarray(geo.std, np.float32)[:, None], out=rows)
    return rows.reshape(t * gh * gw, c * tp * p * p), (t, gh, gw)


def stack_pairs(resized: list, geo: VisionGeometry, resize: Callable[[Any, tuple[int, int]], Any] = pil_resize,
                stack: Callable[[list], Any] = np.stack) -> Any:
    """Frames at their budgeted sizes -> one [F, H, W, 3] stack: a frame of another size than the
    first is resized to it, and a lone last frame is duplicated so every temporal group is full
    (the processor pads the same way). numpy arrays by default; the torch twin passes its own
    `resize` and `torch.stack`."""
    shape = resized[0].shape
    resized = [r if r.shape == shape else resize(r, tuple(shape[:2])) for r in resized]
    while len(resized) % geo.temporal_patch_size:
        resized.append(resized[-1])
    return stack(resized)


def frames_to_pairs(images: list[np.ndarray], geo: VisionGeometry) -> np.ndarray:
    """Resize a list of frames to the budget and stack them, duplicating a lone last frame so
    every temporal group is full (the processor pads the same way)."""
    return stack_pairs([resize_frame(im, geo) for im in images], geo)


def prepare_group(group: list[np.ndarray], geo: VisionGeometry) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One group's tower input: (pixel rows, (t, gh, gw))."""
    return patchify(frames_to_pairs(group, geo), geo)


def batches_by_shape(prepared: list[tuple[Any, tuple[int, int, int]]]) -> list[tuple[list[int], Any, tuple[int, int, int]]]:
    """Prepared groups stacked into one batch per frame size: (which groups, their pixel rows
    one after another (numpy or torch, as prepared), (t summed, gh, gw)). The Qwen towers attend
    within a temporal group, so a batch equals its groups one by one."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, (_, (_, gh, gw)) in enumerate(prepared):
        by_shape.setdefault((gh, gw), []).append(i)
    out = []
    for (gh, gw), idxs in by_shape.items():
        rows = [prepared[i][0] for i in idxs]
        if len(rows) == 1:  # a group alone is its own batch: no copy
            stacked = rows[0]
        else:
            stacked = torch.cat(rows) if isinstance(rows[0], torch.Tensor) else np.concatenate(rows)
        out.append((idxs, stacked, (sum(prepared[i][1][0] for i in idxs), gh, gw)))
    return out
