"""Benchmark 1: evidence recall vs budget.

Scripted synthetic streams (`make_script`: 30-s scenes split by cuts, objects entering, moving
and leaving, a sign appearing, a brief 1-2 s object, a flickering lamp, lighting drift, sensor
noise; with `distractors`, also periodic distractors over ~13% of the frame: a light blinking
every 1 or 2 s, a branch swaying through 3 positions in 4 s, a strip shimmering through 3
textures in 1.5 s) are rendered at 2 fps and encoded ONCE per seed through the tiny model's real vision
path (`VideoLM.encode`); the encoded groups are then replayed into `TokenMemory` with every
pruner at every budget (the pruners only ever see `FrameTokens`).

A budget is a share of the dense tokens of the whole stream and bounds everything the memory
holds: long-term capacity = budget - the dense recent window. After the last group:
- event recall: share of ground-truth events with at least one held token inside the event's
  box during its time. A token of group g at (row, col) is inside when its cell, mapped back to
  frame pixels, shares at least half of the smaller of (cell, box) with the actor's exact box
  (`boxes_at`) at one of g's frames within the event's interval (the frame nearest the interval
  when none falls inside). A cut is held when any token of the first group showing the new
  scene is.
- event-seconds: per event, the share of its frames (2 a second) with a held token inside the
  actor's box at that frame, averaged over events: how much of what happened is still told,
  not only that something of it is (a cut counts as one frame).
- recent recall: the same as event recall over events that overlap the last 10 s (recent
  perception).
- distractor share: held tokens on a distractor (a lit-or-dark flickering lamp while it runs,
  the blinking light, the area the branch sweeps, the shimmering strip; not on an actor) / held.
  Lighting drift and sensor noise cover the whole frame, so they show as lost recall, not share.
- background share: held tokens on quiet background (no actor's box at any of the group's
  frames, no distractor) / held.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from pruning import FrameTokens, TokenMemory
from stream.sources.synthetic import PERIODIC_KINDS, SyntheticSource, make_script
from stream.vlm.base import VideoLM
from stream.vlm.qwen2_5_vl.preprocess import VisionGeometry, smart_resize

from .common import (ALL_PRUNERS, SEED_PRUNERS, Report, Stat, Table, Target, TimedPruner, finish,
                     load_average, run_alone, variant)
from .plot import Series, line_plot
from .pool import make_pool, run_jobs

KINDS = ("enter", "move", "leave", "appear", "brief", "cut")
_COST = {"forestprune": 8.0, "hieravid": 2.0, "moprune": 1.5, "echoprune": 1.2}


@dataclass(frozen=True)
class RecallSettings:
    duration_s: float = 600.0
    fps: float = 2.0
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    width: int = 640
    height: int = 480
    max_pixels: int = 448 * 448  # the pipeline's default pixel budget per frame
    budgets: tuple[float, ...] = (0.02, 0.05, 0.10, 0.25)
    pruners: tuple[str, ...] = ALL_PRUNERS
    recent_groups: int = 4
    recent_window_s: float = 10.0
    workers: int = 2
    encode_batch: int = 4
    distractors: bool = True  # the periodic distractors (blinking, swaying, shimmering)

    @classmethod
    def quick(cls) -> "RecallSettings":
        return cls(duration_s=40.0, seeds=(0, 1), max_pixels=224 * 224, budgets=(0.05, 0.10, 0.25),
                   recent_groups=0, recent_window_s=6.0, workers=0)


@dataclass(frozen=True)
class Event:
    kind: str
    label: str
    start_s: float
    end_s: float
    tokens: torch.Tensor  # flat indices g*N + row*W + col that count as evidence
    frames: tuple[torch.Tensor, ...] = ()  # the same, frame by frame (empty: one frame, `tokens`)


@dataclass(frozen=True)
class Truth:
    grid: tuple[int, int]
    n_groups: int
    events: tuple[Event, ...]
    distractor: torch.Tensor  # [T*N] bool: any distractor
    actor: torch.Tensor | None = None  # [T*N] bool: inside an actor's box at one of the group's frames
    by_kind: tuple[tuple[str, torch.Tensor], ...] = ()  # [T*N] bool per distractor kind


def token_grid(s: RecallSettings) -> tuple[int, int]:
    geo = VisionGeometry(max_pixels=s.max_pixels)
    th, tw = smart_resize(s.height, s.width, geo.factor, geo.min_pixels, geo.max_pixels)
    return th // geo.factor, tw // geo.factor


def _source(s: RecallSettings, seed: int) -> SyntheticSource:
    script = make_script(s.duration_s, seed, periodic=s.distractors)
    return SyntheticSource(fps=s.fps, seed=seed, width=s.width, height=s.height, script=script)


def _covered(box: tuple[int, int, int, int], grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """[H, W] bool: token cells that share at least half of the smaller of (cell, box) with
    the pixel box (x1, y1 exclusive), or else the cells holding most of it. A big box counts
    the cells it mostly covers, a small one the cell(s) holding most of it: every visible box
    has at least one."""
    (h, w), (height, width) = grid, size
    x0, y0, x1, y1 = box
    cy0, cx0 = torch.arange(h) * height / h, torch.arange(w) * width / w
    oy = ((cy0 + height / h).clamp(max=float(y1)) - cy0.clamp(min=float(y0))).clamp_min(0)
    ox = ((cx0 + width / w).clamp(max=float(x1)) - cx0.clamp(min=float(x0))).clamp_min(0)
    area = oy[:, None] * ox[None, :]
    smaller = min(height / h * width / w, float((x1 - x0) * (y1 - y0)))
    cov = area >= 0.5 * smaller
    if not cov.any() and float(area.max()) > 0:  # a small box split evenly between cells
        cov = area == area.max()
    return cov & (smaller > 0)


def ground_truth(s: RecallSettings, seed: int, group_size: int = 2) -> Truth:
    """Which token of which group is evidence of each event (and at which frame), which shows a
    distractor, and which an actor."""
    src = _source(s, seed)
    h, w = token_grid(s)
    n = h * w
    size = (s.height, s.width)
    n_frames = src.n_frames
    n_groups = math.ceil(n_frames / group_size)
    boxes = [src.boxes_at(k / s.fps) for k in range(n_frames)]
    events = []
    for e in src.events:
        if e.kind == "cut":
            k = min(n_frames - 1, math.ceil(e.start_s * s.fps - 1e-9))
            g = k // group_size
            tokens = torch.arange(g * n, (g + 1) * n)
            events.append(Event(e.kind, e.label, e.start_s, e.end_s, tokens, (tokens,)))
            continue
        frames = [k for k in range(math.ceil(e.start_s * s.fps - 1e-9), n_frames) if k / s.fps < e.end_s]
        if not frames:
            frames = [min(n_frames - 1, round((e.start_s + e.end_s) / 2 * s.fps))]
        idx = [torch.nonzero(_covered(boxes[k][e.label], (h, w), size).flatten()).flatten() + (k // group_size) * n
               for k in frames if e.label in boxes[k]]
        if idx:
            events.append(Event(e.kind, e.label, e.start_s, e.end_s, torch.unique(torch.cat(idx)), tuple(idx)))
    kinds = ("flicker", *PERIODIC_KINDS)
    masks = {kind: torch.zeros(n_groups * n, dtype=torch.bool) for kind in kinds}
    actor = torch.zeros(n_groups * n, dtype=torch.bool)
    spots = [(d, _covered(d.box, (h, w), size)) for d in src.distractors if d.kind in kinds]
    for k in range(n_frames):
        t = k / s.fps
        on_actor = torch.zeros(h, w, dtype=torch.bool)
        for box in boxes[k].values():
            on_actor |= _covered(box, (h, w), size)
        rows = slice(k // group_size * n, (k // group_size + 1) * n)
        actor[rows] |= on_actor.flatten()
        for d, cells in spots:
            if d.start_s <= t < d.end_s:
                masks[d.kind][rows] |= (cells & ~on_actor).flatten()
    distractor = torch.stack(list(masks.values())).any(0)
    by_kind = tuple((kind, m) for kind, m in masks.items() if m.any())
    return Truth((h, w), n_groups, tuple(events), distractor, actor, by_kind)


_VLM: dict[int, VideoLM] = {}  # by max_pixels
_GROUPS: dict[str, torch.Tensor] = {}


def encode_stream(s: RecallSettings, seed: int, path: str) -> dict:
    """Worker: render the stream at `fps`, encode pairs of frames with the tiny model, save
    the [T, H, W, D] groups to `path`."""
    from stream.vlm.registry import load_model

    if s.max_pixels not in _VLM:
        _VLM.clear()
        _VLM[s.max_pixels] = load_model("tiny-random", max_pixels=s.max_pixels)
    vlm = _VLM[s.max_pixels]
    src = _source(s, seed)
    tp = vlm.group_size
    t0 = time.perf_counter()
    frames = [src.render(k / s.fps) for k in range(src.n_frames)]
    groups = [frames[i:i + tp] for i in range(0, len(frames), tp)]
    out = []
    for i in range(0, len(groups), s.encode_batch):
        out += vlm.encode(groups[i:i + s.encode_batch])
    grid = torch.stack(out)
    torch.save(grid, path)
    return {"seed": seed, "groups": int(grid.shape[0]), "grid": list(grid.shape[1:3]), "dim": int(grid.shape[3]),
            "encode_s": time.perf_counter() - t0, "group_size": tp}


def replay(path: str, label: str, capacity: int, recent_groups: int, group_s: float) -> dict:
    """Worker: feed the encoded groups into a memory with one pruner; what is held at the end."""
    if path not in _GROUPS:
        _GROUPS.clear()
        _GROUPS[path] = torch.load(path)
    groups = _GROUPS[path]
    _, h, w, _ = groups.shape
    pruner = TimedPruner(variant(label).build())
    mem = TokenMemory(capacity, pruner, recent_groups)
    t0 = time.perf_counter()
    for g in range(groups.shape[0]):
        mem.add(FrameTokens(index=g, pts=g * group_s, tokens=groups[g]))
    wall = time.perf_counter() - t0
    snap = mem.snapshot()
    flat = snap.group * (h * w) + snap.row * w + snap.col
    return {"flat": flat, "held": len(snap), "wall_s": wall, "pruner_ms_per_group": pruner.ms / groups.shape[0]}


def score(truth: Truth, flat: torch.Tensor, last_s: float, duration_s: float) -> dict:
    """Recall (all events, those ending in the last `last_s`, per kind), event-seconds, and the
    distractor and quiet-background shares of the held tokens `flat` (flat indices, as in
    `Event.tokens`)."""
    held = torch.zeros(truth.distractor.numel(), dtype=torch.bool)
    held[flat] = True
    hit = {i: bool(held[e.tokens].any()) for i, e in enumerate(truth.events)}
    seconds = [sum(bool(held[f].any()) for f in e.frames) / len(e.frames) if e.frames else float(hit[i])
               for i, e in enumerate(truth.events)]
    recent = [i for i, e in enumerate(truth.events) if e.end_s >= duration_s - last_s]
    by_kind = {}
    for kind in KINDS:
        ids = [i for i, e in enumerate(truth.events) if e.kind == kind]
        by_kind[kind] = sum(hit[i] for i in ids) / len(ids) if ids else math.nan
    n = max(1, int(flat.numel()))
    quiet = ~truth.distractor if truth.actor is None else ~(truth.distractor | truth.actor)
    return {
        "recall": sum(hit.values()) / max(1, len(hit)),
        "event_seconds": sum(seconds) / len(seconds) if seconds else math.nan,
        "background_share": int(quiet[flat].sum()) / n,
        "distractor_by_kind": {kind: int(m[flat].sum()) / n for kind, m in truth.by_kind},
        "recent_recall": sum(hit[i] for i in recent) / len(recent) if recent else math.nan,
        "recent_events": len(recent),
        "distractor_share": int(truth.distractor[flat].sum()) / n,
        "by_kind": by_kind,
    }


def run(s: RecallSettings, out_dir: Path) -> Report:
    started, load0 = time.perf_counter(), load_average()
    raw_dir = out_dir / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    from stream.vlm.registry import checkpoint_path

    checkpoint_path("tiny-random")  # built here once, before the workers load it
    h, w = token_grid(s)
    truths = {seed: ground_truth(s, seed) for seed in s.seeds}
    paths = {seed: str(raw_dir / f"recall_seed{seed}_{h}x{w}.pt") for seed in s.seeds}
    with make_pool(s.workers) as pool:
        enc = run_jobs(pool, encode_stream, [(s, seed, paths[seed]) for seed in s.seeds])
        n_groups = enc[0]["groups"]
        group_s = enc[0]["group_size"] / s.fps
        dense = n_groups * h * w
        caps = {b: max(0, math.floor(b * dense) - s.recent_groups * h * w) for b in s.budgets}
        jobs = [(seed, label, b) for seed in s.seeds for label in s.pruners for b in s.budgets]
        jobs.sort(key=lambda j: -_COST.get(j[1], 1.0) * (0.3 + j[2]))
        results = run_jobs(pool, replay, [(paths[seed], label, caps[b], s.recent_groups, group_s)
                                          for seed, label, b in jobs])
    scores: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for (seed, label, b), res in zip(jobs, results):
        sc = score(truths[seed], res["flat"], s.recent_window_s, s.duration_s)
        sc.update(seed=seed, held=res["held"], wall_s=res["wall_s"], pruner_ms_per_group=res["pruner_ms_per_group"])
        scores[(label, b)].append(sc)
    report = Report("recall", "Evidence recall vs budget", s)
    n_events = [len(t.events) for t in truths.values()]
    cover = {kind: Stat.of([float(m.float().mean()) for t in truths.values() for k, m in t.by_kind if k == kind]).median
             for kind in _DISTRACTOR_NAMES}
    n_recent = [scores[(s.pruners[0], s.budgets[0])][i]["recent_events"] for i in range(len(s.seeds))]
    report.notes.append(
        f"{len(s.seeds)} seeds x {s.duration_s:.0f} s at {s.fps:g} fps = {n_groups} groups of {h}x{w} tokens "
        f"(tiny Qwen2.5-VL, {s.width}x{s.height} frames at max_pixels {s.max_pixels}); dense = {dense} tokens per "
        f"stream. Events per seed: {n_events} (in the last {s.recent_window_s:g} s: {n_recent}). "
        f"Budget = everything held (long-term capacity + {s.recent_groups} dense recent groups). "
        f"Encoding took {sum(e['encode_s'] for e in enc):.0f} s in all. Cells: median over seeds (min-max).")
    report.notes.append(
        "Distractors, share of the frame's tokens per group (median over seeds): " + ", ".join(
            f"{_DISTRACTOR_NAMES[k]} {100 * v:.1f}%" for k, v in cover.items() if not math.isnan(v))
        + (". The periodic ones (blinking light, swaying branch, shimmering strip) are on throughout; "
           "a lamp flickers at random for most of each scene." if s.distractors else
           " (periodic distractors off)."))
    _tables(report, s, scores)
    report.targets += _targets(s, scores)
    plot = line_plot(out_dir / "recall.png", [_series(scores, label, s.budgets) for label in s.pruners],
                     "Event recall vs memory budget (median over seeds, min-max bars)",
                     "budget, % of the stream's dense tokens", "event recall", ylim=(0.0, 1.0),
                     xticks=[100 * b for b in s.budgets], log_x=True)
    report.plots.append(plot.name)
    report.raw = {"caps": {str(b): c for b, c in caps.items()}, "encode": enc,
                  "scores": {f"{label}@{b}": v for (label, b), v in scores.items()}}
    return finish(report, out_dir, started, load0)


def _stat(scores: dict, label: str, b: float, key: str) -> Stat:
    return Stat.of([x[key] for x in scores[(label, b)]])


def _series(scores: dict, label: str, budgets: tuple[float, ...]) -> Series:
    stats = [_stat(scores, label, b, "recall") for b in budgets]
    return Series(label, [100 * b for b in budgets], [x.median for x in stats], [x.lo for x in stats],
                  [x.hi for x in stats])


def _tables(report: Report, s: RecallSettings, scores: dict) -> None:
    cols = ["pruner"] + [f"{100 * b:g}%" for b in s.budgets]
    for key, title in (("recall", "Event recall"),
                       ("event_seconds", "Event-seconds (share of each event's seconds with a held token, mean over "
                                         "events)"),
                       ("recent_recall", f"Recall of events in the last {s.recent_window_s:g} s"),
                       ("distractor_share", "Share of memory on distractors (" + ", ".join(
                           name for k, name in _DISTRACTOR_NAMES.items() if s.distractors or k == "flicker") + ")"),
                       ("background_share", "Share of memory on quiet background (no actor, no distractor)")):
        t = Table(title, cols)
        for label in s.pruners:
            t.add(label, *(_stat(scores, label, b, key).fmt(2) for b in s.budgets))
        report.tables.append(t)
    b = 0.10 if 0.10 in s.budgets else s.budgets[-1]
    t = Table(f"Event recall by kind at {100 * b:g}%", ["pruner", *KINDS])
    for label in s.pruners:
        t.add(label, *(Stat.of([x["by_kind"][k] for x in scores[(label, b)]]).fmt(2) for k in KINDS))
    report.tables.append(t)
    kinds = [k for k in _DISTRACTOR_NAMES if any(k in x["distractor_by_kind"] for x in scores[(s.pruners[0], b)])]
    t = Table(f"Share of memory per distractor at {100 * b:g}%", ["pruner", *(_DISTRACTOR_NAMES[k] for k in kinds)])
    for label in s.pruners:
        t.add(label, *(Stat.of([x["distractor_by_kind"].get(k, 0.0) for x in scores[(label, b)]]).fmt(2) for k in kinds))
    report.tables.append(t)
    t = Table("Replay cost (all budgets)", ["pruner", "pruner ms/group", "replay s (600 groups)" if s.duration_s == 600
                                            else "replay s", "tokens held at the end"])
    for label in s.pruners:
        runs = [x for b in s.budgets for x in scores[(label, b)]]
        held = " / ".join(f"{_stat(scores, label, b, 'held').median:.0f}" for b in s.budgets)
        t.add(label, Stat.of([x["pruner_ms_per_group"] for x in runs]).fmt(2),
              Stat.of([x["wall_s"] for x in runs]).fmt(1), held)
    report.tables.append(t)


_DISTRACTOR_NAMES = {"flicker": "flickering lamps", "blink": "blinking light", "sway": "swaying branch",
                     "shimmer": "shimmering strip"}


def _targets(s: RecallSettings, scores: dict) -> list[Target]:
    """Each seed pruner above `uniform` and `recent` on event recall at 5% and 10%."""
    out = []
    have = set(s.pruners)
    for b in (0.05, 0.10):
        if b not in s.budgets or not {"uniform", "recent"} <= have:
            continue
        base = {x: _stat(scores, x, b, "recall").median for x in ("uniform", "recent")}
        for label in (p for p in s.pruners if p in SEED_PRUNERS):
            r = _stat(scores, label, b, "recall")
            met = r.median > max(base.values())
            why = "" if met else _why(scores, label, b, max(base, key=base.get))
            out.append(Target("recall", f"{label} @ {100 * b:g}%", "recall > uniform and recent",
                              f"{r.fmt(2)} vs uniform {base['uniform']:.2f}, recent {base['recent']:.2f}", met, why))
    return out


def _why(scores: dict, label: str, b: float, rival: str) -> str:
    """The event kinds where `label` trails `rival` most, and its distractor share."""
    gaps = []
    for k in KINDS:
        mine = Stat.of([x["by_kind"][k] for x in scores[(label, b)]]).median
        theirs = Stat.of([x["by_kind"][k] for x in scores[(rival, b)]]).median
        if not (math.isnan(mine) or math.isnan(theirs)):
            gaps.append((theirs - mine, k, mine, theirs))
    gaps.sort(reverse=True)
    parts = [f"{k} {m:.2f} vs {t:.2f}" for g, k, m, t in gaps[:2] if g > 0]
    share = _stat(scores, label, b, "distractor_share").median
    return (f"trails {rival} on " + ", ".join(parts) + "; " if parts else "") + f"distractor share {share:.2f}"


if __name__ == "__main__":
    run_alone(__doc__, run, RecallSettings)
