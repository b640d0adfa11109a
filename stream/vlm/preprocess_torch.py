"""Frame preprocessing in torch on the model's device: the twin of the numpy modules
(stream/vlm/qwen2_5_vl/preprocess.py, stream/vlm/llava_ov/preprocess.py) for a model on a GPU.

Why: on the host, PIL's resize and numpy's normalise and patchify cost milliseconds of CPU per
frame for every camera; here a decoded frame goes to the device once, as uint8, and the pixel work
runs there. Frame sizes (letterbox, smart_resize, the lone last frame, grouping by size) are the
numpy module's own functions, so both paths make the same shapes.

The resize is PIL's BICUBIC on uint8 replayed exactly rather than approximated: PIL's own taps
(a = -0.5 cubic, support widened by the scale on a downscale) as 22-bit fixed-point integers, one
pass per axis rounded and clipped to uint8, the passes in PIL's order. So frames come out bit for
bit as PIL makes them, and the float32 rescale and normalise repeat numpy's operations, so pixel
rows equal the numpy path's (measured on the CPU; a GPU runs the same integer and IEEE float32
operations). `interpolate(mode="bicubic", antialias=True)` in float with a rounded pass per axis
was 1, at most 2, levels off PIL on up to 1.4% of pixels.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import PIL
import torch

from pruning import host_sync

from .llava_ov.preprocess import FrameGeometry
from .qwen2_5_vl.preprocess import VisionGeometry, budget_size, letterbox, patch_grid, stack_pairs

PRECISION_BITS = 22  # PIL's fixed-point fraction bits for 8-bit images (32 - 8 - 2)
# Pillow 13 runs the vertical pass first when the height shrinks by more than twice what the width
# does (found by comparing against it); Pillow 12 and earlier always run the horizontal pass first
VERTICAL_FIRST_RULE = int(PIL.__version__.split(".")[0]) >= 13


def runs_on_device(choice: bool | None, device: torch.device) -> bool:
    """Whether a family prepares frames here: as `choice` says, else when its model is not on the
    CPU (where numpy and PIL are the faster path)."""
    return device.type != "cpu" if choice is None else choice


def to_device(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """An H x W x 3 uint8 frame on `device`, still uint8: the one copy of its pixels there, queued
    without waiting for the device (a blocking copy would wait for every camera's queued work)."""
    return host_sync.to_device(torch.from_numpy(np.ascontiguousarray(image)), device)


def _bicubic(x: np.ndarray) -> np.ndarray:
    """PIL's bicubic kernel (a = -0.5), in its order of operations."""
    x = np.abs(x)
    return np.where(x < 1.0, (1.5 * x - 2.5) * x * x + 1, np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * -0.5, 0.0))


@functools.lru_cache(maxsize=64)
def _taps(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL's taps for one axis (precompute_coeffs and normalize_coeffs_8bpc in its Resample.c):
    input indices [K, out] and fixed-point weights [K, out], tap k of every output pixel in row k
    (weight 0 past a pixel's own taps)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    k = math.ceil(support) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    index = first[:, None] + np.arange(k)
    w = np.where(np.arange(k) < count[:, None], _bicubic((index - center[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    total = np.zeros(out_size)
    for col in w.T:  # summed in PIL's order: numpy's pairwise sum may round differently
        total = total + col
    w = w / np.where(total == 0, 1.0, total)[:, None]
    fixed = np.trunc(w * (1 << PRECISION_BITS) + np.where(w < 0, -0.5, 0.5)).astype(np.int32)
    return (host_sync.to_device(torch.from_numpy(np.minimum(index, in_size - 1).T.copy()), device),
            host_sync.to_device(torch.from_numpy(fixed.T.copy()), device))


def _resample(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """One PIL pass along `dim` of a uint8 tensor: integer taps, rounded, clipped to uint8."""
    index, weight = _taps(x.shape[dim], size, x.device)
    src = x.to(torch.int32)
    shape = (size,) + (1,) * (x.dim() - dim - 1)
    acc = torch.full((*x.shape[:dim], size, *x.shape[dim + 1:]), 1 << (PRECISION_BITS - 1),
                     dtype=torch.int32, device=x.device)
    for i, w in zip(index, weight):
        acc += src.index_select(dim, i) * w.view(shape)
    return (acc >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def resize_uint8(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """H x W x C uint8 tensor -> `size` (h, w) as PIL's BICUBIC makes it, bit for bit."""
    (h_in, w_in), (h, w) = image.shape[:2], size
    passes = [(1, w), (0, h)]
    if VERTICAL_FIRST_RULE and h < h_in and 2 * (w_in - w) < h_in - h:
        passes.reverse()
    for dim, n in passes:
        if image.shape[dim] != n:
            image = _resample(image, dim, n)
    return image


@functools.lru_cache(maxsize=32)
def _constant(values: float | tuple, device: torch.device) -> torch.Tensor:
    """A float32 constant on `device`, made once."""
    return host_sync.to_device(torch.tensor(values, dtype=torch.float32, device="cpu"), device)


def _normalise(x: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 -> float32 (x / 255 - mean) / std, mean and std broadcast as given: the numpy
    modules' operations in their order. 255 is a tensor on the device too, since CUDA multiplies
    by the reciprocal of a host scalar, an ulp away from numpy's division."""
    x = x.to(torch.float32).div_(_constant(255.0, x.device))
    return x.sub_(_constant(mean, x.device)).div_(_constant(std, x.device))


def resize_frame_torch(image: np.ndarray, geo: VisionGeometry, device: torch.device) -> torch.Tensor:
    """`resize_frame` on `device`: letterboxed on the host if too long (rare), moved, resized."""
    x = to_device(letterbox(image), device)
    size = budget_size(x, geo)
    return x if size == tuple(x.shape[:2]) else resize_uint8(x, size)


def patchify_torch(frames: torch.Tensor, geo: VisionGeometry) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """`patchify` on the frames' device: [F, H, W, 3] uint8 -> (pixel rows [T*gh*gw, C*tp*P*P]
    float32, grid (T, gh, gw))."""
    t, gh, gw = patch_grid(frames.shape, geo)
    c = frames.shape[-1]
    p, m, tp = geo.patch_size, geo.merge_size, geo.temporal_patch_size
    x = frames.reshape(t, tp, gh // m, m, p, gw // m, m, p, c).permute(0, 2, 5, 3, 6, 8, 1, 4, 7)
    rows = _normalise(x.reshape(t * gh * gw, c, tp * p * p), tuple((v,) for v in geo.mean), tuple((v,) for v in geo.std))
    return rows.reshape(t * gh * gw, c * tp * p * p), (t, gh, gw)


def prepare_group_torch(group: list[np.ndarray], geo: VisionGeometry, device: torch.device
                        ) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """`prepare_group` on `device`: one group's pixel rows there (float32) and its grid."""
    frames = stack_pairs([resize_frame_torch(im, geo, device) for im in group], geo, resize_uint8, torch.stack)
    return patchify_torch(frames, geo)


def preprocess_frame_torch(image: np.ndarray, geo: FrameGeometry, device: torch.device) -> torch.Tensor:
    """LLaVA-OneVision's `preprocess_frame` on `device`: H x W x 3 uint8 -> [3, S, S] float32."""
    x = to_device(image, device)
    if tuple(x.shape[:2]) != (geo.size, geo.size):
        x = resize_uint8(x, (geo.size, geo.size))
    return _normalise(x, tuple(geo.mean), tuple(geo.std)).permute(2, 0, 1).contiguous()
