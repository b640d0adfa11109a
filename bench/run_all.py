"""Run every benchmark and write bench/results/: one .md per benchmark, the PNG plots,
raw/*.json, and summary.md with every performance goal of docs/DESIGN.md met or missed.

The timing-sensitive benchmarks (cost, TTFT, prompt cache, ingest, ingest scaling) run first and alone; recall and memory
growth then use two worker processes. Missed targets are reported, not turned into a failure.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import ingest, ingest_scale, memory_growth, prompt_cache, prune_cost, recall, ttft
from .common import RESULTS, Report, Target, machine, quiet, set_threads, targets_table

BENCHMARKS = {
    "prune_cost": (prune_cost.run, prune_cost.CostSettings),
    "ttft": (ttft.run, ttft.TTFTSettings),
    "prompt_cache": (prompt_cache.run, prompt_cache.PromptCacheSettings),
    "ingest": (ingest.run, ingest.IngestSettings),
    "ingest_scale": (ingest_scale.run, ingest_scale.ScaleSettings),
    "recall": (recall.run, recall.RecallSettings),
    "memory_growth": (memory_growth.run, memory_growth.MemorySettings),
}


def run_all(out_dir: Path, quick: bool = False, only: list[str] | None = None) -> list[Report]:
    started = time.perf_counter()
    reports = []
    for name, (run, settings) in BENCHMARKS.items():
        if only and name not in only:
            continue
        set_threads(2)
        reports.append(run(settings.quick() if quick else settings(), out_dir))
    path, met, total = write_summary(out_dir)
    print(f"\n{met} of {total} targets met; this run took {(time.perf_counter() - started) / 60:.1f} min; "
          f"wrote {path.parent}", flush=True)
    return reports


def write_summary(out_dir: Path) -> tuple[Path, int, int]:
    """summary.md from the latest run of each benchmark found in out_dir/raw (so a partial
    rerun with --only updates its part and keeps the others)."""
    raw = {name: out_dir / "raw" / f"{name}.json" for name in BENCHMARKS}
    runs = [(name, json.loads(p.read_text())) for name, p in raw.items() if p.exists()]
    targets = [Target(**t) for _, r in runs for t in r["targets"]]
    met = sum(t.met for t in targets)
    total = sum(r["wall_s"] for _, r in runs)
    lines = ["# Benchmark summary", "",
             f"Latest run of each benchmark on {machine()['summary']}; {total / 60:.1f} min in all.", "",
             f"{met} of {len(targets)} targets met.", ""]
    lines += [f"- [{r['title']}]({name}.md): {r['machine']['date']}, {r['wall_s']:.0f} s, load average "
              f"{r['machine']['load_before']} before" for name, r in runs]
    lines += ["", targets_table(targets).markdown()]
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines))
    return path, met, len(targets)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="toy sizes (about a minute in all)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--only", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    args = p.parse_args()
    quiet()
    only = args.only.split(",") if args.only else None
    unknown = set(only or []) - set(BENCHMARKS)
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; accepted: {', '.join(BENCHMARKS)}")
    run_all(args.out, args.quick, only)


if __name__ == "__main__":
    main()
