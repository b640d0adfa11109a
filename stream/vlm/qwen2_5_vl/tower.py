"""The Qwen vision towers' side of the model seam, shared by Qwen2.5-VL and Qwen3-VL.

Frame groups become patches (numpy on the host, or torch on the model's device: `prepare`), and
prepared groups go through the tower once per frame size (`encode_prepared`): Qwen's vision
attention is per temporal group, so a batch equals its groups one by one. A family says only
what each group's output is (`_per_group`) and which inputs its tower derives from the grid
(`_grid_inputs`), which are made once per grid and passed in, so a call reads nothing back from
the device. `speed_up` installs the two exact speed-ups every
loaded Qwen tower gets (stream/vlm/vision_attention.py, stream/vlm/patch_embed.py). It lives
with Qwen2.5-VL, whose preprocessing Qwen3-VL already shares.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pruning import host_sync

from .. import patch_embed, preprocess_torch, vision_attention
from ..instance_cache import instance_cache
from .preprocess import VisionGeometry, batches_by_shape, prepare_group


CHUNKS = ("cu_seqlens", "cu_window_seqlens")  # the tower inputs that bound attention chunks


def speed_up(net: torch.nn.Module) -> None:
    """The tower's attention in one call per layer, not a loop over windows, and its Conv3d
    patch embedding as one matrix product; both equal transformers' own forward."""
    vision_attention.install(net)
    patch_embed.install(net)


class QwenTower:
    """Mixed into a family with `model`, `device` and `geometry` (ChatLLM gives the first two)."""

    geometry: VisionGeometry
    preprocess_on_device: bool | None = None  # `prepare` in torch on the model's device; None: unless that is the CPU

    @property
    def group_size(self) -> int:
        return self.geometry.temporal_patch_size

    @property
    def max_tokens_per_group(self) -> int:
        return self.geometry.max_pixels // self.geometry.factor ** 2

    def prepare(self, group: list[np.ndarray]) -> tuple[np.ndarray | torch.Tensor, tuple[int, int, int]]:
        """One group's patches and grid (`VideoLM.prepare`), on the model's device or the host."""
        if preprocess_torch.runs_on_device(self.preprocess_on_device, self.device):
            return preprocess_torch.prepare_group_torch(group, self.geometry, self.device)
        return prepare_group(group, self.geometry)

    def encode(self, groups: list[list[np.ndarray]]) -> list[Any]:
        return self.encode_prepared([self.prepare(g) for g in groups])

    @torch.inference_mode()
    def encode_prepared(self, prepared: list[tuple[np.ndarray | torch.Tensor, tuple[int, int, int]]]) -> list[Any]:
        """Prepared groups -> the family's output per group, one tower call per frame size."""
        out: list[Any] = [None] * len(prepared)
        m = self.geometry.merge_size
        for idxs, pixels, (t, gh, gw) in batches_by_shape(prepared):
            feats = self.model.model.get_video_features(
                pixel_values_videos=host_sync.to_device(torch.as_tensor(pixels), self.device),
                video_grid_thw=torch.tensor([[t, gh, gw]]),  # on the host, where reading it costs nothing
                **self._tower_inputs(t, gh, gw),
            )
            for i, group in zip(idxs, self._per_group(feats, t, gh // m, gw // m)):
                out[i] = group
        return out

    @instance_cache(maxsize=64)
    def _tower_inputs(self, t: int, gh: int, gw: int) -> dict[str, Any]:
        """What the tower's forward would work out from the grid (positions, attention chunks,
        windows), worked out once per grid on the host and kept on the model's device. Left to the tower, each call reads the grid back (`tolist`) half a dozen
        times: on a GPU, each read waits for every camera's queued work."""
        inputs = self._grid_inputs(self.model.model.visual, torch.tensor([[t, gh, gw]]))
        placed = {k: host_sync.to_device(v, self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        for key in CHUNKS:
            if key in placed:
                vision_attention.prime(self.model, placed[key], tuple(inputs[key].diff().tolist()))
        return placed

    def _grid_inputs(self, visual: torch.nn.Module, grid: torch.Tensor) -> dict[str, Any]:
        """The family's tower inputs for `grid` [[t, gh, gw]], from transformers' own helpers,
        under the keyword names its forward takes them precomputed."""
        raise NotImplementedError

    def _per_group(self, feats: Any, t: int, h: int, w: int) -> list[Any]:
        """The tower's output for `t` groups of `h` x `w` merged tokens -> one result per group."""
        raise NotImplementedError
