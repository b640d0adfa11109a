"""The LLaVA-OneVision family on its tiny random model: numpy preprocessing against the PIL image
processor, frame-by-frame encoding against the whole clip, the prompt's text against the chat
template and the processor's video expansion, logits and greedy tokens against the model's own
forward and `generate` from input ids and pixels, the prompt cache's answers against full
prefills over a pruned stream, and the family's pruner defaults."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from test_prompt_cache import _depends_on_the_video, _groups, _walk

from pruning import FrameTokens, TokenMemory, get_pruner
from stream.camera import pruner_params
from stream.config import from_dict
from stream.vlm import decode
from stream.vlm.base import LayoutSettings, VideoLM
from stream.vlm.llava_ov.preprocess import (SIGLIP_MEAN, SIGLIP_STD, FrameGeometry, checkpoint_normalisation,
                                            preprocess_frame)
from stream.vlm.registry import load_model

NAME = "tiny-random-llava-ov"
NATIVE = LayoutSettings(system_prompt="", timestamps="mrope")
QUESTION = "what is happening?"


@pytest.fixture(scope="module")
def ov(model_cache):
    return load_model(NAME, cache=model_cache)


def _frames(n, h=120, w=160, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    return [np.roll(base, 9 * i, axis=1) for i in range(n)]


def _pixels(ov, frames) -> torch.Tensor:
    """[1, F, 3, S, S]: the clip as the model's own video path takes it."""
    return torch.from_numpy(np.stack([preprocess_frame(f, ov.geometry) for f in frames]))[None]


def _dense_memory(ov, frames, fps=2.0):
    mem = TokenMemory(10_000, get_pruner("recent"), recent_groups=1)
    for g, grid in enumerate(ov.encode([[f] for f in frames])):
        mem.add(FrameTokens(g, g / fps, grid))
    return mem


def test_the_family_is_a_video_lm(ov):
    assert isinstance(ov, VideoLM)
    assert (ov.group_size, ov.hidden_size, ov.max_tokens_per_group) == (1, 64, 9)
    assert ov.random_weights and ov.name == NAME
    assert ov.geometry == FrameGeometry(size=70)  # SigLIP's mean and std, from the checkpoint's processor config
    assert ov.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4


@pytest.mark.parametrize("h, w", [(480, 640), (70, 70), (200, 300)])
def test_numpy_preprocessing_equals_the_pil_image_processors_plain_resize(h, w):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    frame = _frames(1, h, w)[0]
    for geo in (FrameGeometry(70), FrameGeometry(70, (0.48, 0.45, 0.4), (0.26, 0.26, 0.27))):
        proc = LlavaOnevisionImageProcessorPil(size={"height": 70, "width": 70}, image_grid_pinpoints=[[70, 70]],
                                               image_mean=list(geo.mean), image_std=list(geo.std))
        ref = proc(images=[Image.fromarray(frame)], return_tensors="np")["pixel_values"][0][0]
        np.testing.assert_array_equal(preprocess_frame(frame, geo), ref)


def test_mean_and_std_come_from_the_checkpoints_processor_config(tmp_path):
    """transformers 5's one processor config, an older per-processor file, or SigLIP's 0.5."""
    one, two, three = (tmp_path / d for d in ("v5", "split", "none"))
    for d in (one, two, three):
        d.mkdir()
    (one / "processor_config.json").write_text(json.dumps(
        {"video_processor": {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}}))
    (two / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.7] * 3, "image_std": [0.8] * 3}))
    assert checkpoint_normalisation(str(one)) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert checkpoint_normalisation(str(two)) == ((0.7,) * 3, (0.8,) * 3)
    assert checkpoint_normalisation(str(three)) == (SIGLIP_MEAN, SIGLIP_STD)


