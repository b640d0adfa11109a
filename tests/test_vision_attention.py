"""stream/vlm/vision_attention.py: the vision tower with all of a layer's windows / frames in one
SDPA call equals the model's own per-chunk loop, on the tiny random Qwen2.5-VL and Qwen3-VL.

Each comparison runs two models with the same weights: the loaded one (transformers' forward)
and a deepcopy with `install` applied."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from stream.vlm import patch_embed
from stream.vlm.registry import checkpoint_path, load_model
from stream.vlm.vision_attention import BatchedVisionAttention, install

TOL = 1e-5


def raw(name: str, cache):
    """The tiny checkpoint as transformers loads it: the per-chunk loop and the Conv3d (the
    families install both speed-ups when they load it)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = checkpoint_path(name, cache)
    return AutoModelForImageTextToText.from_pretrained(path, config=AutoConfig.from_pretrained(path)).eval()


@pytest.fixture(scope="module")
def q25(vlm, model_cache):
    return raw("tiny-random", model_cache)


@pytest.fixture(scope="module")
def q3(model_cache):
    load_model("tiny-random-qwen3-vl", cache=model_cache)  # builds the checkpoint
    return raw("tiny-random-qwen3-vl", model_cache)


@pytest.fixture(scope="module")
def q3_moe():
    from transformers import Qwen3VLMoeForConditionalGeneration

    from stream.vlm.qwen2_5_vl.tiny import build_tokenizer
    from stream.vlm.qwen3_vl.tiny import tiny_config

    torch.manual_seed(0)
    return Qwen3VLMoeForConditionalGeneration(tiny_config(build_tokenizer(), moe=True)).eval()


def installed(model):
    twin = copy.deepcopy(model)
    assert install(twin) == model.config.vision_config.depth
    return twin


