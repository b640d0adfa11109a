"""The Qwen3-VL family: the numpy preprocessing against transformers', group-by-group encoding
with its deepstack features, our layout, positions and deepstack against the model's own forward
and generate (dense and MoE), the prompt cache over a pruned stream, and what a kept token costs
the memory. Tiny random models, float32."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pruning import FrameTokens, TokenMemory, get_pruner
from stream.encoder import RollingEncoder
from stream.events import Question
from stream.query import QueryHandler, QuerySettings
from stream.types import Frame
from stream.vlm import decode
from stream.vlm.base import LayoutSettings, VideoLM
from stream.vlm.qwen2_5_vl.preprocess import frames_to_pairs, patchify
from stream.vlm.qwen3_vl import Qwen3_VL
from stream.vlm.qwen3_vl.preprocess import normalization
from stream.vlm.qwen3_vl.tiny import save_tiny_model
from stream.vlm.registry import load_model

FPS = 2.0
SETTINGS = LayoutSettings(frame_interval_s=1 / FPS)
QUESTION = "what is happening?"
DEEP = 3  # deepstack features per token in the tiny model


@pytest.fixture(scope="module")
def q3(model_cache) -> Qwen3_VL:
    return load_model("tiny-random-qwen3-vl", cache=model_cache)


def _frames(n, h=120, w=160, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    return [np.roll(base, 7 * i, axis=1) for i in range(n)]


def _dense_memory(vlm, frames) -> TokenMemory:
    """Every token of the clip's groups, with their deepstack features, group g at g * 2 / FPS s."""
    s = vlm.group_size
    mem = TokenMemory(10_000, get_pruner("recent"), recent_groups=1)
    for g, (grid, extras) in enumerate(vlm.encode([frames[i:i + s] for i in range(0, len(frames), s)])):
        mem.add(FrameTokens(g, g * s / FPS, grid, extras))
    return mem


def _official(vlm, prompt, frames):
    """The model's own inputs for the same ids and frames: ids, pixels, grid and token types."""
    pixels, grid = patchify(frames_to_pairs(frames, vlm.geometry), vlm.geometry)
    ids = prompt.ids.unsqueeze(0)
    return dict(input_ids=ids, pixel_values_videos=torch.from_numpy(pixels), video_grid_thw=torch.tensor([grid]),
                mm_token_type_ids=(ids == vlm.video_token_id).int() * 2, attention_mask=torch.ones_like(ids))


def _logits(vlm, prompt, deepstack: bool = True) -> torch.Tensor:
    """Our last-position logits for the whole prompt in one forward."""
    visual, extras = prompt.visual_rows(0, len(prompt))
    return vlm.forward(vlm.new_cache(len(prompt)), prompt.inputs_embeds, prompt.position_ids, logits=True,
                       visual=visual if deepstack else None, extras=extras)


def _parity(vlm, frames) -> float:
    """Max |our logits - the model's own forward's| on a dense clip (positions checked equal)."""
    prompt = vlm.layout(_dense_memory(vlm, frames).snapshot(), QUESTION, SETTINGS)
    ref = _official(vlm, prompt, frames)
    with torch.inference_mode():
        pos, _ = vlm.model.model.get_rope_index(ref["input_ids"], mm_token_type_ids=ref["mm_token_type_ids"],
                                                video_grid_thw=ref["video_grid_thw"])
        vlm.model.model.rope_deltas = None
        logits = vlm.model(**ref, logits_to_keep=1).logits[0, -1]
    assert torch.equal(prompt.position_ids, pos)
    return float((_logits(vlm, prompt) - logits).abs().max())


# -- the vision path ----------------------------------------------------------------------------


def test_numpy_preprocessing_matches_transformers_patchify_and_image_processor(q3, tmp_path):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    geo = q3.geometry
    half = (0.5,) * 3
    assert (geo.patch_size, geo.merge_size, geo.temporal_patch_size, geo.mean, geo.std) == (16, 2, 2, half, half)
    pair = frames_to_pairs(_frames(2, 100, 150, seed=1), geo)
    ours, grid = patchify(pair, geo)
    video = (torch.from_numpy(pair).float() / 255 - 0.5) / 0.5
    ref, *ref_grid = Qwen3VLVideoProcessor.patchify(None, video.permute(0, 3, 1, 2)[None], patch_size=16,
                                                    merge_size=2, temporal_patch_size=2)
    assert tuple(ref_grid) == grid
    np.testing.assert_allclose(ours, ref[0].numpy(), atol=1e-6)

    frame = _frames(1, 100, 150)[0]
    proc = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, image_mean=[.5] * 3, image_std=[.5] * 3,
                                    min_pixels=geo.min_pixels, max_pixels=geo.max_pixels)
    ref = proc(images=[Image.fromarray(frame)], return_tensors="np")
    ours, grid = patchify(frames_to_pairs([frame], geo), geo)
    assert tuple(ref["image_grid_thw"][0]) == grid
    np.testing.assert_allclose(ours, ref["pixel_values"], atol=1e-5)

    config = {"image_mean": [0.4] * 3, "image_std": [0.3] * 3}
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(config))
    assert normalization(str(tmp_path)) == ((0.4,) * 3, (0.3,) * 3)


