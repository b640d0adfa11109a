"""The prompt cache at Qwen2.5-VL-7B shapes on a GPU, printed as one markdown table.

`python -m bench.prompt_cache_device [--size 7b|tiny] [--device cuda|cpu]` measures what
`bench.prompt_cache` measures on this project's CPU, where a 7B LLM is out of reach: TTFT with and
without the prompt cache at 1k-32k visual tokens, and the cache's background ms per group. The LLM
is random-init from Qwen2.5-VL-7B's published config (text hidden 3584, 28 layers, 28 heads, 4 KV
heads, intermediate 18944, vocabulary 152064, rope theta 1e6, mrope_section [16, 24, 24]; built
by `ttft.build_sized`, which ties the embeddings: same compute, 1 GiB less) behind the tiny vision
tower, in bf16 on cuda; nothing is downloaded. GPU timings wait for the device (a prefill without
logits returns before its kernels finish). `--size tiny` is a toy LLM at toy sizes for a CPU
smoke test. Nothing imported here may import PyAV: GPU images do not have it.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .common import Stat, Table, quiet
from .prompt_cache import per_group, stream_cost, ttft_sweep
from .ttft import LLMSize, build_sized

QWEN25_VL_7B = LLMSize("random-init Qwen2.5-VL-7B size", 3584, 28, 28, 4, 18944, 152064)
QUESTION = "What happened in the video, and when?"
PRUNER = "echoprune"
SLACK = 0.25
RECENT_GROUPS = 4


@dataclass(frozen=True)
class DeviceSize:
    llm: LLMSize
    sizes: tuple[int, ...]  # visual tokens in the memory, multiples of the group's
    grid: tuple[int, int]
    capacity: int  # of the evicting memory for the background cost
    cached_repeats: int
    uncached_repeats: int
    cycles: int  # eviction cycles timed once the store is full
    max_groups: int


SIZES = {
    "7b": DeviceSize(QWEN25_VL_7B, (1024, 4096, 8192, 16384, 32768), (16, 16), 8192, 5, 3, 3, 200),
    "tiny": DeviceSize(LLMSize("toy", 128, 2, 4, 2, 256, 1024), (32, 64, 128), (4, 4), 64, 2, 1, 1, 40),
}


def measure(size: DeviceSize, device: str) -> Table:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):  # random init on the device: 7B in float32 would not fit a small host
        vlm = build_sized(size.llm, dtype, 448 * 448)
    where = torch.cuda.get_device_name(vlm.device) if vlm.device.type == "cuda" else "CPU"
    res = ttft_sweep(vlm, size.sizes, size.grid, QUESTION, size.cached_repeats, size.cached_repeats,
                     [size.uncached_repeats] * len(size.sizes))
    stream = stream_cost(vlm, PRUNER, size.capacity, SLACK, RECENT_GROUPS, size.grid, size.max_groups,
                         cycles=size.cycles)
    gt = size.grid[0] * size.grid[1]
    t = Table(f"Prompt cache, {size.llm.label} LLM, {str(dtype).removeprefix('torch.')} on {where}: "
              f"median (min-max) ms; {size.cached_repeats} repeats with the cache, {size.uncached_repeats} without",
              ["measure", "visual tokens", "prompt tokens", "prefilled tokens", "ms"])
    for n, r in res.items():
        ms = {k: Stat.of([1e3 * x for x in r[k]]).fmt(1) for k in ("full_s", "cached_s", "behind_s")}
        t.add("TTFT, no cache", n, r["prompt_tokens"], r["full_prefilled"], ms["full_s"])
        t.add("TTFT, cache current", n, r["prompt_tokens"], r["cached_prefilled"], ms["cached_s"])
        t.add("TTFT, cache one group behind", n, r["prompt_tokens"], r["behind_prefilled"], ms["behind_s"])
        t.add(f"background: append one {gt}-token group", n, "", gt, Stat.of(r["append_ms"]).fmt(1))
        t.add("a question outside the LLM, cache current (layout, plan, keys)", n, "", "", Stat.of(r["plan_ms"]).fmt(2))
    m = per_group(stream)
    label = f"background per group, {PRUNER}, slack {SLACK:g}, capacity {size.capacity}"
    t.add(f"{label}: amortized over {m['groups']} groups ({m['cycles']} eviction cycles)", f"{m['prefix']:.0f}", "",
          f"{m['appended'] + m['reprefilled']:.0f}", f"{m['ms_mean']:.1f}")
    t.add(f"{label}: a group with a rewind", "", "", m["per_rewind"].fmt(0), m["rewind_ms"].fmt(1))
    t.add(f"{label}: an append-only group", "", "", "", m["append_ms"].fmt(1))
    return t


def main(argv: Sequence[str] | None = None) -> Table:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="7b")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = p.parse_args(argv)
    quiet()
    table = measure(SIZES[args.size], args.device)
    print(table.markdown(), flush=True)
    return table


if __name__ == "__main__":
    main()
