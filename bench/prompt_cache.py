"""Benchmark 6: the prompt cache: time to first token against memory size, and what keeping the
cache current costs per group.

TTFT: one memory (pruner `recent`, room for every group) grows through 1k, 4k, 8k and 16k visual
tokens of random 16x16 groups at the LLM's hidden size (no encoding: only the LLM matters), and
at each size one question (one new token) is asked through the real `QueryHandler`:
- one group behind: the newest group arrived after the cache was last brought current, so the
  question prefills it too (the cache is cut back to the previous layout between repeats with
  `PromptCache.sync`);
- cache current: after `cache.refresh`, the question prefills only itself;
- without the cache: the whole prompt is prefilled for the question (`prompt_cache=False`).
The same cut-back times the background refresh that appends one group at each size. Between
sizes an uncounted question brings the cache current: it prefills in the question path's
1024-token chunks, where the background refresh's chunks are sized to 0.25 s (64 tokens at this
size on this CPU), which would double the benchmark's time.

Background cost per group: a stream of video-like groups (`common.video_like_features`) through
a `TokenMemory` with EchoPrune, capacity 4096 and 4 recent groups, the cache refreshed after
every group. An eviction changes rows early in the prompt and the cache re-prefills from the
first changed row, so the eviction slack (evict down to capacity - slack) sets how often that
happens. Token counts depend on the pruner's decisions, not on the LLM, so they come from the
tiny model; milliseconds come from the Qwen2-0.5B-size LLM on a shorter stream. Only whole
eviction cycles after the store first filled are counted, so amortized figures are not biased
by where the stream stops.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import pruning
from pruning import FrameTokens, TokenMemory
from stream.events import Question
from stream.prompt_cache import PromptCache
from stream.query import QueryHandler, QuerySettings
from stream.vlm.base import LayoutSettings, VideoLM
from stream.vlm.registry import load_model

from .common import (Report, Stat, Table, Target, TimedPruner, finish, load_average, run_alone, set_threads,
                     video_like_features)
from .ttft import QWEN2_05B, LLMSize, build_sized, pick_dtype


@dataclass(frozen=True)
class PromptCacheSettings:
    sizes: tuple[int, ...] = (1024, 4096, 8192, 16384)
    grid: tuple[int, int] = (16, 16)
    big: LLMSize = QWEN2_05B
    dtype: str = "float32"
    cached_repeats: int = 5
    behind_repeats: int = 3  # also the repeats of 'append one group'
    uncached_repeats: tuple[int, ...] = (3, 2, 1, 1)  # per size: a 16k prefill takes minutes on this CPU
    question: str = "What happened in the video, and when?"
    ratio_at: int = 8192
    ratio_goal: float = 8.0
    flat_goal: float = 2.0
    capacity: int = 4096
    recent_groups: int = 4
    pruner: str = "echoprune"
    slacks: tuple[float, ...] = (0.0, 0.125, 0.25, 0.5)
    default_slack: float = 0.25
    other_pruners: tuple[str, ...] = ("hieravid", "forestprune")
    stream_groups: int = 160
    big_cycles: int = 2  # eviction cycles timed on the big LLM after its store fills
    threads: int = 2
    seed: int = 0

    @classmethod
    def quick(cls) -> "PromptCacheSettings":
        return cls(sizes=(32, 64, 128), grid=(4, 4), big=LLMSize("toy", 128, 2, 4, 2, 256, 1024),
                   cached_repeats=2, behind_repeats=2, uncached_repeats=(2, 1, 1), ratio_at=64, capacity=64, recent_groups=1,
                   stream_groups=24, big_cycles=1)


def _sync(vlm: VideoLM) -> None:
    """Wait for queued GPU work, so wall time covers prefills that return no logits."""
    if vlm.device.type == "cuda":
        torch.cuda.synchronize(vlm.device)


def _never() -> bool:
    return False


def ttft_sweep(vlm: VideoLM, sizes: Sequence[int], grid: tuple[int, int], question: str, cached_repeats: int,
               behind_repeats: int, uncached_repeats: Sequence[int], seed: int = 0) -> dict[int, dict]:
    """Per memory size (visual tokens, a multiple of the group's): prompt and prefilled tokens,
    TTFT with the cache current, one group behind and off, the background ms to append one
    group, and the question's planning ms (layout, plan, keys) outside the LLM."""
    h, w = grid
    gt = h * w
    mem = TokenMemory(max(sizes), pruning.get_pruner("recent"), recent_groups=4, device=vlm.device)
    cached = QueryHandler(vlm, mem, QuerySettings(max_new_tokens=1))
    full = QueryHandler(vlm, mem, QuerySettings(max_new_tokens=1, prompt_cache=False))
    cache = cached.cache
    q = Question(question, max_new_tokens=1)
    gen = torch.Generator().manual_seed(seed)
    added = 0

    def add_group() -> None:
        nonlocal added
        mem.add(FrameTokens(index=added, pts=float(added), tokens=torch.randn(h, w, vlm.hidden_size, generator=gen)))
        added += 1

    out: dict[int, dict] = {}
    try:
        for i, n in enumerate(sizes):
            while len(mem) < n - gt:
                add_group()
            cached.ask(q)  # the cache current (and at the first size, the cached path warmed up): not counted
            if i == 0:
                full.ask(q)  # warm-up, not counted
            before = mem.layout()
            behind = vlm.plan(before, "", cache.layout)
            add_group()
            r = {"visual_tokens": len(mem), "behind_s": [], "cached_s": [], "full_s": [], "append_ms": [],
                 "plan_ms": []}
            for _ in range(behind_repeats):
                a = cached.ask(q)
                r["behind_s"].append(a.ttft_s)
                r["behind_prefilled"], r["behind_path"] = a.prefilled_tokens, a.prompt_path
                cache.sync(behind, before.stamp)
            for k in range(behind_repeats):
                if k:
                    cache.sync(behind, before.stamp)
                t0 = time.perf_counter()
                cache.refresh(_never)
                _sync(vlm)
                r["append_ms"].append((time.perf_counter() - t0) * 1e3)
            for _ in range(cached_repeats):
                a = cached.ask(q)
                r["cached_s"].append(a.ttft_s)
                r["prompt_tokens"], r["cached_prefilled"], r["cached_path"] = (a.prompt_tokens, a.prefilled_tokens,
                                                                              a.prompt_path)
                t0 = time.perf_counter()
                lay = mem.layout()
                vlm.plan(lay, question, cache.layout).key(lay.stamp)
                r["plan_ms"].append((time.perf_counter() - t0) * 1e3)
            for _ in range(uncached_repeats[i]):
                a = full.ask(q)
                r["full_s"].append(a.ttft_s)
                r["full_prefilled"], r["full_path"] = a.prefilled_tokens, a.prompt_path
            out[n] = r
    finally:
        cached.close()
        full.close()
    return out


def stream_cost(vlm: VideoLM, pruner: str, capacity: int, slack: float, recent_groups: int, grid: tuple[int, int],
                max_groups: int, cycles: int | None = None, seed: int = 0) -> dict:
    """Groups through a memory whose prompt cache is refreshed after each one; per group the
    tokens appended and re-prefilled, rewinds and ms. `steady` holds the whole eviction cycles
    after the store first filled (stopping after `cycles` of them when given)."""
    h, w = grid
    timed = TimedPruner(pruning.get_pruner(pruner))
    mem = TokenMemory(capacity, timed, recent_groups, evict_slack=int(slack * capacity), device=vlm.device)
    cache = PromptCache(vlm, mem, LayoutSettings())
    st = cache.stats
    groups: list[dict] = []
    starts: list[int] = []  # indices in `groups` of the groups whose add evicted
    for g, x in enumerate(video_like_features(h, w, vlm.hidden_size, max_groups, seed=seed)):
        evictions = timed.evictions
        mem.add(FrameTokens(index=g, pts=float(g), tokens=x))
        if timed.evictions > evictions:
            starts.append(len(groups))
            if cycles is not None and len(starts) > cycles:
                break
        appended, again, rewinds = st.appended_tokens, st.reprefilled_tokens, st.rewinds
        t0 = time.perf_counter()
        cache.refresh(_never)
        _sync(vlm)
        groups.append({"ms": (time.perf_counter() - t0) * 1e3, "appended": st.appended_tokens - appended,
                       "reprefilled": st.reprefilled_tokens - again, "rewinds": st.rewinds - rewinds,
                       "evicted": bool(starts) and starts[-1] == len(groups), "prefix": cache.held})
    steady = groups[starts[0]:starts[-1]] if len(starts) > 1 else []
    return {"groups": groups, "steady": steady, "eviction_starts": starts, "cycles": max(0, len(starts) - 1),
            "kv_bytes": cache.nbytes()}


def per_group(run: dict) -> dict:
    """Steady-state means per group, and what a rewind costs."""
    st = run["steady"]
    n = max(1, len(st))
    rewinds = [g for g in st if g["rewinds"]]
    prefix = Stat.of([g["prefix"] for g in st]).median
    again = [g["reprefilled"] for g in rewinds]
    return {
        "groups": len(st), "cycles": run["cycles"], "evict_every": len(st) / max(1, run["cycles"]),
        "appended": sum(g["appended"] for g in st) / n, "reprefilled": sum(g["reprefilled"] for g in st) / n,
        "rewinds": len(rewinds) / n, "per_rewind": Stat.of(again), "prefix": prefix,
        "ms_mean": sum(g["ms"] for g in st) / n, "append_ms": Stat.of([g["ms"] for g in st if not g["rewinds"]]),
        "rewind_ms": Stat.of([g["ms"] for g in rewinds]),
    }


def _ttft_table(s: PromptCacheSettings, label: str, res: dict[int, dict]) -> Table:
    t = Table(f"TTFT against memory size, {label}", [
        "visual tokens", "prompt tokens", "prefilled: cached / behind / no cache", "TTFT cached s",
        "TTFT one group behind s", "TTFT no cache s (repeats)", "no cache / cached", "append one group s",
        "plan + keys ms"])
    for n, r in res.items():
        c, b, f = (Stat.of(r[k]) for k in ("cached_s", "behind_s", "full_s"))
        t.add(r["visual_tokens"], r["prompt_tokens"],
              f"{r['cached_prefilled']} / {r['behind_prefilled']} / {r['full_prefilled']}", c.fmt(3), b.fmt(3),
              f"{f.fmt(2)} ({f.n})", f"{f.median / c.median:.0f}x", Stat.of([x / 1e3 for x in r["append_ms"]]).fmt(3),
              Stat.of(r["plan_ms"]).fmt(1))
    return t


def gflop(size: LLMSize, new: int, held: int) -> tuple[float, float]:
    """Work of prefilling `new` tokens onto `held` cached ones: GFLOP in the layers' weight
    matmuls and in attention (QK and PV, each new token over everything before it)."""
    hd = size.hidden // size.heads
    per_layer = size.hidden * (2 * size.hidden + 2 * size.kv_heads * hd) + 3 * size.hidden * size.intermediate
    weights = 2 * new * per_layer * size.layers
    attention = 4 * new * (held + (new + 1) / 2) * hd * size.heads * size.layers
    return weights / 1e9, attention / 1e9


def _work(size: LLMSize, r: dict, seconds: float, key: str) -> str:
    w, a = gflop(size, r[key], r["prompt_tokens"] - r[key])
    return f"{w:.0f} GFLOP in weights + {a:.0f} in attention at {(w + a) / seconds:.0f} GFLOP/s"


def _ttft_targets(s: PromptCacheSettings, label: str, res: dict[int, dict]) -> list[Target]:
    """At `ratio_at` the cached answer starts `ratio_goal` times sooner; the cached TTFT stays
    within `flat_goal` from the smallest to the largest memory. A miss says where the work and
    the time went (work from the LLM's shape, speed from the measured TTFT)."""
    out = []
    r = res[s.ratio_at]
    c, f = Stat.of(r["cached_s"]).median, Stat.of(r["full_s"]).median
    met = f / c >= s.ratio_goal
    why = "" if met else (f"the question prefills {r['cached_prefilled']} tokens over {r['prompt_tokens']} "
                          f"({_work(s.big, r, c, 'cached_prefilled')}; without the cache "
                          f"{_work(s.big, r, f, 'full_prefilled')})")
    out.append(Target("prompt_cache", f"{label} @ {s.ratio_at} visual tokens", f"cached TTFT <= 1/{s.ratio_goal:g} "
                      "of uncached", f"{1e3 * c:.1f} ms vs {f:.2f} s ({f / c:.0f}x)", met, why))
    lo, hi = res[min(res)], res[max(res)]
    c0, c1 = Stat.of(lo["cached_s"]).median, Stat.of(hi["cached_s"]).median
    met = c1 / c0 <= s.flat_goal
    why = "" if met else (
        f"the question's {hi['cached_prefilled']} tokens attend over {hi['prompt_tokens'] - hi['cached_prefilled']} "
        f"held tokens instead of {lo['prompt_tokens'] - lo['cached_prefilled']}: "
        f"{_work(s.big, lo, c0, 'cached_prefilled')} at {min(res)}, {_work(s.big, hi, c1, 'cached_prefilled')} at "
        f"{max(res)}; planning (layout, plan, keys) {Stat.of(lo['plan_ms']).median:.1f} -> "
        f"{Stat.of(hi['plan_ms']).median:.1f} ms")
    out.append(Target("prompt_cache", f"{label}: cached TTFT {min(res)} -> {max(res)} visual tokens",
                      f"within {s.flat_goal:g}x", f"{1e3 * c0:.1f} -> {1e3 * c1:.1f} ms ({c1 / c0:.2f}x)", met, why))
    return out


def _slack_table(s: PromptCacheSettings, runs: dict[tuple[str, float], dict]) -> Table:
    t = Table(f"Tokens prefilled per group to keep the cache current (tiny model, capacity {s.capacity}, "
              f"{s.grid[0] * s.grid[1]}-token groups)",
              ["pruner", "slack", "groups (cycles)", "evicts every (groups)", "appended / group",
               "re-prefilled / group", "rewinds / group", "re-prefilled per rewind", "prefix tokens"])
    for (pruner, slack), m in runs.items():
        t.add(pruner, f"{slack:g} ({int(slack * s.capacity)})", f"{m['groups']} ({m['cycles']})",
              f"{m['evict_every']:.1f}", f"{m['appended']:.0f}", f"{m['reprefilled']:.0f}", f"{m['rewinds']:.2f}",
              m["per_rewind"].fmt(0), f"{m['prefix']:.0f}")
    return t


def run(s: PromptCacheSettings, out_dir: Path) -> Report:
    started, load0 = time.perf_counter(), load_average()
    set_threads(s.threads)
    report = Report("prompt_cache", "Prompt cache: TTFT against memory size, and its cost per group", s)
    dtype, why = pick_dtype(s.dtype)
    name = f"{s.big.label} LLM ({str(dtype).removeprefix('torch.')})"
    report.notes.append(
        f"TTFT: the {name} behind the tiny vision tower; {s.grid[0]}x{s.grid[1]} random groups at its hidden size in "
        f"one memory (pruner `recent`) grown through the sizes; one new token; {s.cached_repeats} repeats with the "
        f"cache current, {s.behind_repeats} one group behind (and of the background append), "
        f"{', '.join(map(str, s.uncached_repeats))} without the cache at "
        f"{', '.join(map(str, s.sizes))} visual tokens (a full prefill of the largest takes minutes here); a warm-up "
        f"of each path first; {s.threads} torch threads; dtype {why}. TTFT runs from the handler taking the question "
        "to the first token; 'append one group' is the background refresh that brings a cache one group behind "
        "current; 'plan + keys' is the question's layout, plan and cache keys, outside the LLM.")
    raw: dict = {}
    t0 = time.perf_counter()
    vlm = build_sized(s.big, dtype, 448 * 448)
    raw["build_s"] = time.perf_counter() - t0
    res = ttft_sweep(vlm, s.sizes, s.grid, s.question, s.cached_repeats, s.behind_repeats, s.uncached_repeats,
                     s.seed)
    raw["ttft"] = res
    report.tables.append(_ttft_table(s, name, res))
    report.targets += _ttft_targets(s, s.big.label, res)

    big = stream_cost(vlm, s.pruner, s.capacity, s.default_slack, s.recent_groups, s.grid, s.stream_groups,
                      cycles=s.big_cycles, seed=s.seed)
    del vlm
    raw["big_stream"] = big
    tiny = load_model("tiny-random")
    runs = {(s.pruner, slack): per_group(stream_cost(tiny, s.pruner, s.capacity, slack, s.recent_groups, s.grid,
                                                     s.stream_groups, seed=s.seed))
            for slack in s.slacks}
    for p in s.other_pruners:
        runs[(p, s.default_slack)] = per_group(stream_cost(tiny, p, s.capacity, s.default_slack, s.recent_groups,
                                                           s.grid, s.stream_groups, seed=s.seed))
    raw["tiny_streams"] = {f"{p}@{slack:g}": {k: (v.__dict__ if isinstance(v, Stat) else v) for k, v in m.items()}
                           for (p, slack), m in runs.items()}
    report.tables.append(_slack_table(s, runs))

    m = per_group(big)
    t = Table(f"Background ms per group, {name}, {s.pruner}, slack {s.default_slack:g}, capacity {s.capacity}",
              ["groups timed (cycles)", "appended / group", "re-prefilled / group", "re-prefilled per rewind",
               "prefix tokens", "append-only group ms", "group with a rewind ms", "amortized ms / group",
               "KV cache MiB"])
    t.add(f"{m['groups']} ({m['cycles']})", f"{m['appended']:.0f}", f"{m['reprefilled']:.0f}", m["per_rewind"].fmt(0),
          f"{m['prefix']:.0f}", m["append_ms"].fmt(0), m["rewind_ms"].fmt(0), f"{m['ms_mean']:.0f}",
          f"{big['kv_bytes'] / 2**20:.0f}")
    report.tables.append(t)
    fill = big["eviction_starts"][0] if big["eviction_starts"] else len(big["groups"])
    report.notes.append(
        f"Background cost: video-like groups (a tenth of positions moving, a cut every 60 groups), {s.recent_groups} "
        f"recent groups, the cache refreshed after every group. Token counts: {s.stream_groups} groups on the tiny "
        f"model, of which the whole eviction cycles after the store first filled are counted. Milliseconds: the "
        f"{name} on a shorter stream: {fill} groups to fill the store, then {s.big_cycles} eviction cycles timed. "
        "A rewind cuts the cache back to the first changed row; 're-prefilled per rewind' is median (min-max) tokens.")
    report.raw = raw
    return finish(report, out_dir, started, load0)


if __name__ == "__main__":
    run_alone(__doc__, run, PromptCacheSettings)
