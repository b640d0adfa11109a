"""Benchmark 4: time to first token, dense vs pruned.

The same span of a synthetic stream is encoded once per model and held by a dense memory and
by pruned memories holding 50%, 25% and 10% of its tokens (the pipeline's default pruner,
no dense recent window, so each holds exactly its share). Each memory answers the same question
through the real `QueryHandler` with its prompt cache off (snapshot, `rank_for_query`, prompt
with M-RoPE positions, a prefill of the whole prompt: what pruning saves; bench/prompt_cache.py
measures the cache) with one new token, so:
- prefill s: the answer's `ttft_s`, from the LLM thread taking the question to the first token
  (snapshot, ranking, prompt and prefill);
- TTFT: the whole `ask` up to the first token (the hand-over to the LLM thread included);
- speed-up: dense TTFT / pruned TTFT, paired within each repeat.
Models: the tiny random Qwen2.5-VL, and a random-init LLM the size of Qwen2-0.5B (hidden 896,
24 layers, 14 heads, 2 KV heads, intermediate 4864, vocabulary 151936) built from config
behind a tiny vision tower, with the tiny tokenizer. It runs in bf16 unless this CPU's bf16
matmul is slower than float32 (no AVX512-BF16/AMX: then bf16 is emulated), in which case float32
is used and the probe's figures are reported.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import pruning
from pruning import FrameTokens, TokenMemory
from stream.events import Question
from stream.query import QueryHandler, QuerySettings
from stream.sources.synthetic import SyntheticSource
from stream.vlm.base import VideoLM
from stream.vlm.qwen2_5_vl import Qwen2_5_VL
from stream.vlm.registry import load_model

from .common import Report, Stat, Table, Target, finish, load_average, run_alone, set_threads


@dataclass(frozen=True)
class LLMSize:
    label: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


QWEN2_05B = LLMSize("random-init Qwen2-0.5B size", 896, 24, 14, 2, 4864, 151936)


@dataclass(frozen=True)
class TTFTSettings:
    span_groups: int = 8
    fps: float = 2.0
    width: int = 640
    height: int = 480
    max_pixels: int = 448 * 448
    fractions: tuple[float, ...] = (0.5, 0.25, 0.10)
    pruner: str = "echoprune"
    recent_groups: int = 0  # so a pruned memory holds exactly its share (one group is 12.5% of the span)
    repeats: int = 3
    big: LLMSize | None = QWEN2_05B
    dtype: str = "auto"
    question: str = "What happened in the video, and when?"
    threads: int = 2
    seed: int = 0
    speedup_goal: float = 3.0

    @classmethod
    def quick(cls) -> "TTFTSettings":
        return cls(span_groups=4, max_pixels=224 * 224, repeats=2,
                   big=LLMSize("toy LLM", 128, 2, 4, 2, 256, 1024))


def pick_dtype(requested: str) -> tuple[torch.dtype, str]:
    """bf16 unless this CPU multiplies bf16 slower than float32; the probe's figures say why."""
    if requested != "auto":
        return {"bfloat16": torch.bfloat16, "float32": torch.float32}[requested], f"{requested} as requested"
    ms = {}
    for dt in (torch.float32, torch.bfloat16):
        a, b = torch.randn(256, 896, dtype=dt), torch.randn(896, 896, dtype=dt)
        a @ b
        t0 = time.perf_counter()
        a @ b
        ms[dt] = (time.perf_counter() - t0) * 1e3
    cap = torch.backends.cpu.get_cpu_capability()
    probe = (f"a 256x896x896 matmul takes {ms[torch.bfloat16]:.1f} ms in bf16, {ms[torch.float32]:.1f} ms in "
             f"float32 ({cap})")
    if ms[torch.bfloat16] <= ms[torch.float32]:
        return torch.bfloat16, f"bfloat16: {probe}"
    return torch.float32, f"float32, not bf16: {probe}; this CPU has no native bf16 matmul"


TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1], tokens_per_second=2)


