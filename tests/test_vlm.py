"""The model seam and the Qwen2.5-VL family: the vision path, our M-RoPE positions and prompt
layout against the model's own forward, generation over pruned token subsets and over a
prefilled prefix cache, and picking the family by model type."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pruning import FrameTokens, TokenMemory, get_pruner
from stream.errors import ConfigError
from stream.vlm.base import LayoutSettings, Prompt, PromptPlan, VideoLM
from stream.vlm.positions import TextPart, VisualPart, build_positions
from stream.vlm.qwen2_5_vl.positions import time_offsets
from stream.vlm.qwen2_5_vl.preprocess import VisionGeometry, frames_to_pairs, patchify, smart_resize
from stream.vlm.registry import FAMILIES, FAMILY_NAMES, load_model


def _frames(n, h=120, w=160, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    return [np.roll(base, 7 * i, axis=1) for i in range(n)]


def test_patchify_matches_hf_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    frame = _frames(1, 100, 150)[0]
    geo = VisionGeometry(max_pixels=112 * 168)
    proc = Qwen2VLImageProcessorPil(min_pixels=geo.min_pixels, max_pixels=geo.max_pixels)
    ref = proc(images=[Image.fromarray(frame)], return_tensors="np")
    ours, grid = patchify(frames_to_pairs([frame], geo), geo)
    assert tuple(ref["image_grid_thw"][0]) == grid
    np.testing.assert_allclose(ours, ref["pixel_values"], atol=1e-5)


def test_smart_resize_respects_budget():
    h, w = smart_resize(480, 640, 28, 56 * 56, 448 * 448)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 448 * 448
    assert abs(w / h - 640 / 480) < 0.1


def test_group_by_group_equals_whole_clip(vlm):
    frames = _frames(8)
    geo = vlm.geometry
    pixels, (t, gh, gw) = patchify(frames_to_pairs(frames, geo), geo)
    whole = vlm.model.model.get_video_features(
        pixel_values_videos=torch.from_numpy(pixels), video_grid_thw=torch.tensor([[t, gh, gw]])
    ).pooler_output[0].reshape(t, gh // 2, gw // 2, -1)
    one_by_one = torch.stack([vlm.encode([frames[i:i + 2]])[0] for i in range(0, 8, 2)])
    batched = torch.stack(vlm.encode([frames[i:i + 2] for i in range(0, 8, 2)]))
    torch.testing.assert_close(one_by_one, whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched, whole, atol=1e-5, rtol=0)


def test_lone_frame_is_duplicated_into_a_pair(vlm):
    f = _frames(1)[0]
    torch.testing.assert_close(vlm.encode([[f]])[0], vlm.encode([[f, f]])[0], atol=1e-6, rtol=0)


def test_dense_positions_equal_get_rope_index(vlm):
    cfg = vlm.model.config
    t, gh, gw, fps = 5, 8, 12, 2.0
    n_vis = t * (gh // 2) * (gw // 2)
    pre = torch.tensor([11, 12, 13, cfg.vision_start_token_id])
    post = torch.tensor([cfg.vision_end_token_id, 21, 22, 23, 24])
    ids = torch.cat([pre, torch.full((n_vis,), cfg.video_token_id), post]).unsqueeze(0)
    types = (ids == cfg.video_token_id).int() * 2
    ref, _ = vlm.model.model.get_rope_index(
        ids, mm_token_type_ids=types, video_grid_thw=torch.tensor([[t, gh, gw]]),
        second_per_grid_ts=torch.tensor([2 / fps]),
    )
    idx = torch.arange(n_vis)
    hw = (gh // 2) * (gw // 2)
    group, row, col = idx // hw, (idx % hw) // (gw // 2), idx % (gw // 2)
    pts = group.double() * 2 / fps
    parts = [TextPart(pre), VisualPart(idx, time_offsets(pts, 0.0, vlm.tokens_per_second), row, col), TextPart(post)]
    ours = build_positions(parts)
    vis = slice(len(pre), len(pre) + n_vis)
    assert torch.equal(ours[:, vis], ref[:, 0, vis])
    assert torch.equal(ours[:, : len(pre)], ref[:, 0, : len(pre)])
    after = ours[:, vis.stop:]
    assert torch.equal(after[:, 0], torch.full((3,), int(ours[:, vis].max()) + 1))


def _manual_greedy(vlm, embeds, positions, steps):
    model = vlm.model
    ids = []
    emb, pos = embeds, positions
    past = None
    for _ in range(steps):
        out = model(inputs_embeds=emb, position_ids=pos, attention_mask=torch.ones(1, (past.get_seq_length() if past else 0) + emb.shape[1], dtype=torch.long),
                    past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = int(out.logits[0, -1].argmax())
        ids.append(nxt)
        if nxt in vlm.eos_ids:
            break
        emb = model.get_input_embeddings()(torch.tensor([[nxt]]))
        pos = pos[:, :, -1:] + 1
    return ids


def test_generate_over_sparse_reordered_subset_matches_manual_greedy(vlm):
    grids = vlm.encode([_frames(2, seed=s) for s in range(3)])
    h, w, d = grids[0].shape
    tokens = torch.cat([g.reshape(-1, d) for g in grids])
    idx = torch.arange(tokens.shape[0])
    group, row, col = idx // (h * w), (idx % (h * w)) // w, idx % w
    gen = torch.Generator().manual_seed(0)
    keep = torch.randperm(tokens.shape[0], generator=gen)[:40]  # sparse and out of raster order
    pre, post = vlm.chat_parts("You watch a camera.", "\nwhat is happening?")
    rows = torch.arange(len(keep))
    parts = [TextPart(pre), VisualPart(rows, group[keep] * 2, row[keep], col[keep]), TextPart(post)]
    ids = torch.cat([pre, torch.full((len(keep),), vlm.video_token_id), post])
    visual = torch.cat([torch.full((len(pre),), -1), rows, torch.full((len(post),), -1)])
    plan = PromptPlan(ids, build_positions(parts).unsqueeze(1), visual, prefix_len=len(pre) + len(keep))
    prompt = Prompt(plan, vlm.embed(plan, tokens[keep]))
    steps = 12
    with torch.inference_mode():
        manual = _manual_greedy(vlm, prompt.inputs_embeds, prompt.position_ids, steps)
        official = vlm.model.generate(inputs_embeds=prompt.inputs_embeds, position_ids=prompt.position_ids,
                                      attention_mask=torch.ones(1, len(plan), dtype=torch.long), max_new_tokens=steps,
                                      do_sample=False, eos_token_id=vlm.eos_ids, pad_token_id=vlm.tokenizer.pad_token_id)
    got = vlm.generate(prompt, max_new_tokens=steps)
    assert manual == official[0].tolist()
    assert got.new_tokens == len(manual)
    expect = vlm.tokenizer.decode([i for i in manual if i not in vlm.eos_ids], skip_special_tokens=True).strip()
    assert got.text == expect
    assert 0 < got.ttft_s <= got.total_s


def _dense_memory(vlm, n_groups=3, fps=2.0):
    """A memory holding every token of `n_groups` groups of a short clip, and the clip's frames."""
    frames = _frames(n_groups * vlm.group_size)
    grids = vlm.encode([frames[i:i + vlm.group_size] for i in range(0, len(frames), vlm.group_size)])
    mem = TokenMemory(10_000, get_pruner("recent"), recent_groups=1)
    for g, grid in enumerate(grids):
        mem.add(FrameTokens(g, g * vlm.group_size / fps, grid))
    return mem, frames


