"""Odd frame sizes reach the memory: a 2000x8 strip (beyond the 200:1 the Qwen processor
accepts) is letterboxed, tiny and odd sizes are scaled up, through the real tiny model and a
real file -> encoder -> memory ingest and a camera that answers about it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clips import picture, write_video

from pruning import TokenMemory, get_pruner
from stream.camera import Camera
from stream.config import from_dict
from stream.encoder import RollingEncoder
from stream.sources import FileSource
from stream.vlm.qwen2_5_vl.preprocess import (MAX_ASPECT, VisionGeometry, frames_to_pairs, letterbox, patchify,
                                              resize_frame, smart_resize)

ODD = [(2000, 8), (8, 2000), (17, 9), (1, 1), (3, 1000)]  # (width, height)


def write_odd(path, w, h, n=8):
    """A lossless RGB clip (FFV1 takes any size, H.264 no odd one) of n pictures w x h."""
    return write_video(path, [picture(i, w, h) for i in range(n)], 10, codec="ffv1", pix_fmt="bgr0")


def test_letterbox_pads_only_what_the_processor_refuses():
    strip = picture(0, 2000, 8)
    boxed = letterbox(strip)
    assert boxed.shape == (10, 2000, 3) and max(boxed.shape[:2]) / min(boxed.shape[:2]) <= MAX_ASPECT
    assert (boxed[1:9] == strip).all() and not boxed[[0, 9]].any()  # centred, black bars
    assert letterbox(np.ascontiguousarray(strip.transpose(1, 0, 2))).shape == (2000, 10, 3)
    for frame in (picture(0, 160, 120), picture(0, 17, 9), picture(0, 2000, 10)):
        assert letterbox(frame) is frame


def test_in_range_frames_are_resized_as_the_processor_does():
    geo = VisionGeometry()
    for w, h in ((640, 480), (17, 9), (2000, 10)):
        frame = picture(3, w, h)
        th, tw = smart_resize(h, w, geo.factor, geo.min_pixels, geo.max_pixels)
        expected = np.asarray(Image.fromarray(frame).resize((tw, th), Image.BICUBIC))
        np.testing.assert_array_equal(resize_frame(frame, geo), expected)


def test_a_strip_is_what_the_hf_processor_makes_of_its_letterbox():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    geo = VisionGeometry(max_pixels=112 * 168)
    strip = picture(5, 2000, 8)
    proc = Qwen2VLImageProcessorPil(min_pixels=geo.min_pixels, max_pixels=geo.max_pixels)
    ref = proc(images=[Image.fromarray(letterbox(strip))], return_tensors="np")
    ours, grid = patchify(frames_to_pairs([strip], geo), geo)
    assert tuple(ref["image_grid_thw"][0]) == grid
    np.testing.assert_allclose(ours, ref["pixel_values"], atol=1e-5)


@pytest.mark.parametrize(("w", "h"), ODD)
def test_the_tiny_model_encodes_odd_sizes(vlm, w, h):
    frames = [picture(i, w, h) for i in range(2)]
    (grid,) = vlm.encode([frames])
    assert grid.ndim == 3 and grid.shape[0] * grid.shape[1] >= 1 and grid.shape[2] == vlm.hidden_size
    assert torch.isfinite(grid).all()


@pytest.mark.parametrize(("w", "h"), ODD[:3])
async def test_a_file_of_odd_frames_is_ingested_to_the_end(tmp_path, vlm, w, h):
    path = tmp_path / f"odd_{w}x{h}.mkv"
    write_odd(path, w, h)
    memory = TokenMemory(1000, get_pruner("echoprune"), recent_groups=2)
    encoder = RollingEncoder(vlm, memory)
    source = FileSource(path)
    try:
        await encoder.run(source)
    finally:
        encoder.close()
    assert source.stats.frames == 8 and source.stats.errors == 0
    assert encoder.stats.groups_encoded == 4 == memory.groups_seen and len(memory) > 0


async def test_a_camera_on_a_2000x8_file_answers(tmp_path, vlm):
    path = tmp_path / "strip.mkv"
    write_odd(path, 2000, 8, n=16)
    cfg = from_dict({
        "name": "strip",
        "source": {"kind": "file", "path": str(path)},
        "sampler": {"fps": 10.0},
        "memory": {"pruner": "echoprune", "capacity": 400, "recent_groups": 2},
        "query": {"max_new_tokens": 4},
        "output": {"status_interval_s": 0.0},
        "questions": [{"at_s": 99.0, "text": "What is in the strip?"}],
    })
    async with Camera(cfg, vlm) as cam:
        await cam.done()
    summary = cam.summary()
    assert summary["groups_encoded"] == 8 and summary["answers"] == 1 and summary["tokens_kept"] > 0
    assert cam.status().source["state"] == "stopped"