def tower(model, grids: list[list[int]], seed: int = 0):
    """`get_video_features` on random pixels for videos of `grids` ([t, gh, gw] patches each):
    the merged tokens and (Qwen3-VL) the deepstack features, each concatenated over videos."""
    v = model.config.vision_config
    n = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(n, v.in_channels * v.temporal_patch_size * v.patch_size ** 2,
                         generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model.model.get_video_features(pixel_values_videos=pixels, video_grid_thw=torch.tensor(grids))
    deep = [torch.cat(f) for f in (getattr(out, "deepstack_features", None) or [])]
    return torch.cat(out.pooler_output), deep


def max_diff(a, b) -> float:
    (ta, da), (tb, db) = a, b
    assert ta.shape == tb.shape and len(da) == len(db)
    return max([(ta - tb).abs().max().item()] + [(x - y).abs().max().item() for x, y in zip(da, db)])


def scale(out) -> float:
    """The largest magnitude in a tower's output (the tiny towers' run to ~20): a summation in
    another order differs relative to it."""
    tokens, deep = out
    return max([1.0, tokens.abs().max().item()] + [d.abs().max().item() for d in deep])


class SdpaCalls:
    """Counts `torch.nn.functional.scaled_dot_product_attention` calls (both transformers' sdpa
    path and the installed module look it up there at call time)."""

    def __init__(self, monkeypatch):
        self.shapes: list[tuple[int, ...]] = []
        real = torch.nn.functional.scaled_dot_product_attention

        def counted(q, *args, **kwargs):
            self.shapes.append(tuple(q.shape))
            return real(q, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)


def test_default_vision_attention_is_the_looped_one(q25, q3):
    """Loaded on CPU the way the registry loads them, the towers take the per-chunk loop path
    (sdpa), which is the path `install` replaces."""
    for model in (q25, q3):
        assert model.config.vision_config._attn_implementation == "sdpa"
        assert model.model.visual.blocks[0].attn.config._attn_implementation == "sdpa"


# Qwen2.5-VL's tiny tower: depth 2, window 112 px = 4x4 merged tokens, block 1 full attention.
QWEN25_GRIDS = {
    "equal windows, one group": [[1, 32, 32]],             # 448x448: 4x4 windows of 64 patches
    "equal windows, 8 groups": [[8, 32, 32]],
    "unequal windows, 3 groups": [[3, 20, 28]],            # 10x14 merged: windows of 4/2 rows, 4/2 cols
    "unequal windows and frames": [[2, 32, 32], [3, 20, 28]],  # full-attention frames of 1024 and 560
}


@pytest.mark.parametrize("grids", QWEN25_GRIDS.values(), ids=QWEN25_GRIDS.keys())
def test_qwen2_5_vl_tower_equals_the_loop(q25, grids):
    diff = max_diff(tower(q25, grids), tower(installed(q25), grids))
    assert diff < TOL, diff


# Qwen3-VL's tiny tower: patch 16, full attention per frame, deepstack after every block.
QWEN3_GRIDS = {
    "one group": [[1, 28, 28]],                             # 448x448
    "8 groups": [[8, 28, 28]],
    "unequal frames": [[2, 28, 28], [3, 20, 24]],
}


@pytest.mark.parametrize("grids", QWEN3_GRIDS.values(), ids=QWEN3_GRIDS.keys())
def test_qwen3_vl_tower_equals_the_loop(q3, grids):
    diff = max_diff(tower(q3, grids), tower(installed(q3), grids))
    assert diff < TOL, diff


def test_qwen3_vl_moe_tower_equals_the_loop(q3_moe):
    grids = [[3, 28, 28], [2, 20, 24]]
    diff = max_diff(tower(q3_moe, grids), tower(installed(q3_moe), grids))
    assert diff < TOL, diff


def test_equals_the_eager_loop_too(q25):
    """The eager per-chunk loop (float32 softmax) is the same arithmetic up to rounding."""
    eager = copy.deepcopy(q25)
    eager.config.vision_config._attn_implementation = "eager"
    grids = [[3, 20, 28]]
    diff = max_diff(tower(eager, grids), tower(installed(q25), grids))
    assert diff < TOL, diff


@pytest.mark.parametrize("grids, loop_calls", [
    ([[3, 20, 28]], 3 * 12 + 3),   # block 0: 12 windows per frame; block 1: one call per frame
    ([[4, 32, 32]], 4 * 16 + 4),
])
def test_one_sdpa_call_per_layer_and_one_sync_per_kind(q25, monkeypatch, grids, loop_calls):
    twin = installed(q25)
    calls = SdpaCalls(monkeypatch)
    tower(q25, grids)
    assert len(calls.shapes) == loop_calls
    calls.shapes.clear()
    attns = [b.attn for b in twin.model.visual.blocks]
    assert all(isinstance(a, BatchedVisionAttention) for a in attns)
    plans = attns[0]._plans
    assert all(a._plans is plans for a in attns)
    tower(twin, grids)
    assert len(calls.shapes) == len(attns)  # one batched call per block
    assert plans.syncs == 2  # windows and frames: one host sync each, not one per block
    tower(twin, grids, seed=1)
    assert plans.syncs == 4  # a new forward's new cu_seqlens tensors


def test_qwen3_vl_one_sdpa_call_per_layer(q3, monkeypatch):
    twin = installed(q3)
    calls = SdpaCalls(monkeypatch)
    tower(twin, [[2, 28, 28], [3, 20, 24]])
    assert len(calls.shapes) == q3.config.vision_config.depth
    assert calls.shapes[0][0] == 5  # all five frames, padded to the longest, in one call
    assert twin.model.visual.blocks[0].attn._plans.syncs == 1


def test_install_is_idempotent_and_keeps_the_weights(q25):
    twin = installed(q25)
    assert install(twin) == 0
    a, b = q25.state_dict(), twin.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_flash_attention_is_left_alone(q25, caplog):
    twin = copy.deepcopy(q25)
    twin.config.vision_config._attn_implementation = "flash_attention_2"
    with caplog.at_level(logging.DEBUG, logger="stream.vlm.vision_attention"):
        assert install(twin) == 0
    assert "flash_attention_2" in caplog.text
    assert not any(isinstance(b.attn, BatchedVisionAttention) for b in twin.model.visual.blocks)


def test_unknown_vision_attention_is_left_alone(caplog):
    class Attention(nn.Module):
        pass

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention()

    model = nn.Module()
    model.visual = nn.Module()
    model.visual.blocks = nn.ModuleList([Block(), Block()])
    with caplog.at_level(logging.DEBUG, logger="stream.vlm.vision_attention"):
        assert install(model) == 0
        assert install(nn.Linear(2, 2)) == 0
    assert "Attention" in caplog.text
    assert all(type(b.attn) is Attention for b in model.visual.blocks)


def test_the_linear_patch_embedding_equals_the_conv3d(q25, q3):
    for model, grids in ((q25, [[3, 20, 28]]), (q3, [[2, 28, 28]])):
        twin = copy.deepcopy(model)
        assert patch_embed.install(twin)
        assert isinstance(twin.model.visual.patch_embed, patch_embed.LinearPatchEmbed)
        want = tower(model, grids)
        diff = max_diff(want, tower(twin, grids))
        assert diff < TOL * scale(want), diff
        a, b = model.state_dict(), twin.state_dict()
        assert a.keys() == b.keys()
    assert not patch_embed.install(nn.Linear(2, 2))


def test_the_loaded_families_run_both_speed_ups_and_equal_transformers(vlm, q25, model_cache):
    q3_family = load_model("tiny-random-qwen3-vl", cache=model_cache)
    for family, reference, grids in ((vlm, q25, [[2, 32, 32]]), (q3_family, raw("tiny-random-qwen3-vl", model_cache),
                                                                  [[2, 28, 28]])):
        visual = family.model.model.visual
        assert isinstance(visual.patch_embed, patch_embed.LinearPatchEmbed)
        assert all(isinstance(b.attn, BatchedVisionAttention) for b in visual.blocks)
        want = tower(reference, grids)
        diff = max_diff(want, tower(family.model, grids))
        assert diff < TOL * scale(want), diff