def build_sized(size: LLMSize, dtype: torch.dtype, max_pixels: int, vision: dict | None = None) -> Qwen2_5_VL:
    """A random-init Qwen2.5-VL whose LLM has `size`, behind the tiny vision tower or the one
    `vision` describes (its projector emitting `size.hidden`), with the tiny in-process tokenizer."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from stream.vlm.qwen2_5_vl.tiny import SPECIAL_TOKENS, build_tokenizer

    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = size.hidden // size.heads
    hw = (head_dim // 2 - head_dim // 8) // 2  # Qwen2.5-VL's split: 1/4 time, 3/8 rows, 3/8 cols
    special = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    text = dict(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                max_position_embeddings=32768, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [head_dim // 2 - 2 * hw, hw, hw]}, **special)
    vision = {**(vision or TINY_VISION), "out_hidden_size": size.hidden}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True, **special)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    return Qwen2_5_VL(model, tokenizer, name=size.label, random_weights=True, max_pixels=max_pixels)


def memories(s: TTFTSettings, vlm: VideoLM) -> dict[str, TokenMemory]:
    """The span encoded once, held densely and at each fraction."""
    tp = vlm.group_size
    src = SyntheticSource(duration_s=max(1.0, s.span_groups * tp / s.fps), fps=s.fps, seed=s.seed, width=s.width,
                          height=s.height)
    frames = [src.render(k / s.fps) for k in range(s.span_groups * tp)]
    grids = vlm.encode([frames[i:i + tp] for i in range(0, len(frames), tp)])
    h, w = grids[0].shape[:2]
    dense = len(grids) * h * w
    mems = {"dense": TokenMemory(dense, pruning.get_pruner("recent"), s.recent_groups)}
    for f in s.fractions:
        cap = max(0, math.floor(f * dense) - s.recent_groups * h * w)
        mems[f"{100 * f:g}%"] = TokenMemory(cap, pruning.get_pruner(s.pruner), s.recent_groups)
    for g, grid in enumerate(grids):
        for mem in mems.values():
            mem.add(FrameTokens(index=g, pts=g * tp / s.fps, tokens=grid))
    return mems


def time_model(s: TTFTSettings, vlm: VideoLM) -> dict[str, dict]:
    """Per memory: tokens, and per repeat prefill and TTFT (memories interleaved per repeat)."""
    mems = memories(s, vlm)
    handlers = {k: QueryHandler(vlm, m, QuerySettings(max_new_tokens=1, prompt_cache=False)) for k, m in mems.items()}
    out = {k: {"visual_tokens": 0, "prompt_tokens": 0, "prefill_s": [], "ttft_s": []} for k in mems}
    try:
        question = Question(s.question)
        handlers[list(mems)[-1]].ask(question)
        for _ in range(s.repeats):
            for k, hq in handlers.items():
                t0 = time.perf_counter()
                a = hq.ask(question)
                wall = time.perf_counter() - t0
                out[k]["visual_tokens"], out[k]["prompt_tokens"] = a.tokens_used, a.prompt_tokens
                out[k]["prefill_s"].append(a.ttft_s)
                out[k]["ttft_s"].append(wall - (a.total_s - a.ttft_s))
    finally:
        for hq in handlers.values():
            hq.close()
    return out


def _why(dense: dict, pruned: dict) -> str:
    """Where a missed speed-up went: the fixed text in the prompt, prefill's own fixed cost, and
    the hand-over to the LLM thread, which do not shrink with the memory."""
    p0, p1 = Stat.of(dense["prefill_s"]).median, Stat.of(pruned["prefill_s"]).median
    outside = Stat.of([t - p for t, p in zip(pruned["ttft_s"], pruned["prefill_s"])]).median
    return (f"the prompt shrinks {dense['prompt_tokens'] / max(1, pruned['prompt_tokens']):.1f}x "
            f"({dense['prompt_tokens']} -> {pruned['prompt_tokens']} tokens; the text is fixed), prefill "
            f"{1e3 * p0:.1f} -> {1e3 * p1:.1f} ms ({p0 / p1:.1f}x; snapshot, ranking and prompt included), plus "
            f"{1e3 * outside:.1f} ms per question handing it to the LLM thread, which does not shrink")


def run(s: TTFTSettings, out_dir: Path) -> Report:
    started, load0 = time.perf_counter(), load_average()
    set_threads(s.threads)
    report = Report("ttft", "Time to first token, dense vs pruned", s)
    models = [("tiny random Qwen2.5-VL (float32)", lambda: load_model("tiny-random", max_pixels=s.max_pixels))]
    if s.big is not None:
        dtype, why = pick_dtype(s.dtype)
        report.notes.append(f"Dtype of the {s.big.label} LLM: {why}.")
        models.append((f"{s.big.label} ({str(dtype).removeprefix('torch.')})",
                       lambda: build_sized(s.big, dtype, s.max_pixels)))
    report.notes.append(
        f"Span: {s.span_groups} groups ({s.span_groups * 2 / s.fps:g} s at {s.fps:g} fps, {s.width}x{s.height}, "
        f"max_pixels {s.max_pixels}); pruned memories by {s.pruner} with {s.recent_groups} dense recent group(s); "
        f"one new token; {s.repeats} repeats after a warm-up, memories interleaved; {s.threads} torch threads. "
        "Cells: median (min-max) seconds.")
    raw = {}
    for name, load in models:
        t0 = time.perf_counter()
        vlm = load()
        build_s = time.perf_counter() - t0
        res = time_model(s, vlm)
        del vlm
        raw[name] = {"build_s": build_s, **res}
        dense = res["dense"]["ttft_s"]
        t = Table(f"{name} (built in {build_s:.0f} s)", ["memory", "visual tokens", "prompt tokens", "prefill s",
                                                         "TTFT s", "speed-up vs dense"])
        for k, r in res.items():
            speed = Stat.of([d / p for d, p in zip(dense, r["ttft_s"])])
            t.add(k, r["visual_tokens"], r["prompt_tokens"], Stat.of(r["prefill_s"]).fmt(3),
                  Stat.of(r["ttft_s"]).fmt(3), "1" if k == "dense" else speed.fmt(2) + "x")
            if k == "25%":
                met = speed.median >= s.speedup_goal
                why = "" if met else _why(res["dense"], r)
                report.targets.append(Target("ttft", f"{name} @ 25%", f">= {s.speedup_goal:g}x sooner than dense",
                                             f"{speed.fmt(2)}x (TTFT {Stat.of(dense).median:.3f} s -> "
                                             f"{Stat.of(r['ttft_s']).median:.3f} s)", met, why))
        report.tables.append(t)
    report.raw = raw
    return finish(report, out_dir, started, load0)


if __name__ == "__main__":
    run_alone(__doc__, run, TTFTSettings)
