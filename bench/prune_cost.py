"""Benchmark 2: pruning cost per group at real shapes.

Random features shaped like Qwen2.5-VL-7B (a 448x448 frame pair = 16x16 tokens x 3584),
Qwen3-VL-8B (a 448x448 pair = 14x14 x 4096, each token carrying 3 deepstack vectors of 4096 that
the memory stores and evicts with it) and LLaVA-OV-7B (one 384x384 frame = 14x14 x 3584), with a
video's statistics (`common.video_like_features`), go into a `TokenMemory` with capacity 8192. Once the store is full (the pruner's `evict` has run), the
next groups are timed:
- add ms: `TokenMemory.add`'s own prune_ms (score + evict + moving the rows into and out of
  the preallocated store), what a group costs the ingest thread;
- pruner ms: the pruner's `score` + `evict` calls alone (`TimedPruner`);
and then a question's ranking as the full path runs it: `rank_for_query` on the memory in place
(`TokenMemory.frozen`) at budget 4096 with a 16-token question, and (timed apart) the copy of
the picked rows for the prompt; and how many operations the ranking dispatches (not views: each a
kernel launch on a GPU, `common.DispatchedOps`). 2 torch threads, float32 tokens (the pipeline's
default model dtype).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pruning import FrameTokens, TokenMemory

from .common import (DispatchedOps, Report, Stat, Table, Target, TimedPruner, finish, load_average, run_alone, set_threads,
                     variant, video_like_features)

VARIANTS = ("echoprune-3x3", "echoprune", "moprune", "hieravid", "forestprune", "dtd", "uniform", "recent", "random")
GOALS_MS = {"echoprune-3x3": 2.0, "moprune": 2.0, "dtd": 2.0, "echoprune": 10.0, "hieravid": 10.0, "forestprune": 10.0}


@dataclass(frozen=True)
class CostSettings:
    shapes: tuple[tuple[str, int, int, int, int], ...] = (  # name, H, W, D, deepstack vectors per token
        ("Qwen2.5-VL-7B", 16, 16, 3584, 0), ("Qwen3-VL-8B", 14, 14, 4096, 3), ("LLaVA-OV-7B", 14, 14, 3584, 0))
    variants: tuple[str, ...] = VARIANTS
    capacity: int = 8192
    recent_groups: int = 4
    measure_groups: int = 15
    max_fill_groups: int = 600
    query_budget: int = 4096
    query_tokens: int = 16
    rank_repeats: int = 5
    threads: int = 2

    @classmethod
    def quick(cls) -> "CostSettings":
        return cls(shapes=(("toy", 4, 4, 64, 0), ("toy-deepstack", 4, 4, 64, 3)), capacity=96, measure_groups=3, max_fill_groups=60, query_budget=48,
                   rank_repeats=2)


def measure(s: CostSettings, label: str, h: int, w: int, d: int, deepstack: int = 0) -> dict:
    """Fill a memory until its store is full, then time `measure_groups` adds and the queries;
    with `deepstack`, each token carries that many side vectors (Qwen3-VL)."""
    pruner = TimedPruner(variant(label).build())
    mem = TokenMemory(s.capacity, pruner, s.recent_groups)
    feats = video_like_features(h, w, d, s.max_fill_groups + s.measure_groups, seed=1)
    gen = torch.Generator().manual_seed(3)
    add_ms, own_ms, fed = [], [], 0
    for i, x in enumerate(feats):
        full = pruner.evictions > 0
        before = pruner.ms
        extras = {"deepstack": torch.randn(deepstack, h, w, d, generator=gen)} if deepstack else {}
        res = mem.add(FrameTokens(index=i, pts=float(i), tokens=x, extras=extras))
        fed = i + 1
        if full:
            add_ms.append(res.prune_ms)
            own_ms.append(pruner.ms - before)
            if len(add_ms) == s.measure_groups:
                break
        elif fed >= s.max_fill_groups:
            break
    gen.manual_seed(2)
    query = torch.randn(s.query_tokens, d, generator=gen)
    rank_ms, pick_ms = [], []
    for _ in range(s.rank_repeats if pruner.evictions else 0):
        with mem.frozen() as view:  # as a question's full path: rank in place, copy the picked rows
            t0 = time.perf_counter()
            rows = pruner.rank_for_query(view, query, s.query_budget)
            t1 = time.perf_counter()
            view.select(rows)
        rank_ms.append((t1 - t0) * 1e3)
        pick_ms.append((time.perf_counter() - t1) * 1e3)
    rank_ops = None
    if pruner.evictions:
        with mem.frozen() as view, DispatchedOps() as dispatched:
            pruner.rank_for_query(view, query, s.query_budget)
        rank_ops = dispatched.count
    return {"add_ms": add_ms, "pruner_ms": own_ms, "rank_ms": rank_ms, "pick_ms": pick_ms, "rank_ops": rank_ops,
            "groups_fed": fed,
            "held": len(mem),
            "full": bool(pruner.evictions)}


def _targets(shape: str, runs: dict[str, dict]) -> list[Target]:
    """A goal per pruner on `add` ms; a miss says how much is the pruner's own work and how much
    the memory's bookkeeping, which `recent` (whose decisions are free) shows alone."""
    base = Stat.of(runs["recent"]["add_ms"]).median if "recent" in runs else float("nan")
    out = []
    for label, goal in GOALS_MS.items():
        if label not in runs:
            continue
        add, own = Stat.of(runs[label]["add_ms"]), Stat.of(runs[label]["pruner_ms"])
        met = add.median <= goal
        why = "" if met else (f"score + evict alone take {own.median:.2f} ms; TokenMemory.add's bookkeeping adds "
                              f"{add.median - own.median:.2f} ms (`recent`, with free decisions, pays {base:.2f} ms "
                              "per add)")
        out.append(Target("prune_cost", f"{label} ({shape})", f"<= {goal:g} ms per group", f"{add.fmt(2)} ms", met,
                          why))
    return out


