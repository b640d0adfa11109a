"""Benchmark: ingest capacity against the number of cameras sharing one model.

Each camera is its real rolling encoder and token memory (stream/encoder.py; EchoPrune, capacity
1024 + 4 recent groups) on the model's one vision-tower queue (stream/encode_scheduler.py), fed
640x480 frames at 2 fps (one group of 2 frames per second per camera, cameras staggered over the
second), without a source or sampler in the way: what is measured is what the tower and the
pruners can take.
- Live: 1, 4, 16 and 64 cameras for `duration_s`: groups/s landed in the memories against
  groups/s offered, ingest latency (a group's last frame due -> the group in its memory; median,
  p95, max), groups dropped (waited past the 5 s latency bound, or past the encoder's short
  list), and the tower's mean batch.
- Saturation at 8 cameras: each camera delivers its groups as fast as its encoder takes them,
  handing them over one at a time (as a live camera at its sampling rate does); groups/s with
  the shared tower against each camera encoding alone (its own tower call per group, as before
  the scheduler), alternated, `repeats` times.
The tiny random model on this CPU; `bench/ingest_device.py` runs the same at 7B shapes on a GPU.
Nothing imported here may import PyAV: GPU images do not have it.
"""
from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pruning import FrameTokens, TokenMemory, get_pruner
from stream.encode_scheduler import EncodeScheduler
from stream.encoder import RollingEncoder
from stream.types import Frame
from stream.vlm.base import VideoLM

from .common import Report, Stat, Table, Target, finish, load_average, run_alone, set_threads

SAMPLE_FPS = 2.0


@dataclass(frozen=True)
class ScaleSettings:
    cameras: tuple[int, ...] = (1, 4, 16, 64)
    duration_s: float = 20.0
    width: int = 640
    height: int = 480
    pruner: str = "echoprune"
    capacity: int = 1024
    recent_groups: int = 4
    max_batch: int = 16
    max_latency_s: float = 5.0
    saturation_cameras: int = 8
    saturation_groups: int = 12  # per camera per run
    repeats: int = 3
    target_speedup: float = 1.5
    threads: int = 2

    @classmethod
    def quick(cls) -> "ScaleSettings":
        return cls(cameras=(1, 4), duration_s=3.0, width=320, height=240, capacity=256, recent_groups=1,
                   saturation_cameras=2, saturation_groups=2, repeats=1)


