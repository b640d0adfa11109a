"""Benchmark 5: sustained ingest with questions.

The real camera service (`stream.camera.Camera`): a realtime 30 fps 640x480 synthetic camera, the sampler
at 2 fps (`latest` policy, as for a live camera), the tiny model's rolling encoder, the pruner
and the memory, with the prompt cache on (the default: the LLM thread extends the prompt's KV
after every group); a question every 2 s of wall time through the query handler while frames
keep coming. Recorded: when each group lands in the memory, the sampler's and encoder's
counters, each answer's start, end, prompt path and prefilled tokens, and the cache's totals.
- groups/s: groups landed per second between the first and the last (2 fps = 1 group/s);
- ingest latency: from a group's last frame being due (stream start + its pts) to the group
  being in memory; it grows without bound when ingest falls behind;
- backlog: the most groups ever waiting for the encoder (1 = the group just handed over);
- stall: a gap between two groups landing longer than 1.5 group periods; "during answers"
  counts gaps that overlap an answer;
- cache lag: the prompt-prefix tokens (system text and video) a question had to prefill
  itself because the cache was not current; a whole prefix on the `full` path;
- cache ms/group: the LLM thread's background refresh time over the groups encoded.
Each seed pruner runs with the tiny model; then the pipeline's default pruner runs once more
with the random-init Qwen2-0.5B-size LLM answering (`ttft.build_sized`), whose seconds-long
prefills compete with the encoder for the same 2 cores: the harder case for "no stall".
The memory capacity is small (1024 tokens) so eviction runs from the ~8th second on and the
run measures the steady state of a long-lived camera.
"""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from pathlib import Path

from stream.config import from_dict
from stream.camera import Camera
from stream.events import Question
from stream.vlm.base import VideoLM
from stream.vlm.registry import load_model

from .common import SEED_PRUNERS, Report, Stat, Table, Target, finish, load_average, run_alone, set_threads
from .ttft import QWEN2_05B, LLMSize, build_sized, pick_dtype


@dataclass(frozen=True)
class IngestSettings:
    duration_s: float = 24.0
    source_fps: float = 30.0
    width: int = 640
    height: int = 480
    sample_fps: float = 2.0
    question_every_s: float = 2.0
    pruners: tuple[str, ...] = SEED_PRUNERS
    big: LLMSize | None = QWEN2_05B
    big_pruner: str = "echoprune"
    big_duration_s: float = 40.0  # its answers take seconds: room for several
    big_dtype: str = "float32"  # not "auto": pick_dtype's single timing chose bf16 on a busy machine (1.8x slower here)
    capacity: int = 1024
    recent_groups: int = 4
    evict_slack: float = 0.25
    max_new_tokens: int = 16
    question: str = "What is happening now, and what happened before?"
    stall_factor: float = 1.5
    threads: int = 2

    @classmethod
    def quick(cls) -> "IngestSettings":
        return cls(duration_s=5.0, width=320, height=240, pruners=("echoprune",), big=None,
                   capacity=256, recent_groups=1, max_new_tokens=4)


