"""HieraVid's layer-level pruning inside the LLM (stream/vlm/layer_pruning.py): with every stage
keeping everything our layer loop is the model's own forward; each stage holds the schedule's
share of the visual tokens, chosen by Eq. 8's relevance, and never drops text; question-time
pruning leaves the memory and the prompt cache as they were; the setting reaches answers through
the config and the query handler; the question's hidden states for query-aware ranking."""
from __future__ import annotations

import pytest
import torch

from pruning import FrameTokens, TokenMemory, get_pruner
from stream.camera import Camera
from stream.config import from_dict
from stream.errors import ConfigError
from stream.events import Question
from stream.query import QueryHandler, QuerySettings
from stream.vlm.base import LayoutSettings
from stream.vlm.layer_pruning import LayerPruned, kept_count
from stream.vlm.qwen2_5_vl import Qwen2_5_VL
from stream.vlm.qwen2_5_vl.tiny import build_tokenizer, tiny_config
from stream.vlm.registry import load_model

QUESTION = "what is happening?"
LAYERS = 4


@pytest.fixture(scope="module")
def deep():
    """The tiny Qwen2.5-VL with four decoder layers, so a schedule can have three stages."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer)
    config.text_config.num_hidden_layers = LAYERS
    config.text_config.layer_types = ["full_attention"] * LAYERS
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    return Qwen2_5_VL(model, tokenizer, name="tiny-4-layers", random_weights=True, max_pixels=112 * 112)


def _memory(hidden: int, groups: int = 4, seed: int = 0) -> TokenMemory:
    mem = TokenMemory(1000, get_pruner("recent"), recent_groups=1)
    gen = torch.Generator().manual_seed(seed)
    for g in range(groups):
        mem.add(FrameTokens(g, g * 1.0, torch.randn(3, 4, hidden, generator=gen)))
    return mem


def _prompt(vlm, question: str = QUESTION, **layout):
    return vlm.layout(_memory(vlm.hidden_size).snapshot(), question, LayoutSettings(**layout))


@pytest.mark.parametrize("mode", ["mrope", "text"])
def test_keeping_everything_is_the_models_own_forward(deep, mode):
    prompt = _prompt(deep, timestamps=mode)
    full = tuple((layer, 1.0) for layer in range(1, LAYERS))
    ref = deep.forward(deep.new_cache(len(prompt)), prompt.inputs_embeds, prompt.position_ids, logits=True)
    ours = LayerPruned(deep, full).prefill(deep.new_cache(len(prompt)), prompt)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    plain, looped = deep.generate(prompt, 10), deep.generate(prompt, 10, layer_schedule=full)
    assert (looped.text, looped.new_tokens) == (plain.text, plain.new_tokens)
    assert looped.stage_tokens == (48,) * LAYERS and plain.stage_tokens == ()


def test_each_stage_holds_the_schedules_share_and_every_text_token(deep):
    prompt = _prompt(deep)
    schedule = ((1, 0.5), (2, 0.25), (3, 0.1))
    runner = LayerPruned(deep, schedule)
    cache = deep.new_cache(len(prompt) + 4)
    runner.prefill(cache, prompt)
    visual = prompt.plan.visual >= 0
    n0, text = int(visual.sum()), torch.nonzero(~visual).flatten()
    want = [n0] + [kept_count(k, n0) for _, k in schedule]
    assert want == [48, 24, 12, 5]
    assert [t.visual_tokens for t in runner.trace] == want
    assert [(t.first_layer, t.end_layer) for t in runner.trace] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    for before, stage in zip(runner.trace, runner.trace[1:]):
        assert set(stage.kept.tolist()) <= set(before.kept.tolist())  # dropped tokens stay dropped
    for stage in runner.trace:
        assert torch.equal(stage.kept[~visual[stage.kept]], text) and stage.text_tokens == len(text)
        assert torch.equal(stage.kept, stage.kept.sort().values)  # prompt order
        for layer in range(stage.first_layer, stage.end_layer):  # each layer's KV holds its stage's tokens
            assert cache.layers[layer].get_seq_length() == len(stage.kept)
    gen = deep.generate(prompt, 6, layer_schedule=schedule)
    assert gen.stage_tokens == tuple(want) and gen.new_tokens >= 1


def test_a_stage_keeps_the_visual_tokens_most_relevant_to_the_last_token(deep):
    """Eq. 8 at layer 2: the kept visual tokens are those with the largest softmax(h_t h_v / sqrt d),
    h the hidden states entering layer 2 of the model's own forward."""
    prompt = _prompt(deep)
    runner = LayerPruned(deep, ((2, 0.25),))
    runner.prefill(deep.new_cache(len(prompt)), prompt)
    with torch.inference_mode():
        states = deep.model.model.language_model(
            inputs_embeds=prompt.inputs_embeds, position_ids=prompt.position_ids,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long), output_hidden_states=True).hidden_states[2]
    h = states[0]
    visual = torch.nonzero(prompt.plan.visual >= 0).flatten()
    score = torch.softmax(h[visual] @ h[-1] / h.shape[-1] ** 0.5, dim=0)
    expect = visual[score.topk(12).indices].sort().values
    kept = runner.trace[1].kept
    assert torch.equal(kept[prompt.plan.visual[kept] >= 0], expect)


