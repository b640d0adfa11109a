"""What every benchmark shares: medians with spread, tables, verdicts, the machine, the report
files, RSS, a video-like random feature stream, a pruner wrapper that times its decisions, and a
count of the operations a call dispatches.

Figures are medians of repeated measurements with their min-max spread, because this is a
shared 2-core machine where a single run says little; the load average before and after each
benchmark is recorded next to its numbers.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pruning
from pruning import FrameTokens, Pruner, TokenSet

RESULTS = Path(__file__).resolve().parent / "results"
SEED_PRUNERS = ("echoprune", "moprune", "hieravid", "forestprune")
BASELINES = ("uniform", "recent", "dtd", "random")
ALL_PRUNERS = SEED_PRUNERS + BASELINES


@dataclass(frozen=True)
class Stat:
    """Median of repeated measurements and their min-max spread."""

    median: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat":
        vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
        if not vals:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(statistics.median(vals), min(vals), max(vals), len(vals))

    def fmt(self, digits: int = 2) -> str:
        """`median (lo-hi)`, or `n/a` when nothing was measured."""
        if self.n == 0:
            return "n/a"
        m, lo, hi = (f"{v:.{digits}f}" for v in (self.median, self.lo, self.hi))
        return m if self.n == 1 or lo == hi else f"{m} ({lo}-{hi})"


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        self.rows.append([_cell(c) for c in cells])

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def text(self) -> str:
        widths = [max(len(str(x)) for x in col) for col in zip(self.columns, *self.rows)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [self.title, fmt.format(*self.columns), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*r) for r in self.rows]
        return "\n".join(out)


def _cell(c: Any) -> str:
    if isinstance(c, Stat):
        return c.fmt()
    if isinstance(c, float):
        return "n/a" if math.isnan(c) else f"{c:.3g}"
    return str(c)


@dataclass(frozen=True)
class Target:
    """One performance goal (docs/DESIGN.md, "Performance goals"): met or missed, with the
    figure measured and, if missed, why."""

    benchmark: str
    subject: str
    goal: str
    measured: str
    met: bool
    why: str = ""

    @property
    def verdict(self) -> str:
        return "met" if self.met else "MISSED"


@dataclass
class Report:
    name: str
    title: str
    settings: Any
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def markdown(self) -> str:
        m = self.machine
        out = [f"## {self.title}", "",
               f"Run {m.get('date', '?')} on {m.get('summary', '?')}; took {self.wall_s:.0f} s; "
               f"load average {m.get('load_before', '?')} before, {m.get('load_after', '?')} after.", ""]
        for note in self.notes:
            out += [note, ""]
        out += [t.markdown() for t in self.tables]
        if self.targets:
            out.append(targets_table(self.targets).markdown())
        out += [f"![{p}]({p})\n" for p in self.plots]
        s = asdict(self.settings) if is_dataclass(self.settings) else self.settings
        out += ["<details><summary>settings</summary>", "", "```json", json.dumps(s, indent=1, default=str), "```",
                "", "</details>", ""]
        return "\n".join(out)

    def text(self) -> str:
        parts = [f"== {self.title} ({self.wall_s:.0f} s)"] + self.notes + [t.text() for t in self.tables]
        if self.targets:
            parts.append(targets_table(self.targets).text())
        return "\n\n".join(parts)

    def write(self, out_dir: Path) -> Path:
        """`<name>.md` in out_dir and the raw numbers as `raw/<name>.json`."""
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{self.name}.md"
        path.write_text(self.markdown())
        raw_dir = out_dir / "raw"
        raw_dir.mkdir(exist_ok=True)
        s = asdict(self.settings) if is_dataclass(self.settings) else self.settings
        payload = {"title": self.title, "settings": s, "machine": self.machine, "wall_s": self.wall_s,
                   "targets": [asdict(t) for t in self.targets], "raw": self.raw}
        (raw_dir / f"{self.name}.json").write_text(json.dumps(payload, indent=1, default=str))
        return path


def targets_table(targets: Sequence[Target]) -> Table:
    t = Table("Targets", ["benchmark", "subject", "goal", "measured", "verdict", "why (if missed)"])
    for x in targets:
        t.add(x.benchmark, x.subject, x.goal, x.measured, x.verdict, x.why)
    return t


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def machine() -> dict[str, Any]:
    """Date, CPU, cores, memory and library versions: what a figure depends on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cap = torch.backends.cpu.get_cpu_capability()
    cores = os.cpu_count()
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu, "cores": cores, "memory_gb": round(mem_gb, 1), "cpu_capability": cap,
        "torch": torch.__version__, "python": platform.python_version(),
        "summary": f"{cpu}, {cores} cores ({cap}), {mem_gb:.0f} GB RAM, torch {torch.__version__}",
    }


