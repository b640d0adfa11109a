"""The torch preprocessing (stream/vlm/preprocess_torch.py) against the numpy path it twins, on
the CPU: PIL's bicubic resize bit for bit, each family's pixel rows, and each tiny tower's tokens
with the torch path forced. Measured here everything is bit-identical (0 levels apart, 0 pixels
differing, rows and tokens equal), so it is asserted exactly."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_llava_ov import ov  # noqa: F401  (fixture: the tiny LLaVA-OneVision)
from test_qwen3_vl import _frames, q3  # noqa: F401  (q3: fixture, the tiny Qwen3-VL)

from stream.vlm import preprocess_torch
from stream.vlm.llava_ov.preprocess import FrameGeometry, preprocess_frame
from stream.vlm.qwen2_5_vl.preprocess import VisionGeometry, batches_by_shape, pil_resize, prepare_group
from stream.vlm.qwen3_vl.preprocess import geometry as qwen3_geometry

CPU = torch.device("cpu")
QWEN25 = VisionGeometry(max_pixels=448 * 448)  # 14-pixel patches, CLIP mean and std
QWEN3 = qwen3_geometry(SimpleNamespace(patch_size=16, spatial_merge_size=2, temporal_patch_size=2), 448 * 448)
# (source h, w) -> (target h, w): the budget sizes, a 1080p downscale, tiny and odd frames, a
# letterboxed strip's upscale, and both pass orders of Pillow 13 (width up and height down, and
# height shrinking by more than twice the width, run the vertical pass first)
SIZES = [((480, 640), (448, 448)), ((480, 640), (364, 504)), ((1080, 1920), (252, 448)), ((30, 40), (56, 84)),
         ((301, 517), (196, 336)), ((10, 2000), (28, 2800)), ((253, 217), (224, 374)), ((288, 120), (222, 116)),
         ((120, 160), (384, 384)), ((90, 90), (45, 90))]


def _image(h: int, w: int, seed: int, smooth: bool) -> np.ndarray:
    """Noise, or gradients and waves (many pixels between levels, where rounding shows)."""
    if not smooth:
        return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([127 + 120 * np.sin(x / 7 + y / 11), 127 + 120 * np.cos(x / 13), y * 255 / h], -1).astype(np.uint8)


@pytest.mark.parametrize("src, dst", SIZES)
@pytest.mark.parametrize("smooth", [False, True])
def test_the_resize_is_pils_bicubic_bit_for_bit(src, dst, smooth):
    image = _image(*src, seed=0, smooth=smooth)
    got = preprocess_torch.resize_uint8(preprocess_torch.to_device(image, CPU), dst)
    assert got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), pil_resize(image, dst))


def test_the_resize_is_pils_over_random_sizes():
    rng = np.random.default_rng(1)
    for _ in range(60):
        h, w, th, tw = (int(v) for v in rng.integers(1, 160, 4))
        image = _image(h, w, seed=int(rng.integers(1 << 30)), smooth=False)
        got = preprocess_torch.resize_uint8(preprocess_torch.to_device(image, CPU), (th, tw))
        np.testing.assert_array_equal(got.numpy(), pil_resize(image, (th, tw)), err_msg=f"{h}x{w} -> {th}x{tw}")


def _groups() -> list[list[np.ndarray]]:
    """A pair at the camera size, a lone last frame, a pair of two sizes, a 1080p pair, a strip
    too long for the processor (letterboxed), and a tiny and an odd frame together."""
    return [[_image(480, 640, 1, False), _image(480, 640, 2, True)], [_image(480, 640, 3, False)],
            [_image(720, 1280, 4, True), _image(480, 640, 5, False)],
            [_image(1080, 1920, 6, False), _image(1080, 1920, 7, True)], [_image(8, 2000, 8, False)],
            [_image(30, 40, 9, True), _image(301, 517, 10, False)]]


@pytest.mark.parametrize("geo", [QWEN25, QWEN3], ids=["qwen2.5-vl", "qwen3-vl"])
def test_qwen_pixel_rows_equal_the_numpy_paths(geo):
    groups = _groups()
    host = [prepare_group(g, geo) for g in groups]
    device = [preprocess_torch.prepare_group_torch(g, geo, CPU) for g in groups]
    for (rows, grid), (t_rows, t_grid) in zip(host, device):
        assert t_grid == grid and t_rows.dtype == torch.float32
        torch.testing.assert_close(t_rows, torch.from_numpy(rows), atol=0, rtol=0)
    # groups of mixed sizes batch the same way
    for (idxs, rows, grid), (t_idxs, t_rows, t_grid) in zip(batches_by_shape(host), batches_by_shape(device), strict=True):
        assert (t_idxs, t_grid) == (idxs, grid)
        torch.testing.assert_close(t_rows, torch.from_numpy(rows), atol=0, rtol=0)


def test_each_frame_goes_to_the_device_once_as_uint8(monkeypatch):
    moved = []
    to_device = preprocess_torch.to_device
    monkeypatch.setattr(preprocess_torch, "to_device", lambda im, dev: moved.append(im.dtype) or to_device(im, dev))
    preprocess_torch.prepare_group_torch([_image(480, 640, 0, False)], QWEN25, CPU)  # a lone frame, duplicated there
    preprocess_torch.prepare_group_torch([_image(480, 640, 0, False), _image(240, 320, 1, False)], QWEN25, CPU)
    preprocess_torch.preprocess_frame_torch(_image(480, 640, 0, False), FrameGeometry(384), CPU)
    assert moved == [np.uint8] * 4


@pytest.mark.parametrize("geo", [FrameGeometry(384), FrameGeometry(70, (0.48, 0.45, 0.4), (0.26, 0.26, 0.27))])
@pytest.mark.parametrize("h, w", [(480, 640), (384, 384), (70, 70), (30, 40), (8, 2000)])
def test_llava_frames_equal_the_numpy_path(geo, h, w):
    image = _image(h, w, 0, smooth=h == 480)
    got = preprocess_torch.preprocess_frame_torch(image, geo, CPU)
    assert got.shape == (3, geo.size, geo.size) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.from_numpy(preprocess_frame(image, geo)), atol=0, rtol=0)


def test_the_torch_path_runs_off_the_cpu_unless_told():
    assert not preprocess_torch.runs_on_device(None, CPU)
    assert preprocess_torch.runs_on_device(None, torch.device("cuda"))
    assert preprocess_torch.runs_on_device(True, CPU)
    assert not preprocess_torch.runs_on_device(False, torch.device("cuda"))


@pytest.mark.parametrize("family", ["vlm", "q3", "ov"])
def test_each_towers_tokens_are_the_same_with_torch_preprocessing(family, request, monkeypatch):
    """Qwen2.5-VL, Qwen3-VL (deepstack included) and LLaVA-OneVision, numpy by default on the
    CPU, then the torch path forced: the same tokens."""
    model = request.getfixturevalue(family)
    frames = _frames(4, seed=3) + _frames(1, 100, 150, seed=4)
    groups = [[f] for f in frames] if family == "ov" else [frames[:2], frames[2:4], frames[4:]]
    def pixels(prepared):
        return prepared if family == "ov" else prepared[0]

    assert model.preprocess_on_device is None and isinstance(pixels(model.prepare(groups[0])), np.ndarray)
    host = model.encode(groups)
    monkeypatch.setattr(model, "preprocess_on_device", True)
    assert isinstance(pixels(model.prepare(groups[0])), torch.Tensor)
    device = model.encode(groups)
    for a, b in zip(host, device, strict=True):
        if family == "q3":
            torch.testing.assert_close(b[1]["deepstack"], a[1]["deepstack"], atol=0, rtol=0)
            a, b = a[0], b[0]
        torch.testing.assert_close(b, a, atol=0, rtol=0)