def test_the_family_is_a_video_lm(vlm):
    assert isinstance(vlm, VideoLM)
    assert vlm.group_size == 2 and vlm.hidden_size == 64 and vlm.random_weights and vlm.name == "tiny-random"


@pytest.mark.parametrize("mode", ["mrope", "text"])
def test_layout_of_a_dense_clip_equals_the_official_forward(vlm, mode):
    """Our embeds and positions give the logits of the model's own forward over the same ids and
    pixels (a short clip, where transformers' `get_rope_index` still follows the training rule)."""
    fps = 2.0
    mem, frames = _dense_memory(vlm, fps=fps)
    prompt = vlm.layout(mem.snapshot(), "what is happening?", LayoutSettings(timestamps=mode))
    pixels, (t, gh, gw) = patchify(frames_to_pairs(frames, vlm.geometry), vlm.geometry)
    grid_thw = torch.tensor([[t, gh, gw]] if mode == "mrope" else [[1, gh, gw]] * t)
    ids = prompt.ids.unsqueeze(0)
    types = (ids == vlm.video_token_id).int() * 2
    per_grid = torch.full((len(grid_thw),), vlm.group_size / fps)
    with torch.inference_mode():
        ref_pos, _ = vlm.model.model.get_rope_index(ids, mm_token_type_ids=types, video_grid_thw=grid_thw,
                                                    second_per_grid_ts=per_grid)
        vlm.model.model.rope_deltas = None
        ref = vlm.model(input_ids=ids, pixel_values_videos=torch.from_numpy(pixels), video_grid_thw=grid_thw,
                        second_per_grid_ts=per_grid, mm_token_type_ids=types,
                        attention_mask=torch.ones_like(ids)).logits
        ours = vlm.model(inputs_embeds=prompt.inputs_embeds, position_ids=prompt.position_ids,
                         attention_mask=torch.ones_like(ids)).logits
    assert torch.equal(prompt.position_ids, ref_pos)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["mrope", "text"])