def camera_frames(k: int, width: int, height: int, n: int = 4) -> list[np.ndarray]:
    """A few frames per camera, cycled: a still scene with a bright square moving across it."""
    rng = np.random.default_rng(k)
    scene = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = []
    for i in range(n):
        f = scene.copy()
        x = (i * width // (2 * n)) % (width - 40)
        f[height // 3:height // 3 + 40, x:x + 40] = 255
        out.append(f)
    return out


def _memory(vlm: VideoLM, pruner: str, capacity: int, recent: int) -> TokenMemory:
    p = get_pruner(pruner, **vlm.pruner_defaults.get(pruner, {}))
    return TokenMemory(capacity, p, recent, evict_slack=capacity // 4, device=vlm.device)


async def _feed(images: list[np.ndarray], start: float | None, offset: float, frames: int):
    """`frames` frames at 2 fps from `start + offset` (live), or as fast as taken (start None)."""
    for i in range(frames):
        if start is not None:
            await asyncio.sleep(max(0.0, start + offset + i / SAMPLE_FPS - time.monotonic()))
        else:
            await asyncio.sleep(0)
        yield Frame(i, i / SAMPLE_FPS, images[i % len(images)])


async def drive(vlm: VideoLM, n: int, frames: int, live: bool, shared: bool, s: ScaleSettings) -> dict:
    """Run `n` cameras of `frames` frames each to the end; what landed, when, and what dropped."""
    tower = EncodeScheduler(vlm, s.max_batch) if shared else None
    landed: list[tuple[int, float, float]] = []  # camera, wall time, pts of the group's last frame
    encoders = []
    for k in range(n):
        def on_group(group, fr, k=k) -> None:
            landed.append((k, time.monotonic(), fr[-1].pts))

        encoders.append(RollingEncoder(vlm, _memory(vlm, s.pruner, s.capacity, s.recent_groups), on_group=on_group,
                                       max_batch=8 if live else 1, scheduler=tower, drop_when_behind=live, max_latency_s=s.max_latency_s,
                                       name=f"cam{k}"))
    images = [camera_frames(k, s.width, s.height) for k in range(n)]
    start = time.monotonic() + (0.2 if live else 0.0)  # live: time to start every camera before the first frame
    try:
        await asyncio.gather(*(enc.run(_feed(images[k], start if live else None, k / (n * SAMPLE_FPS) * 2, frames))
                               for k, enc in enumerate(encoders)))
        wall = time.monotonic() - start
    finally:
        for enc in encoders:
            enc.close()
        if tower is not None:
            tower.close()
    latency = [w - (start + k / (n * SAMPLE_FPS) * 2 + pts) for k, w, pts in landed]
    stats = [enc.stats for enc in encoders]
    batches = tower.stats.batches if tower else sum(st.batches for st in stats)
    return {"landed": len(landed), "wall_s": wall, "latency": latency,
            "dropped": sum(st.groups_dropped for st in stats), "failed": sum(st.groups_failed for st in stats),
            "mean_batch": len(landed) / max(1, batches),
            "encode_ms": statistics.median([st.encode_ms_total / max(1, st.groups_encoded) for st in stats]),
            "prune_ms": statistics.median([st.prune_ms_total / max(1, st.groups_encoded) for st in stats])}


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95)) if values else float("nan")


def live_table(vlm: VideoLM, s: ScaleSettings, where: str) -> tuple[Table, dict]:
    frames = int(s.duration_s * SAMPLE_FPS)
    t = Table(f"Live cameras at 1 group/s each, {s.duration_s:g} s, one shared tower ({where})",
              ["cameras", "offered groups/s", "landed groups/s", "dropped groups", "latency median s",
               "latency p95 s", "latency max s", "mean tower batch", "encode ms/group (handed over to back)",
               "prune ms/group"])
    raw = {}
    for n in s.cameras:
        r = asyncio.run(drive(vlm, n, frames, live=True, shared=True, s=s))
        lat = r["latency"]
        raw[n] = {k: v for k, v in r.items() if k != "latency"} | {"latency_p95": p95(lat),
                                                                  "latency_median": float(np.median(lat)) if lat else None}
        t.add(n, f"{n:g}", f"{r['landed'] / s.duration_s:.1f}", r["dropped"],
              f"{np.median(lat):.2f}" if lat else "n/a", f"{p95(lat):.2f}", f"{max(lat, default=float('nan')):.2f}",
              f"{r['mean_batch']:.1f}", f"{r['encode_ms']:.1f}", f"{r['prune_ms']:.1f}")
    return t, raw


def _median_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def group_costs(vlm: VideoLM, s: ScaleSettings) -> dict[str, float]:
    """Where one group's time goes, each step alone on this thread: ms per group."""
    frames = camera_frames(0, s.width, s.height)
    group = frames[:vlm.group_size]
    prepared = vlm.prepare(group)
    memory = _memory(vlm, s.pruner, s.capacity, s.recent_groups)
    grids = vlm.encode_prepared([prepared] * s.saturation_cameras)
    step = iter(range(10 ** 9))

    def add() -> None:
        k = next(step)
        grid = grids[k % len(grids)]
        memory.add(FrameTokens(k, float(k), grid[0] if isinstance(grid, tuple) else grid))

    n = s.saturation_cameras
    return {"prepare": _median_ms(lambda: vlm.prepare(group)),
            "tower, 1 group per call": _median_ms(lambda: vlm.encode_prepared([prepared])),
            f"tower, {n} groups per call": _median_ms(lambda: vlm.encode_prepared([prepared] * n)) / n,
            "memory.add (pruning)": _median_ms(add)}


def saturation(vlm: VideoLM, s: ScaleSettings) -> dict[str, list[float]]:
    """groups/s at `saturation_cameras` cameras, shared tower vs per-camera encoding, alternated."""
    rates: dict[str, list[float]] = {"shared": [], "alone": []}
    frames = 2 * s.saturation_groups
    for _ in range(s.repeats):
        for mode in ("alone", "shared"):
            r = asyncio.run(drive(vlm, s.saturation_cameras, frames, live=False, shared=mode == "shared", s=s))
            rates[mode].append(r["landed"] / r["wall_s"])
    return rates


def run(s: ScaleSettings, out_dir: Path) -> Report:
    from stream.vlm.registry import load_model

    started, load0 = time.perf_counter(), load_average()
    set_threads(s.threads)
    vlm = load_model("tiny-random")
    report = Report("ingest_scale", "Ingest capacity against the number of cameras", s)
    report.notes.append(" ".join(line.strip() for line in __doc__.split("\n\n")[1].splitlines()))
    live, raw = live_table(vlm, s, "tiny model, CPU")
    rates = saturation(vlm, s)
    costs = group_costs(vlm, s)
    shared, alone = Stat.of(rates["shared"]), Stat.of(rates["alone"])
    speedup = Stat.of([a / b for a, b in zip(rates["shared"], rates["alone"])])
    sat = Table(f"Saturation, {s.saturation_cameras} cameras delivering as fast as taken, {s.saturation_groups} groups "
                f"each, {s.repeats} runs per mode", ["mode", "groups/s", "vs per-camera"])
    sat.add("each camera encodes alone", alone.fmt(1), "1")
    sat.add("one shared tower (batched across cameras)", shared.fmt(1), speedup.fmt(2))
    parts = Table(f"Where a group's time goes ({s.width}x{s.height} frames), each step alone, median of 7",
                  ["step", "ms per group"])
    for step, ms in costs.items():
        parts.add(step, f"{ms:.1f}")
    report.tables += [live, sat, parts]
    report.raw = {"live": raw, "saturation": rates, "group_costs": costs}
    tower1, towern = costs["tower, 1 group per call"], costs[f"tower, {s.saturation_cameras} groups per call"]
    report.targets.append(Target(
        "ingest_scale", f"{s.saturation_cameras} cameras: batching across cameras",
        f">= {s.target_speedup:g}x the groups/s of per-camera encoding (tiny model, CPU)",
        f"{shared.fmt(1)} vs {alone.fmt(1)} groups/s: {speedup.fmt(2)}x", speedup.median >= s.target_speedup,
        "" if speedup.median >= s.target_speedup else
        f"batching only shrinks the tower's share: {tower1:.1f} -> {towern:.1f} ms per group here (its arithmetic, "
        f"linear in groups on a CPU), while preparing a group ({costs['prepare']:.1f} ms, PIL's bicubic resize) and "
        f"pruning it ({costs['memory.add (pruning)']:.1f} ms) cost the same per group either way; a tower that cost "
        f"nothing would give at most {(costs['prepare'] + costs['memory.add (pruning)'] + tower1) / (costs['prepare'] + costs['memory.add (pruning)']):.2f}x"))
    return finish(report, out_dir, started, load0)


if __name__ == "__main__":
    run_alone(__doc__, run, ScaleSettings)