def test_group_by_group_equals_the_whole_clip_deepstack_included(q3):
    frames = _frames(8)
    pixels, (t, gh, gw) = patchify(frames_to_pairs(frames, q3.geometry), q3.geometry)
    with torch.inference_mode():
        out = q3.model.model.get_video_features(pixel_values_videos=torch.from_numpy(pixels),
                                                video_grid_thw=torch.tensor([[t, gh, gw]]))
    tokens = out.pooler_output[0].reshape(t, gh // 2, gw // 2, -1)
    deep = torch.stack([f[0] for f in out.deepstack_features]).reshape(DEEP, t, gh // 2, gw // 2, -1)
    groups = [frames[i:i + 2] for i in range(0, 8, 2)]
    for encoded in ([q3.encode([g])[0] for g in groups], q3.encode(groups)):
        torch.testing.assert_close(torch.stack([grid for grid, _ in encoded]), tokens, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.stack([ex["deepstack"] for _, ex in encoded], dim=1), deep, atol=1e-5, rtol=0)


def test_the_encoder_stores_each_token_with_its_deepstack_vectors(q3):
    """A kept token holds 4 vectors of width D in the memory: itself and its 3 deepstack features."""
    frames = _frames(4, seed=2)
    mem = TokenMemory(10_000, get_pruner("recent"), recent_groups=1)
    now = time.monotonic()
    encoder = RollingEncoder(q3, mem)
    encoder._encode_batch([([Frame(i, i / FPS, frames[i]) for i in (0, 1)], now),
                           ([Frame(i, i / FPS, frames[i]) for i in (2, 3)], now)])
    encoder.close()
    snap = mem.snapshot()
    (g0, ex0), (g1, ex1) = q3.encode([frames[:2], frames[2:]])
    assert snap.tokens.shape == (2 * g0.shape[0] * g0.shape[1], q3.hidden_size)
    assert snap.extras["deepstack"].shape == (len(snap), DEEP, q3.hidden_size)
    want = torch.cat([ex["deepstack"].permute(1, 2, 0, 3).reshape(-1, DEEP, q3.hidden_size) for ex in (ex0, ex1)])
    torch.testing.assert_close(snap.extras["deepstack"], want, atol=1e-6, rtol=0)


# -- layout, positions and deepstack against the model's own forward ---------------------------


def test_the_family_is_a_video_lm(q3):
    assert isinstance(q3, VideoLM)
    assert (q3.group_size, q3.hidden_size, q3.random_weights, q3.name) == (2, 64, True, "tiny-random-qwen3-vl")
    assert q3.pruner_defaults == {"echoprune": {"tau": 0.5, "radius": None}}
    assert q3.kv_bytes_per_token == 2 * 4 * 2 * 16 * 4  # K and V, 4 layers, 2 KV heads of 16, float32


def test_the_layout_is_the_processors_text_with_its_timestamps(q3):
    """The prompt's ids are the chat template with the video expanded by `Qwen3VLProcessor`'s own
    `replace_video_token` (frames at 2 fps: groups labelled by their frames' mean time, '0.2',
    '1.2', ...); both timestamp modes give it; the prefix ends at the last visual token."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    frames = _frames(8)
    mem = _dense_memory(q3, frames)
    plans = [q3.plan(mem.layout(), QUESTION, LayoutSettings(timestamps=mode, frame_interval_s=1 / FPS))
             for mode in ("mrope", "text")]
    assert torch.equal(plans[0].ids, plans[1].ids) and torch.equal(plans[0].position_ids, plans[1].position_ids)
    plan = plans[0]
    proc = SimpleNamespace(video_processor=SimpleNamespace(merge_size=2, temporal_patch_size=2),
                           video_token="<|video_pad|>", vision_start_token="<|vision_start|>",
                           vision_end_token="<|vision_end|>")
    proc._calculate_timestamps = lambda *a: Qwen3VLProcessor._calculate_timestamps(proc, *a)
    _, gh, gw = _official(q3, plan, frames)["video_grid_thw"][0].tolist()
    video = Qwen3VLProcessor.replace_video_token(proc, {
        "video_grid_thw": torch.tensor([[4, gh, gw]]),
        "video_metadata": [SimpleNamespace(fps=FPS, frames_indices=list(range(8)))]}, 0)
    assert video.startswith("<0.2 seconds><|vision_start|><|video_pad|>") and "<|vision_end|><1.2 seconds>" in video
    text = q3.tokenizer.apply_chat_template(
        [{"role": "system", "content": SETTINGS.system_prompt}, {"role": "user", "content": video + QUESTION}],
        tokenize=False, add_generation_prompt=True)
    assert plan.ids.tolist() == q3.tokenizer(text, add_special_tokens=False).input_ids
    n = plan.prefix_len
    assert int(plan.ids[n - 1]) == q3.video_token_id and int(plan.ids[n]) == q3.vision_end_id
    assert int((plan.ids[n:] == q3.video_token_id).sum()) == 0


def test_dense_layout_gives_the_official_forwards_logits_and_greedy_tokens(q3, monkeypatch):
    """Our embeddings, positions (equal to `get_rope_index`) and deepstack give the last logits of
    the model's own forward from ids + pixels, and decode.generate its `generate`'s tokens."""
    frames = _frames(8)
    assert _parity(q3, frames) <= 1e-4
    prompt = q3.layout(_dense_memory(q3, frames).snapshot(), QUESTION, SETTINGS)
    seen = []  # the ids decode.generate has produced, as its text stream decodes them
    tokenizer = q3.tokenizer

    def decode_ids(ids, **kw):
        seen.append(list(ids))
        return tokenizer.decode(ids, **kw)

    monkeypatch.setattr(q3, "tokenizer", SimpleNamespace(decode=decode_ids))
    ours = q3.generate(prompt, max_new_tokens=8, on_text=lambda _: None)
    monkeypatch.undo()
    with torch.inference_mode():
        q3.model.model.rope_deltas = None
        official = q3.model.generate(**_official(q3, prompt, frames), max_new_tokens=8, do_sample=False,
                                     eos_token_id=q3.eos_ids, pad_token_id=tokenizer.pad_token_id)
    assert seen[-1] == official[0, len(prompt):].tolist() and ours.new_tokens == len(seen[-1]) >= 4


def test_leaving_deepstack_out_changes_the_logits(q3):
    prompt = q3.layout(_dense_memory(q3, _frames(4)).snapshot(), QUESTION, SETTINGS)
    assert float((_logits(q3, prompt) - _logits(q3, prompt, deepstack=False)).abs().max()) > 0.05
    with pytest.raises(ValueError, match="deepstack"):
        visual, _ = prompt.visual_rows(0, len(prompt))
        q3.forward(q3.new_cache(len(prompt)), prompt.inputs_embeds, prompt.position_ids, True, visual=visual, extras={})


def test_a_pruned_prompt_keeps_every_kept_tokens_dense_position(q3):
    """A kept token keeps its dense (row, col) and the cursor after a group moves by its full
    grid, so the positions of a pruned prompt are the dense prompt's at the tokens kept."""
    snap = _dense_memory(q3, _frames(8)).snapshot()
    gen = torch.Generator().manual_seed(0)
    keep = torch.sort(torch.randperm(len(snap), generator=gen)[: len(snap) // 3]).values
    h, w = snap.grid
    edge = (snap.row[keep] == h - 1) | (snap.col[keep] == w - 1)
    keep = keep[(snap.group[keep] != 1) | ~edge]  # group 1 loses its last row and column
    dense, pruned = q3.plan(snap, QUESTION, SETTINGS), q3.plan(snap.select(keep), QUESTION, SETTINGS)
    vis = dense.visual >= 0
    shown = torch.zeros(len(dense), dtype=torch.bool)
    shown[~vis] = True
    shown[torch.nonzero(vis).flatten()[keep]] = True
    assert torch.equal(pruned.ids, dense.ids[shown])
    assert torch.equal(pruned.position_ids, dense.position_ids[..., shown])


def test_chunked_prefill_across_a_group_boundary_equals_one_shot(q3):
    """Chunks that cut groups and labels apart, each with its own deepstack rows, on our
    BufferedCache: the same logits and the same KV as one forward."""
    prompt = q3.layout(_dense_memory(q3, _frames(8)).snapshot(), QUESTION, SETTINGS)
    whole, chunked = q3.new_cache(len(prompt)), q3.new_cache(len(prompt))
    one = decode.prefill(q3, whole, prompt, logits=True)
    many = decode.prefill(q3, chunked, prompt, logits=True, chunk=13)
    torch.testing.assert_close(many, one, atol=1e-5, rtol=0)
    for a, b in zip(whole.layers, chunked.layers):
        torch.testing.assert_close(b.keys, a.keys, atol=1e-5, rtol=0)


def test_the_moe_variant_loads_through_the_family_and_matches_its_own_forward(tmp_path):
    from transformers import Qwen3VLMoeForConditionalGeneration

    moe = load_model(str(save_tiny_model(tmp_path / "tiny-qwen3-vl-moe", moe=True)))
    assert isinstance(moe, Qwen3_VL) and isinstance(moe.model, Qwen3VLMoeForConditionalGeneration)
    assert _parity(moe, _frames(4)) <= 1e-4


# -- the prompt cache ---------------------------------------------------------------------------


def _stream(n: int, h: int = 4, w: int = 6, d: int = 64, seed: int = 0) -> list[FrameTokens]:
    """Groups around one drifting scene, each token with its deepstack features."""
    gen = torch.Generator().manual_seed(seed)
    scene = torch.randn(h, w, d, generator=gen)
    return [FrameTokens(g, g * 1.0, scene + 0.3 * torch.randn(h, w, d, generator=gen),
                        {"deepstack": 0.5 * torch.randn(DEEP, h, w, d, generator=gen)}) for g in range(n)]


@pytest.mark.parametrize("pruner", ["echoprune", "hieravid"])
def test_cached_answers_equal_full_prefills_over_a_stream_with_evictions(q3, pruner):
    """The memory evicts (and HieraVid merges, deepstack vectors with their tokens) every group or
    two; each answer on the prompt cache equals a full prefill, token for token."""
    questions = (QUESTION, "is anyone at the door?", "when did the car arrive?")
    mem = TokenMemory(60, get_pruner(pruner), recent_groups=1, evict_slack=12)
    settings = QuerySettings(max_new_tokens=8, frame_interval_s=1 / FPS)
    cached = QueryHandler(q3, mem, settings)
    full = QueryHandler(q3, mem, QuerySettings(max_new_tokens=8, frame_interval_s=1 / FPS, prompt_cache=False))
    answers = []
    try:
        for i, group in enumerate(_stream(24)):
            mem.add(group)
            if i % 2 == 0:
                cached.cache.refresh(lambda: False)
            q = Question(questions[i % len(questions)])
            a, b = cached.ask(q), full.ask(q)
            assert (a.prompt_path, b.prompt_path) == ("cached", "full")
            assert (a.text, a.new_tokens, a.prompt_tokens) == (b.text, b.new_tokens, b.prompt_tokens), (i, a, b)
            answers.append(a)
        report = cached.cache_report()
    finally:
        cached.close()
        full.close()
    assert mem.tokens_evicted > 0 and report["rewinds"] >= 5 and report["reprefilled_tokens"] > 0
    assert report["answers_cached"] == 24
    assert sum(a.prefilled_tokens for a in answers) < sum(a.prompt_tokens for a in answers) // 2
    assert len({a.text for a in answers}) > len(questions) and sum(a.new_tokens for a in answers) > 2 * len(answers)


async def test_a_camera_streams_qwen3_vl_with_deepstack_and_answers_from_its_cache(q3):
    """Through a camera: frames are encoded with their deepstack features into the memory and a
    question answered on the camera's prompt cache equals a full prefill."""
    from stream.camera import Camera
    from stream.config import from_dict

    cfg = from_dict({
        "name": "cam", "source": {"kind": "synthetic", "fps": 4.0, "duration_s": 8.0, "seed": 1},
        "sampler": {"fps": FPS}, "memory": {"pruner": "echoprune", "capacity": 200, "recent_groups": 2},
        "query": {"max_new_tokens": 8}, "output": {"status_interval_s": 0.0},
    })
    async with Camera(cfg, q3) as cam:
        await cam.done()
        answer = await cam.ask(Question(QUESTION))
    snap = cam.memory.snapshot()
    assert cam.memory.groups_seen == 8 and snap.extras["deepstack"].shape == (len(snap), DEEP, q3.hidden_size)
    assert answer.prompt_path == "cached"
    full = QueryHandler(q3, cam.memory, QuerySettings(max_new_tokens=8, frame_interval_s=1 / FPS, prompt_cache=False))
    try:
        other = full.ask(Question(QUESTION))
    finally:
        full.close()
    assert (answer.text, answer.new_tokens, answer.prompt_tokens) == (other.text, other.new_tokens, other.prompt_tokens)
