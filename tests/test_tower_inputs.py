"""The Qwen towers' grid-derived inputs (positions, attention chunks, windows), worked out once
per grid on the host: the tower's output is unchanged, bit for bit, and a tower call reads
nothing back from the device, which on a GPU would wait for every camera's queued work."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pruning.host_sync import HostSyncs
from stream.vlm.qwen2_5_vl.preprocess import batches_by_shape
from stream.vlm.registry import load_model

FAMILIES = ["tiny-random", "tiny-random-qwen3-vl"]


def _frames(n: int, h: int, w: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    return [np.roll(base, 9 * i, axis=1) for i in range(n)]


def _groups() -> list[list[np.ndarray]]:
    """Five groups of two frame sizes, interleaved: two tower calls of different grids."""
    small, wide = _frames(6, 120, 160), _frames(4, 140, 300, seed=1)
    return [small[0:2], wide[0:2], small[2:4], wide[2:4], small[4:6]]


def _plain(vlm, prepared) -> list:
    """The same tower calls (one per frame size) through transformers' own
    `get_video_features`, the grid on the device and nothing precomputed."""
    out = [None] * len(prepared)
    for idxs, pixels, (t, gh, gw) in batches_by_shape(prepared):
        feats = vlm.model.model.get_video_features(pixel_values_videos=torch.as_tensor(pixels),
                                                   video_grid_thw=torch.tensor([[t, gh, gw]]))
        for i, group in zip(idxs, vlm._per_group(feats, t, gh // 2, gw // 2)):
            out[i] = group
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_precomputed_inputs_leave_the_towers_output_unchanged(name, model_cache):
    vlm = load_model(name, cache=model_cache)
    prepared = [vlm.prepare(g) for g in _groups()]
    batched, plain = vlm.encode_prepared(prepared), _plain(vlm, prepared)
    for got, want in zip(batched, plain):
        got, want = (got, want) if isinstance(got, tuple) else ((got, {}), (want, {}))
        assert torch.equal(got[0], want[0])
        assert got[1].keys() == want[1].keys() and all(torch.equal(got[1][k], want[1][k]) for k in got[1])


@pytest.mark.parametrize("name", FAMILIES)
def test_a_tower_call_reads_nothing_back_even_for_a_new_grid(name, model_cache):
    """On torch's `meta` device any read-back raises: a batch of a grid never seen before goes
    through the whole tower there."""
    vlm = load_model(name, cache=model_cache)
    vlm.model.to("meta")
    pixels, (t, gh, gw) = vlm.prepare(_frames(2, 112, 168))
    with HostSyncs() as syncs:
        out = vlm.encode_prepared([(torch.empty(pixels.shape, device="meta"), (t, gh, gw))] * 3)
    grid = out[0][0] if isinstance(out[0], tuple) else out[0]
    assert len(out) == 3 and grid.device.type == "meta" and grid.shape[:2] == (gh // 2, gw // 2)
    assert not _blocking_copies(syncs)


def _blocking_copies(syncs: HostSyncs) -> dict[str, int]:
    """Copies to the device that would wait for its queue (reads of host tensors, which
    `HostSyncs` counts too since on the CPU it cannot tell them apart, cost nothing here)."""
    return {k: n for k, n in syncs.counts.items() if k.endswith("to a device, blocking")}


@pytest.mark.parametrize("name", [*FAMILIES, "tiny-random-llava-ov"])
def test_frames_prepared_on_the_device_are_copied_there_without_waiting(name, model_cache):
    """On a GPU a frame goes up through pinned memory, queued: a blocking copy would make the
    camera's thread wait for every other camera's tower work."""
    vlm = load_model(name, cache=model_cache)
    vlm.model.to("meta")
    vlm.preprocess_on_device = True
    frames = _frames(vlm.group_size, 120, 160)
    with HostSyncs() as syncs:
        prepared = vlm.prepare(frames)
        vlm.encode_prepared([prepared, prepared])
    assert not _blocking_copies(syncs)


def test_llava_onevisions_tower_reads_nothing_back_either(model_cache):
    vlm = load_model("tiny-random-llava-ov", cache=model_cache)
    vlm.model.to("meta")
    pixels = vlm.prepare(_frames(1, 112, 168))
    with HostSyncs() as syncs:
        out = vlm.encode_prepared([torch.empty(pixels.shape, device="meta")] * 3)
    assert len(out) == 3 and out[0].device.type == "meta" and out[0].shape[:2] == (vlm.side, vlm.side)
    assert not _blocking_copies(syncs)