def test_question_time_pruning_leaves_the_memory_and_the_prompt_cache_as_they_were(vlm):
    mem = _memory(vlm.hidden_size)
    plain = QueryHandler(vlm, _memory(vlm.hidden_size), QuerySettings(max_new_tokens=6))
    pruned = QueryHandler(vlm, mem, QuerySettings(max_new_tokens=6, layer_pruning=((1, 0.25),)))
    try:
        cached = pruned.ask(Question(QUESTION))
        kv = [(layer.keys.clone(), layer.values.clone()) for layer in pruned.cache.kv.layers]
        key, snap, stamps = pruned.cache.key.clone(), mem.snapshot(), mem.layout().stamp
        full = pruned.ask(Question(QUESTION, llm_budget=40))
        assert torch.equal(pruned.cache.key, key)
        for layer, (k, v) in zip(pruned.cache.kv.layers, kv):
            assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
        assert torch.equal(mem.snapshot().tokens, snap.tokens) and torch.equal(mem.layout().stamp, stamps)
        reference = plain.ask(Question(QUESTION))
    finally:
        pruned.close()
        plain.close()
    # the cached path runs the question over the whole shared cache: the unpruned answer
    assert (cached.prompt_path, cached.layer_visual_tokens) == ("cached", 0)
    assert (cached.text, cached.new_tokens) == (reference.text, reference.new_tokens)
    assert (full.prompt_path, full.tokens_used, full.layer_visual_tokens) == ("full", 40, 10)


def test_an_answer_with_layer_pruning_reports_it(vlm):
    handler = QueryHandler(vlm, _memory(vlm.hidden_size),
                           QuerySettings(max_new_tokens=4, prompt_cache=False, layer_pruning=((1, 0.5),)))
    try:
        answer = handler.ask(Question(QUESTION))
    finally:
        handler.close()
    assert (answer.prompt_path, answer.tokens_used, answer.layer_visual_tokens) == ("full", 48, 24)
    assert 1 <= answer.new_tokens <= 4 and answer.to_dict()["layer_visual_tokens"] == 24


@pytest.mark.parametrize("bad", [[[0, 0.5]], [[2, 0.0]], [[2, 1.5]], [[3, 0.5], [2, 0.25]], [[2, 0.25], [3, 0.5]],
                                 [[2]], [["2", 0.5]], 7])
def test_a_bad_schedule_is_a_config_error_naming_the_field(bad):
    with pytest.raises(ConfigError) as e:
        from_dict({"query": {"layer_pruning": bad}})
    assert e.value.path == "query.layer_pruning"


def test_a_stage_past_the_models_layers_is_a_config_error_at_camera_start(vlm):
    cfg = from_dict({"query": {"layer_pruning": [[1, 0.5], [2, 0.25]]}})
    assert cfg.query.layer_pruning == [[1, 0.5], [2, 0.25]] and from_dict({}).query.layer_pruning == []
    with pytest.raises(ConfigError) as e:
        Camera(cfg, vlm)
    assert e.value.path == "query.layer_pruning" and "2 decoder layers" in str(e.value)


def test_question_states_start_at_the_input_embeddings_and_follow_the_question(deep):
    ids = deep.chat_parts("", f"\n{QUESTION}")[1]  # what follows the video, the question's turn
    torch.testing.assert_close(deep.question_states(QUESTION, 0), deep.embed_ids(ids).float(), atol=0, rtol=0)
    with torch.inference_mode():
        own = deep.model.model.language_model(
            inputs_embeds=deep.embed_ids(ids).unsqueeze(0), position_ids=torch.arange(len(ids)).view(1, 1, -1).expand(3, 1, -1),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long), output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(deep.question_states(QUESTION, 2), own[0], atol=1e-6, rtol=0)
    a, b = (deep.question_states(q, 2)[-1] for q in ("is anyone at the door?", "how many objects are there?"))
    assert a.shape == (deep.hidden_size,) and not torch.allclose(a, b)
    torch.testing.assert_close(deep.question_states(QUESTION, 9), deep.question_states(QUESTION, LAYERS), atol=0, rtol=0)


def test_a_pruner_with_a_query_layer_ranks_by_the_questions_hidden_states(vlm):
    mem = _memory(vlm.hidden_size)
    seen = []
    rank = mem.pruner.rank_for_query

    def recording(snap, query_embeds, budget):
        seen.append(query_embeds)
        return rank(snap, query_embeds, budget)

    mem.pruner.rank_for_query = recording
    mem.pruner.query_layer = 1
    handler = QueryHandler(vlm, mem, QuerySettings(max_new_tokens=1, llm_budget=20))
    try:
        handler.ask(Question(QUESTION))
    finally:
        handler.close()
    torch.testing.assert_close(seen[0], vlm.question_states(QUESTION, 1), atol=0, rtol=0)


def test_qwen3_vl_refuses_a_schedule_and_llava_ov_runs_one(model_cache):
    q3 = load_model("tiny-random-qwen3-vl", cache=model_cache)
    with pytest.raises(ValueError, match="side features"):
        q3.check_layer_schedule(((1, 0.5),))
    with pytest.raises(ValueError, match="side features"):
        q3.generate(_prompt(q3), 2, layer_schedule=((1, 0.5),))
    q3.check_layer_schedule(())  # off is fine everywhere
    ov = load_model("tiny-random-llava-ov", cache=model_cache)
    prompt = _prompt(ov)
    ref = ov.forward(ov.new_cache(len(prompt)), prompt.inputs_embeds, prompt.position_ids, logits=True)
    ours = LayerPruned(ov, ((1, 1.0),)).prefill(ov.new_cache(len(prompt)), prompt)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    n0 = int((prompt.plan.visual >= 0).sum())
    assert ov.generate(prompt, 3, layer_schedule=((1, 0.5),)).stage_tokens == (n0, kept_count(0.5, n0))