def test_frame_by_frame_equals_the_whole_clip(ov):
    """Each frame's tokens, one call per frame or all in one, equal the model's own encoding of
    the clip, whose one trailing row is the learned newline."""
    frames = _frames(4)
    with torch.inference_mode():
        whole = ov.model.model.get_video_features(pixel_values_videos=_pixels(ov, frames)).pooler_output[0]
    assert whole.shape == (4 * 9 + 1, 64)
    torch.testing.assert_close(whole[-1], ov.model.model.image_newline.detach(), atol=0, rtol=0)
    one_by_one = torch.stack([ov.encode([[f]])[0] for f in frames])
    batched = torch.stack(ov.encode([[f] for f in frames]))
    assert one_by_one.shape == (4, 3, 3, 64)
    torch.testing.assert_close(one_by_one.reshape(-1, 64), whole[:-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.reshape(-1, 64), whole[:-1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one frame"):
        ov.encode([frames[:2]])


def _template_text(ov, system: str, question: str, n_frames: int) -> str:
    """The converter's chat template, with `<video>` expanded as the processor expands it."""
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    messages = ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []) + [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = ov.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    vc = ov.model.config.vision_config
    processor = SimpleNamespace(num_image_tokens=(vc.image_size // vc.patch_size) ** 2, video_token="<video>")
    video = {"pixel_values_videos": [np.zeros((n_frames, 3, vc.image_size, vc.image_size), np.float32)]}
    expanded = LlavaOnevisionProcessor.replace_video_token(processor, video, 0)
    assert text.count("<video>") == 1
    return text.replace("<video>", expanded)


@pytest.mark.parametrize("system", ["", "You watch a camera."])
def test_the_prompt_is_the_chat_templates_video_layout(ov, system):
    frames = _frames(3)
    mem = _dense_memory(ov, frames)
    plan = ov.plan(mem.layout(), QUESTION, LayoutSettings(system_prompt=system))
    want = ov.tokenizer(_template_text(ov, system, QUESTION, 3), add_special_tokens=False).input_ids
    assert plan.ids.tolist() == want
    n = plan.prefix_len
    assert plan.visual[:n].tolist()[-27:] == list(range(27)) and (plan.visual[n:] == -1).all()
    assert int(plan.ids[n]) == ov.video_token_id  # the newline: the processor's last <video>
    assert torch.equal(plan.position_ids, torch.arange(len(plan))[None])


def test_a_dense_prompt_equals_the_official_forward_and_generate(ov):
    """Our embeddings, positions and decoding give the logits and greedy tokens of the model's own
    forward and `generate` from input ids and the frames' pixels (the newline included)."""
    frames = _frames(3)
    mem = _dense_memory(ov, frames)
    prompt = ov.layout(mem.snapshot(), QUESTION, LayoutSettings())
    ids = prompt.ids[None]
    pixels = _pixels(ov, frames)
    with torch.inference_mode():
        ref = ov.model(input_ids=ids, pixel_values_videos=pixels, attention_mask=torch.ones_like(ids)).logits[0, -1]
        ours = ov.forward(ov.new_cache(len(prompt)), prompt.inputs_embeds, prompt.position_ids, logits=True)
        official = ov.model.generate(input_ids=ids, pixel_values_videos=pixels, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=8, do_sample=False, eos_token_id=ov.eos_ids,
                                     pad_token_id=ov.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    diff = float((ours - ref).abs().max())
    assert diff <= 1e-4, diff
    fed = []

    class Recording:  # our decode loop, noting each token it feeds back
        def __getattr__(self, name):
            return getattr(ov, name)

        def embed_ids(self, token):
            fed.append(int(token))
            return ov.embed_ids(token)

    got = decode.generate(Recording(), prompt, max_new_tokens=8)
    assert len(official) == got.new_tokens == 8 and fed == official[:-1]
    assert got.text == ov.tokenizer.decode([i for i in official if i not in ov.eos_ids], skip_special_tokens=True).strip()


@pytest.mark.parametrize("mode", ["mrope", "text"])
def test_a_new_frame_appends_to_the_prompt_prefix(ov, mode):
    """Questions share the prefix, which ends at the last visual token; a new frame leaves every
    key of the prefix before it as it was."""
    settings = LayoutSettings(timestamps=mode)
    mem = _dense_memory(ov, _frames(4))
    lay = mem.layout()
    a, b = ov.plan(lay, QUESTION, settings), ov.plan(lay, "Is anyone at the door?", settings)
    n = a.prefix_len
    assert b.prefix_len == n and torch.equal(a.key(lay.stamp), b.key(lay.stamp))
    assert int(a.visual[n - 1]) == len(mem) - 1 and int(a.visual[n:].max()) == -1
    suffix = ov.tokenizer.decode(a.ids[n:], skip_special_tokens=True)
    assert suffix == f"\n{QUESTION}\nassistant\n"
    labels = ov.tokenizer.decode(a.ids[:n], skip_special_tokens=True)
    assert labels.endswith("<0.0 seconds><0.5 seconds><1.0 seconds><1.5 seconds>" if mode == "text" else "user\n")
    mem.add(FrameTokens(4, 2.0, ov.encode([_frames(1, seed=1)])[0]))
    lay2 = mem.layout()
    c = ov.plan(lay2, QUESTION, settings)
    assert torch.equal(c.key(lay2.stamp)[:n], a.key(lay.stamp))
    assert c.prefix_len - n == 9 + (len(ov._label("<2.0 seconds>")) if mode == "text" else 0)


def test_a_token_evicted_inside_a_frame_changes_the_key_where_it_was(ov):
    """A frame's tokens share a stamp and positions only count tokens, so the key names each
    token's cell: dropping one token of the first frame changes the key from its place on."""
    def rows(drop: int | None) -> SimpleNamespace:  # two 3x3 frames, one token dropped
        idx = torch.tensor([i for i in range(18) if i != drop])
        return SimpleNamespace(group=idx // 9, pts=(idx // 9).double(), row=idx % 9 // 3, col=idx % 3)

    stamps = torch.ones(18, dtype=torch.long)  # one write: the stamps alone cannot tell the rows apart
    a, b = ov.plan(rows(None), QUESTION, NATIVE), ov.plan(rows(4), QUESTION, NATIVE)
    ka, kb = a.key(stamps), b.key(stamps[:17])
    first = int(torch.nonzero((ka[:len(kb)] != kb).any(dim=1))[0])
    assert first == int(torch.nonzero(a.visual == 4)[0])


def test_chunked_prefill_across_frames_equals_one_shot(ov):
    mem = _dense_memory(ov, _frames(5))
    prompt = ov.layout(mem.snapshot(), QUESTION, LayoutSettings(timestamps="text"))
    one_shot = ov.forward(ov.new_cache(len(prompt)), prompt.inputs_embeds, prompt.position_ids, logits=True)
    for chunk in (4, 7, 13):  # cuts inside frames, labels and the newline
        cache = ov.new_cache(len(prompt))
        chunked = decode.prefill(ov, cache, prompt, logits=True, chunk=chunk)
        torch.testing.assert_close(chunked, one_shot, atol=1e-5, rtol=0)
        assert cache.get_seq_length() == len(prompt)
    cache = ov.new_cache(len(prompt) + 8)
    decode.prefill(ov, cache, prompt, end=prompt.prefix_len, chunk=9)
    cached, full = ov.generate(prompt, 8, cache=cache), ov.generate(prompt, 8)
    assert (cached.text, cached.new_tokens) == (full.text, full.new_tokens)
    assert cache.get_seq_length() == prompt.prefix_len


def _family_pruner(ov, name: str, **params):
    """The pruner a camera on this family builds from its config's memory table."""
    cfg = from_dict({"memory": {"pruner": name, "params": params}})
    return get_pruner(name, **pruner_params(cfg.memory, ov))


@pytest.mark.parametrize("mode", ["mrope", "text"])
@pytest.mark.parametrize("pruner", ["echoprune", "forestprune"])
def test_answers_match_over_a_long_stream_with_evictions(ov, mode, pruner):
    """As for Qwen (tests/test_prompt_cache.py), with 5x5-token frames: the store evicts every
    group or two, the cache rewinds to the first changed row, and every cached answer equals a
    full prefill."""
    h = w = 5
    mem = TokenMemory(60, _family_pruner(ov, pruner), recent_groups=1, evict_slack=12)
    answers, report = _walk(ov, mem, _groups(30, h=h, w=w), mode)
    assert mem.tokens_evicted > 0 and len(mem) <= 60 + h * w
    assert report["rewinds"] >= 10 and report["reprefilled_tokens"] > 0
    assert report["answers_cached"] == 30 and report["over_limit"] == 0
    _depends_on_the_video(answers)


def test_echoprune_gets_the_papers_llava_setting_unless_the_config_sets_it(ov):
    """EchoPrune on LLaVA-OV: tau 0.1 in a 3x3 window (Sec. 4.3); what the config sets wins."""
    default = _family_pruner(ov, "echoprune")
    assert (default.tau, default.radius) == (0.1, 1)
    own = _family_pruner(ov, "echoprune", tau=0.3, radius=2)
    assert (own.tau, own.radius) == (0.3, 2)
    partly = _family_pruner(ov, "echoprune", tau=0.3)
    assert (partly.tau, partly.radius) == (0.3, 1)
    for name in ("moprune", "hieravid", "forestprune"):  # their LLaVA-OV settings are our defaults
        assert pruner_params(from_dict({"memory": {"pruner": name}}).memory, ov) == {}