def run(s: CostSettings, out_dir: Path) -> Report:
    started, load0 = time.perf_counter(), load_average()
    set_threads(s.threads)
    report = Report("prune_cost", "Pruning cost per group at real shapes", s)
    report.notes.append(
        f"Capacity {s.capacity} + {s.recent_groups} dense recent groups; {s.measure_groups} groups timed after the "
        f"store is full; rank_for_query on the memory in place at budget {s.query_budget}, then the picked rows (and "
        f"their extras) copied out, as a question's full path does, {s.rank_repeats} repeats; {s.threads} torch "
        "threads; float32. Cells: median (min-max) in ms. `add` is what the ingest thread pays per group "
        "(TokenMemory.add: the pruner's score + evict and the memory's own bookkeeping of rows); `pruner` is "
        "score + evict alone.")
    raw = {}
    for shape, h, w, d, deepstack in s.shapes:
        extra = f" + {deepstack} deepstack vectors per token" if deepstack else ""
        t = Table(f"{shape}: {h}x{w} tokens x {d} per group{extra}",
                  ["pruner", "add ms", "pruner ms", "rank_for_query ms", "rank_for_query ops", "copy picked rows ms",
                   "groups to fill"])
        runs = {label: measure(s, label, h, w, d, deepstack) for label in s.variants}
        for label, m in runs.items():
            raw[f"{shape}/{label}"] = m
            fill = str(m["groups_fed"] - len(m["add_ms"])) if m["full"] else f"not full after {m['groups_fed']}"
            t.add(label, Stat.of(m["add_ms"]).fmt(2), Stat.of(m["pruner_ms"]).fmt(2), Stat.of(m["rank_ms"]).fmt(1),
                  m["rank_ops"] if m["rank_ops"] is not None else "n/a", Stat.of(m["pick_ms"]).fmt(1), fill)
        report.tables.append(t)
        report.targets += _targets(shape, runs)
    report.raw = raw
    return finish(report, out_dir, started, load0)


if __name__ == "__main__":
    run_alone(__doc__, run, CostSettings)