def rss_bytes() -> int:
    """Resident set size of this process now (/proc/self/statm, second field)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


@dataclass(frozen=True)
class Variant:
    """A pruner as benchmarked: a label, its registry name and its parameters."""

    label: str
    name: str
    params: tuple[tuple[str, Any], ...] = ()

    def build(self) -> Pruner:
        return pruning.get_pruner(self.name, **dict(self.params))


def variant(label: str) -> Variant:
    """`echoprune-3x3` is EchoPrune with the paper's 3x3 window (LLaVA-OV defaults: radius 1,
    tau 0.1); every other label is a registry name with its defaults."""
    if label == "echoprune-3x3":
        return Variant(label, "echoprune", (("radius", 1), ("tau", 0.1)))
    pruning.pruner_class(label)
    return Variant(label, label)


class TimedPruner(Pruner):
    """Delegates to a pruner and adds up the time its own decisions take (score + evict), so
    the memory's bookkeeping (copying rows) can be told apart from the pruner's work."""

    def __init__(self, inner: Pruner):
        self.inner = inner
        self.name = inner.name
        self.ms = 0.0
        self.evictions = 0

    def reset(self) -> None:
        self.inner.reset()

    def score(self, group: FrameTokens):
        t0 = time.perf_counter()
        try:
            return self.inner.score(group)
        finally:
            self.ms += (time.perf_counter() - t0) * 1e3

    def evict(self, store: TokenSet, capacity: int) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self.inner.evict(store, capacity)
        finally:
            self.ms += (time.perf_counter() - t0) * 1e3
            self.evictions += 1

    def query_score(self, snap: TokenSet, query_embeds: torch.Tensor | None) -> torch.Tensor:
        return self.inner.query_score(snap, query_embeds)

    def rank_for_query(self, snap: TokenSet, query_embeds: torch.Tensor | None, budget: int) -> torch.Tensor:
        return self.inner.rank_for_query(snap, query_embeds, budget)


class DispatchedOps(TorchDispatchMode):
    """`with DispatchedOps() as ops: ...` then `ops.count`: the operations dispatched that are not
    views. On a GPU each one on a device tensor is a kernel launch, and a loop of small ones costs
    its launches, not its arithmetic (about 5-10 us each from Python)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def video_like_features(h: int, w: int, d: int, n: int, seed: int = 0, moving: float = 0.1,
                        cut_every: int = 60, dtype: torch.dtype = torch.float32) -> Iterator[torch.Tensor]:
    """`n` random [h, w, d] groups with a video's statistics, for timing pruners at real shapes.

    Pure noise would make every token novel and every pruner take its degenerate path (no
    merging, no trees, a scene per group). Instead each position follows x <- a x + sqrt(1-a^2) e:
    a = 0.98 for most positions (same-position cosine ~0.98, static background), a = 0.2 for a
    random `moving` share of positions per group (motion), and all positions start afresh every
    `cut_every` groups (a scene cut).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(h, w, d, generator=gen)
    for i in range(n):
        if cut_every and i and i % cut_every == 0:
            x = torch.randn(h, w, d, generator=gen)
        a = torch.where(torch.rand(h, w, 1, generator=gen) < moving, 0.2, 0.98)
        x = a * x + torch.sqrt(1 - a * a) * torch.randn(h, w, d, generator=gen)
        yield x.to(dtype)


def quiet() -> None:
    """Warnings only, and no per-load progress bars from transformers in the benchmark output."""
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


def cli(description: str) -> argparse.ArgumentParser:
    """Arguments every benchmark takes when run alone."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="toy sizes (seconds), as the smoke test runs")
    p.add_argument("--out", type=Path, default=RESULTS, help="where the .md, .png and raw/*.json go")
    return p


def run_alone(doc: str, run, settings) -> None:
    """`python -m bench.NAME [--quick] [--out DIR]`: one benchmark on its own."""
    args = cli(doc.splitlines()[0]).parse_args()
    quiet()
    run(settings.quick() if args.quick else settings(), args.out)


def finish(report: Report, out_dir: Path, started: float, load_before: str) -> Report:
    """Stamp machine, load and wall time on a report, write it and print it."""
    report.machine = {**machine(), "load_before": load_before, "load_after": load_average()}
    report.wall_s = time.perf_counter() - started
    report.write(out_dir)
    print(report.text(), flush=True)
    return report
