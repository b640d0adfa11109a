"""Benchmark 3: memory over time.

One hour of stream (3600 groups, one per second at 2 fps) per pruner, each pruner in its own
fresh process so the resident set is its own: process RSS (/proc/self/statm) every 100 groups,
growth = the highest RSS after the first 300 groups minus RSS at group 300, and `len(memory)`
checked against its bound (capacity + recent groups x tokens per group) after every group.

The features are `common.video_like_features` at a small size (14x14 tokens x 256 dims,
capacity 4096) so the hour fits the time budget: the target is about growth, which any state
kept per group or per token would show (one group is 200 KB here, 3300 of them 650 MB), not
about absolute size, which scales with capacity x D.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from pruning import FrameTokens, TokenMemory

from .common import (ALL_PRUNERS, Report, Table, Target, cli, finish, load_average, quiet, rss_bytes, set_threads,
                     variant, video_like_features)
from .plot import Series, line_plot

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class MemorySettings:
    groups: int = 3600
    sample_every: int = 100
    warmup_groups: int = 300
    grid: tuple[int, int] = (14, 14)
    dim: int = 256
    capacity: int = 4096
    recent_groups: int = 4
    pruners: tuple[str, ...] = ALL_PRUNERS
    workers: int = 2
    growth_limit_mb: float = 50.0

    @classmethod
    def quick(cls) -> "MemorySettings":
        return cls(groups=60, sample_every=10, warmup_groups=20, grid=(4, 4), dim=32, capacity=64,
                   pruners=("echoprune", "recent"))


def measure(s: MemorySettings, label: str) -> dict:
    """In the worker process: feed `groups` groups, sample RSS and the memory's length."""
    set_threads(1)
    h, w = s.grid
    mem = TokenMemory(s.capacity, variant(label).build(), s.recent_groups)
    bound = s.capacity + s.recent_groups * h * w
    samples, over, most = [], 0, 0
    t0 = time.perf_counter()
    for i, x in enumerate(video_like_features(h, w, s.dim, s.groups, seed=3)):
        mem.add(FrameTokens(index=i, pts=float(i), tokens=x))
        held = len(mem)
        most = max(most, held)
        over += held > bound
        if (i + 1) % s.sample_every == 0:
            samples.append((i + 1, rss_bytes() / 2**20, held))
    return {"samples": samples, "bound": bound, "over_bound": over, "max_held": most, "held": len(mem),
            "ms_per_group": (time.perf_counter() - t0) * 1e3 / s.groups}


def _spawn(s: MemorySettings, label: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bench.memory_growth", "--worker", label, "--settings", json.dumps(asdict(s))]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory worker for {label} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(s: MemorySettings, out_dir: Path) -> Report:
    started, load0 = time.perf_counter(), load_average()
    with ThreadPoolExecutor(max(1, s.workers)) as pool:
        results = dict(zip(s.pruners, pool.map(lambda label: _spawn(s, label), s.pruners)))
    h, w = s.grid
    report = Report("memory_growth", "Memory over time", s)
    bound = s.capacity + s.recent_groups * h * w
    report.notes.append(
        f"{s.groups} groups per pruner ({s.groups / 60:g} min of stream at one group per second, 2 fps), each in a "
        f"fresh process, {h}x{w} tokens x {s.dim} dims (small D to fit the time budget: the target is growth, not "
        f"size), capacity {s.capacity} + {s.recent_groups} recent groups (bound {bound} tokens). RSS sampled every "
        f"{s.sample_every} groups; growth = max RSS after group {s.warmup_groups} - RSS at group {s.warmup_groups}.")
    t = Table("RSS and memory length over the stream", ["pruner", f"RSS @ {s.warmup_groups} MB", "RSS end MB",
                                                      "RSS range after MB", "growth MB", "len(memory) end / bound",
                                                      "groups over bound", "ms/group"])
    series = []
    for label, r in results.items():
        samples = r["samples"]
        base = next((mb for g, mb, _ in samples if g >= s.warmup_groups), samples[-1][1])
        after = [mb for g, mb, _ in samples if g >= s.warmup_groups]
        growth = max(after) - base
        t.add(label, f"{base:.1f}", f"{samples[-1][1]:.1f}", f"{min(after):.1f}-{max(after):.1f}", f"{growth:.1f}",
              f"{r['held']} / {r['bound']}", r["over_bound"], f"{r['ms_per_group']:.2f}")
        bounded = r["over_bound"] == 0
        met = growth <= s.growth_limit_mb and bounded
        why = "" if met else "; ".join(
            x for x in (f"RSS grew {growth:.1f} MB after group {s.warmup_groups}" if growth > s.growth_limit_mb else "",
                        f"len(memory) exceeded its bound after {r['over_bound']} groups" if not bounded else "") if x)
        report.targets.append(Target("memory_growth", label, f"growth <= {s.growth_limit_mb:g} MB, len <= bound",
                                     f"{growth:.1f} MB, max len {r['max_held']} / {r['bound']}", met, why))
        series.append(Series(label, [g for g, _, _ in samples], [mb for _, mb, _ in samples]))
    report.tables.append(t)
    plot = line_plot(out_dir / "memory_growth.png", series,
                     f"Process RSS over {s.groups} groups of stream (one process per pruner)", "groups ingested",
                     "RSS, MB", ylim=(0.0, max(mb for x in series for mb in x.y) + 2 * s.growth_limit_mb))
    report.plots.append(plot.name)
    report.raw = results
    return finish(report, out_dir, started, load0)


def main() -> None:
    p = cli(__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    args = p.parse_args()
    quiet()
    if args.worker:
        raw = json.loads(args.settings)
        s = MemorySettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        print(json.dumps(measure(s, args.worker)))
        return
    run(MemorySettings.quick() if args.quick else MemorySettings(), args.out)


if __name__ == "__main__":
    main()