async def _run_one(s: IngestSettings, vlm: VideoLM, label: str, duration_s: float) -> dict:
    cfg = from_dict({
        "name": f"bench-{label}",
        "source": {"kind": "synthetic", "fps": s.source_fps, "duration_s": duration_s, "seed": 0,
                   "width": s.width, "height": s.height, "realtime": True},
        "sampler": {"fps": s.sample_fps},
        "memory": {"pruner": label, "capacity": s.capacity, "recent_groups": s.recent_groups,
                   "evict_slack": s.evict_slack},
        "query": {"max_new_tokens": s.max_new_tokens},
        "output": {"status_interval_s": 0.0},
    })
    cam = Camera(cfg, vlm)
    cam.source.render(0.0)  # builds the source's cached background and noise before the clock starts
    landed: list[tuple[float, float]] = []
    inner = cam.encoder.on_group

    def on_group(group, frames) -> None:
        landed.append((time.monotonic(), group.pts))
        if inner is not None:
            inner(group, frames)

    cam.encoder.on_group = on_group
    answers: list[tuple[float, float]] = []
    details: list[dict] = []

    async def ask_every() -> None:
        k = 1
        while True:
            delay = start + k * s.question_every_s - time.monotonic()
            try:
                await asyncio.wait_for(cam.finished.wait(), max(0.0, delay))
                return
            except TimeoutError:
                pass
            t0 = time.monotonic()
            a = await cam.ask(Question(s.question, origin="bench"))
            t1 = time.monotonic()
            answers.append((t0, t1))
            details.append({"path": a.prompt_path, "prompt_tokens": a.prompt_tokens, "prefilled": a.prefilled_tokens,
                            "visual": a.tokens_used, "ttft_s": a.ttft_s})
            k = max(k + 1, int((t1 - start) // s.question_every_s) + 1)

    start = time.monotonic()
    async with cam:
        await asyncio.gather(cam.finished.wait(), ask_every())
    lay = cam.memory.layout()
    return {"landed": landed, "answers": answers, "details": details, "start": start,
            "group_size": cam.encoder.group_size, "summary": cam.summary(),
            "max_backlog": cam.encoder.stats.max_backlog, "cache": cam.queries.cache_report(),
            "group_tokens": math.prod(lay.grid),
            "system_tokens": vlm.plan(lay, "", cam.queries.layout).prefix_len - len(lay.group)}


def analyse(r: dict, sample_fps: float, stall_factor: float, frames_due: int) -> dict:
    """Rates, latency, backlog and the gaps between groups landing, split by answers."""
    answers, gs = r["answers"], r["group_size"]
    group_s = gs / sample_fps
    landed = r["landed"][: r["summary"]["frames_sampled"] // gs]  # a lone last frame is flushed early
    walls = [w for w, _ in landed]
    latency = [w - r["start"] - (pts + (gs - 1) / sample_fps) for w, pts in landed]
    gaps = list(zip(walls, walls[1:]))
    overlaps = [any(a < t1 and b > t0 for t0, t1 in answers) for a, b in gaps]
    during = [b - a for (a, b), o in zip(gaps, overlaps) if o]
    outside = [b - a for (a, b), o in zip(gaps, overlaps) if not o]
    summ = r["summary"]
    # prompt = system + visual + suffix; the question's own tokens are the suffix, the rest it prefilled was lag
    lag = [d["prefilled"] - (d["prompt_tokens"] - r["system_tokens"] - d["visual"]) for d in r["details"]]
    paths = [d["path"] for d in r["details"]]
    cache = r["cache"]
    return {
        "groups": len(landed),
        "groups_per_s": (len(walls) - 1) / (walls[-1] - walls[0]) if len(walls) > 1 else float("nan"),
        "expected_groups_per_s": 1.0 / group_s, "frames_in": summ["frames_in"], "frames_due": frames_due,
        "dropped": summ["dropped"], "max_backlog": r["max_backlog"], "latency": Stat.of(latency),
        "answer_s": Stat.of([t1 - t0 for t0, t1 in answers]), "answers": len(answers),
        "max_gap_during": max(during, default=float("nan")), "max_gap_outside": max(outside, default=float("nan")),
        "stalls_during": sum(g > stall_factor * group_s for g in during),
        "encode_ms": summ["encode_ms_per_group"], "prune_ms": summ["prune_ms_per_group"],
        "paths": {p: paths.count(p) for p in sorted(set(paths))},
        "prefilled": Stat.of([d["prefilled"] for d in r["details"]]), "cache_lag": Stat.of(lag),
        "group_tokens": r["group_tokens"], "groups_encoded": summ["groups_encoded"],
        "cache_ms": cache.get("background_ms", 0.0) / max(1, summ["groups_encoded"]),
        "cache_reprefilled": cache.get("reprefilled_tokens", 0), "cache_appended": cache.get("appended_tokens", 0),
        "cache_rewinds": cache.get("rewinds", 0),
    }


def _targets(label: str, a: dict, s: IngestSettings) -> list[Target]:
    """Backlog: the encoder never had a group waiting behind another (its max backlog counts the
    group just handed over, so 1 is no backlog), dropped nothing and kept the sampling rate.
    With the prompt cache: that, and the cache too had no backlog: every answer found it at most
    one group behind (the newest group may land while the question starts).
    Stall: no gap over `stall_factor` group periods while an answer ran."""
    behind = a["max_backlog"] > 1 or a["dropped"] > 0 or a["groups_per_s"] < 0.95 * a["expected_groups_per_s"]
    period_ms = 1000 / a["expected_groups_per_s"]
    ingest_why = (f"encoding {a['encode_ms']:.0f} ms + pruning {a['prune_ms']:.1f} ms per group vs a {period_ms:.0f} "
                  f"ms group period, on the cores the prompt cache ({a['cache_ms']:.0f} ms per group) and the answers "
                  f"({a['answer_s'].fmt(2)} s each) use") if behind else ""
    ingest = (f"{a['groups_per_s']:.2f} groups/s, max backlog {a['max_backlog']} (1 = the group just handed over), "
              f"{a['dropped']} frames dropped")
    backlog = Target("ingest", f"{label}: backlog", f"no backlog at {s.sample_fps:g} fps",
                     f"{ingest}, latency {a['latency'].fmt(2)} s", not behind, ingest_why)
    cached = a["paths"].get("cached", 0)
    lagging = a["answers"] == 0 or cached < a["answers"] or a["cache_lag"].hi > a["group_tokens"]
    n = max(1, a["groups_encoded"])
    cache_why = "" if not lagging else (
        f"answers prefilled {a['cache_lag'].fmt(0)} prefix tokens the cache lacked: the cache rewound "
        f"{a['cache_rewinds'] / n:.2f} times per group and re-prefilled {a['cache_reprefilled'] / n:.0f} tokens per "
        f"group besides the {a['cache_appended'] / n:.0f} appended, while answers of {a['answer_s'].fmt(2)} s held the "
        "LLM thread (the refresh gives way to a waiting question)")
    with_cache = Target("ingest", f"{label}: prompt cache current",
                        f"every answer finds the prompt cache at most one group behind, with a question every "
                        f"{s.question_every_s:g} s",
                        f"{ingest}; {cached}/{a['answers']} answers cached, cache lag {a['cache_lag'].fmt(0)} tokens "
                        f"(a group is {a['group_tokens']}), {a['cache_ms']:.0f} ms refresh per group",
                        not behind and not lagging, "no answer completed" if a["answers"] == 0 else
                        "; ".join(w for w in (ingest_why, cache_why) if w))
    stalled = a["stalls_during"] > 0 or a["answers"] == 0
    why = ("no answer completed" if a["answers"] == 0 else
           f"{a['stalls_during']} gaps > {s.stall_factor:g} periods while answers took {a['answer_s'].fmt(2)} s "
           "on the same 2 cores") if stalled else ""
    stall = Target("ingest", f"{label}: stall", "no ingest stall during answers",
                   f"max gap during {a['answers']} answers {a['max_gap_during']:.2f} s "
                   f"(otherwise {a['max_gap_outside']:.2f} s)", not stalled, why)
    return [backlog, with_cache, stall]


def run(s: IngestSettings, out_dir: Path) -> Report:
    started, load0 = time.perf_counter(), load_average()
    set_threads(s.threads)
    report = Report("ingest", f"Sustained ingest with a question every {s.question_every_s:g} s", s)
    report.notes.append(
        f"{s.duration_s:g} s per pruner of a realtime {s.source_fps:g} fps {s.width}x{s.height} synthetic camera "
        f"sampled at {s.sample_fps:g} fps (one group of 2 frames per second), capacity {s.capacity} + "
        f"{s.recent_groups} recent groups (evict slack {s.evict_slack:g} of capacity), the prompt cache on, a "
        f"question every {s.question_every_s:g} s ({s.max_new_tokens} new tokens; the next one waits for the "
        f"previous answer). A stall is a gap > {s.stall_factor:g} group periods between groups landing in memory. "
        "Cache lag: prefix tokens (system text and video) a question prefilled because the cache was not current. "
        "Cells with a range: median (min-max) over the run's groups or answers.")
    t = Table("Ingest under questions", ["run", "groups/s", "frames in/due", "dropped frames", "max backlog",
                                         "ingest latency s", "encode ms/group", "prune ms/group", "answers",
                                         "answer paths", "prefilled tokens", "cache lag tokens", "answer latency s",
                                         "cache ms/group", "max gap during answers s", "max gap otherwise s"])
    models = [(lambda: load_model("tiny-random"), [(label, label, s.duration_s) for label in s.pruners])]
    if s.big is not None:
        dtype, why = pick_dtype(s.big_dtype)
        report.notes.append(f"The {s.big.label} LLM runs in {why}; that run lasts {s.big_duration_s:g} s.")
        big_run = (f"{s.big_pruner} + {s.big.label} LLM", s.big_pruner, s.big_duration_s)
        models.append((lambda: build_sized(s.big, dtype, 448 * 448), [big_run]))
    raw = {}
    for load, jobs in models:
        vlm = load()
        for name, label, duration_s in jobs:
            r = asyncio.run(_run_one(s, vlm, label, duration_s))
            a = analyse(r, s.sample_fps, s.stall_factor, round(duration_s * s.source_fps))
            raw[name] = {"analysis": {k: (v.__dict__ if isinstance(v, Stat) else v) for k, v in a.items()},
                         "landed": r["landed"], "answers": r["answers"], "details": r["details"],
                         "cache": r["cache"], "start": r["start"]}
            t.add(name, f"{a['groups_per_s']:.2f}", f"{a['frames_in']}/{a['frames_due']}", a["dropped"],
                  a["max_backlog"], a["latency"].fmt(2), f"{a['encode_ms']:.0f}", f"{a['prune_ms']:.1f}", a["answers"],
                  ", ".join(f"{n} {p}" for p, n in a["paths"].items()), a["prefilled"].fmt(0), a["cache_lag"].fmt(0),
                  a["answer_s"].fmt(2), f"{a['cache_ms']:.0f}", f"{a['max_gap_during']:.2f}",
                  f"{a['max_gap_outside']:.2f}")
            report.targets += _targets(name, a, s)
    report.tables.append(t)
    report.raw = raw
    return finish(report, out_dir, started, load0)


if __name__ == "__main__":
    run_alone(__doc__, run, IngestSettings)