def test_two_questions_on_an_unchanged_memory_share_the_prompt_prefix(vlm, mode):
    mem, _ = _dense_memory(vlm)
    settings = LayoutSettings(timestamps=mode)
    a = vlm.layout(mem.snapshot(), "what is happening?", settings)
    b = vlm.layout(mem.snapshot(), "Is anyone at the door, and when did the truck leave?", settings)
    n = a.prefix_len
    assert b.prefix_len == n and len(a) != len(b)
    assert torch.equal(a.ids[:n], b.ids[:n])
    assert torch.equal(a.inputs_embeds[:, :n], b.inputs_embeds[:, :n])
    assert torch.equal(a.position_ids[..., :n], b.position_ids[..., :n])
    for p in (a, b):  # the prefix ends at the video's last token: a single block is closed after it
        assert int(p.ids[n - 1]) == (vlm.video_token_id if mode == "mrope" else vlm.vision_end_id)
        assert int((p.ids[:n] == vlm.video_token_id).sum()) == len(mem)
        assert not bool((p.ids[n:] == vlm.video_token_id).any()) and vlm.vision_start_id not in p.ids[n:].tolist()
    suffix = vlm.tokenizer.decode(a.ids[n:], skip_special_tokens=True)
    span = "Video from 0.0 s to 2.0 s of the stream.\n" if mode == "mrope" else "\n"
    assert suffix.startswith(span + "what is happening?")


def test_generate_on_a_prefilled_prefix_cache_equals_a_full_prefill(vlm):
    from transformers import DynamicCache

    mem, _ = _dense_memory(vlm)
    settings = LayoutSettings()
    first = vlm.layout(mem.snapshot(), "what is happening?", settings)
    cache = DynamicCache(config=vlm.model.config)
    n = first.prefix_len
    with torch.inference_mode():
        vlm.model(inputs_embeds=first.inputs_embeds[:, :n], position_ids=first.position_ids[..., :n],
                  attention_mask=torch.ones(1, n, dtype=torch.long), past_key_values=cache, use_cache=True)
    for question in ("what is happening?", "when did the car arrive?"):
        prompt = vlm.layout(mem.snapshot(), question, settings)
        cached = vlm.generate(prompt, max_new_tokens=8, cache=cache)
        full = vlm.generate(prompt, max_new_tokens=8)
        assert (cached.text, cached.new_tokens) == (full.text, full.new_tokens)
        assert cache.get_seq_length() == n  # the caller's prefix is left as it was


def test_an_unsupported_model_type_is_a_clear_config_error(tmp_path):
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_model(str(tmp_path))
    assert str(e.value) == (f"model {str(tmp_path)!r} is a 'qwen2' checkpoint; supported families (model types): "
                            "Qwen2.5-VL (qwen2_5_vl); Qwen3-VL (qwen3_vl, qwen3_vl_moe); LLaVA-OneVision (llava_onevision)")
    assert {t for types in FAMILY_NAMES.values() for t in types} == set(FAMILIES)


def test_a_prompt_hands_each_chunk_the_side_features_of_its_own_visual_tokens():
    visual = torch.tensor([-1, 0, 1, -1, 2, 3, 4, -1])  # text, 2 visual, text, 3 visual, text
    plan = PromptPlan(ids=torch.zeros(8, dtype=torch.long), position_ids=torch.arange(8)[None], visual=visual,
                      prefix_len=7)
    deep = torch.arange(4 * 2).reshape(4, 2)  # the visual tokens from token 2 on: rows 1..4
    prompt = Prompt(plan, torch.zeros(1, 6, 3), start=2, extras={"deepstack": deep})
    mask, ex = prompt.visual_rows(2, 5)
    assert mask.tolist() == [True, False, True] and ex["deepstack"].tolist() == deep[:2].tolist()
    mask, ex = prompt.visual_rows(5, 8)
    assert mask.tolist() == [True, True, False] and ex["deepstack"].tolist() == deep[2:].tolist()
    assert Prompt(plan, torch.zeros(1, 8, 3)).visual_rows(0, 3)[1] == {}
