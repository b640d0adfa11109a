"""Ingest at Qwen2.5-VL-7B vision shapes on a GPU, printed as markdown tables.

`python -m bench.ingest_device [--size 7b|tiny] [--device cuda|cpu]` measures what
`bench.ingest_scale` measures on this project's CPU, where a 7B tower is out of reach:
- that the device paths equal the plain ones there: pixel rows prepared in torch on the device
  against numpy's, and the tower's tokens as loaded against transformers' own;
- the tower + merger per 448x448 frame pair at several batch sizes, as transformers runs it (a
  Python loop over attention windows, a Conv3d patch embedding) and as the families load it
  (stream/vlm/vision_attention.py, stream/vlm/patch_embed.py);
- preparing a group (resize, normalise, patchify): numpy on the host against torch on the device;
- synthetic cameras at 1 group/s each (2 fps sampling) through their real rolling encoders and
  EchoPrune memories and the model's one shared tower queue: groups/s landed, p95 ingest
  latency, drops, pruning ms per group; and from that the cameras one GPU keeps up with at 1 and
  2 fps sampling (landed >= 95% of offered, nothing dropped, p95 latency <= 1 s). The memories
  live on the model's device, in its dtype, as the pipeline keeps them;
- the host synchronizations (`pruning.host_sync.HostSyncs`: read-backs and blocking copies to the
  device) of preparing a group on the device, of a tower call and of the scene detector's verdict
  (on a GPU: none expected; on the CPU it counts host-side reads it cannot tell apart);
- each pruner's `TokenMemory.add` per group on the device and the host synchronizations it
  makes, and HieraVid's query-time ranking at half the memory, at 7B shapes.
The tower is random-init from Qwen2.5-VL-7B's published vision config (depth 32, hidden 1280, 16
heads, MLP 3420, window 112, full attention in blocks 7/15/23/31, merger to 3584) in bf16,
behind a one-layer LLM of the 7B width (ingest never runs the LLM); nothing is downloaded.
`--size tiny` is the tiny tower for a CPU smoke test. Nothing imported here may import PyAV: GPU
images do not have it.
"""
from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from pruning import FrameTokens, TokenMemory, get_pruner
from pruning.host_sync import HostSyncs
from stream.scenes import SceneDetector
from stream.vlm import patch_embed, vision_attention

from .common import DispatchedOps, Stat, Table, quiet, video_like_features
from .ingest_scale import ScaleSettings, camera_frames, drive, p95
from .ttft import TINY_VISION, LLMSize, build_sized

QWEN25_VL_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, hidden_act="silu",
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
SIDE = 448  # frames arrive at the tower's budget: 32x32 patches, 256 tokens per group


@dataclass(frozen=True)
class DeviceSize:
    vision: dict
    llm: LLMSize
    batches: tuple[int, ...]
    repeats: int
    cameras: tuple[int, ...]
    duration_s: float
    max_batch: int
    memory: tuple[int, int, int]  # the memory-on-device rows: grid side, capacity, groups streamed


SIZES = {
    "7b": DeviceSize(QWEN25_VL_7B_VISION, LLMSize("one-layer 7B-width", 3584, 1, 28, 4, 18944, 1024),
                     (1, 4, 16, 32), 10, (25, 50, 100, 150, 200), 20.0, 32, (16, 8192, 120)),
    "tiny": DeviceSize(TINY_VISION, LLMSize("toy", 64, 1, 4, 2, 128, 512), (1, 4), 2, (1, 2), 3.0, 8, (4, 96, 12)),
}
MEMORY_PRUNERS = ("echoprune", "moprune", "hieravid", "forestprune")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> Stat:
    fn()  # warm-up: kernels, plans, allocator
    ms = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ms.append((time.perf_counter() - t0) * 1e3)
    return Stat.of(ms)


def tower_rows(vlm, size: DeviceSize, t: Table) -> float:
    """Tower + merger per group, loop then batched attention, at each batch size; returns the
    largest difference between the two paths' tokens for a batch of 4 different groups,
    relative to the tokens' largest magnitude."""
    frames = camera_frames(0, SIDE, SIDE, n=2)
    prepared = vlm.prepare(frames)
    mixed = [vlm.prepare(camera_frames(k, SIDE, SIDE, n=2)) for k in range(4)]
    outputs = []
    for label in ("transformers' own (a loop over windows, a Conv3d)",
                  "as the families load it (one attention call per layer, a matmul patch embedding)"):
        if label.startswith("as the families"):
            vision_attention.install(vlm.model)
            patch_embed.install(vlm.model)
        outputs.append(torch.stack(vlm.encode_prepared(mixed)).float())
        for b in size.batches:
            ms = _timed(lambda: vlm.encode_prepared([prepared] * b), vlm.device, size.repeats)
            t.add(f"tower + merger, {label}", b, f"{ms.median / b:.1f}", ms.fmt(1), f"{1e3 * b / ms.median:.0f}")
    own, loaded = outputs
    return float((own - loaded).abs().max() / own.abs().max().clamp_min(1e-12))


def prepare_rows(vlm, size: DeviceSize, t: Table) -> float:
    """One group prepared: numpy on the host, then torch on the model's device; returns the
    largest difference between the two paths' pixel rows."""
    frames = camera_frames(1, 640, 480, n=2)
    rows = []
    for on_device in (False, True):
        vlm.preprocess_on_device = on_device
        ms = _timed(lambda: vlm.prepare(frames), vlm.device, size.repeats)
        where = f"torch on {vlm.device.type}" if on_device else "numpy on the host"
        t.add(f"prepare a 640x480 pair, {where}", 1, ms.fmt(1), ms.fmt(1), f"{1e3 / ms.median:.0f}")
        rows.append(torch.as_tensor(vlm.prepare(frames)[0]).float().cpu())
    return float((rows[0] - rows[1]).abs().max())


def ingest_syncs_table(vlm, size: DeviceSize, where: str) -> Table:
    """Host synchronizations (read-backs and blocking copies to the device, `HostSyncs`) of a
    group's path outside the memory, each step after a warm-up call: preparing a group on the
    device, a tower call as the families load it (a batch and a lone group), and the scene
    detector's verdict; with the operations each dispatches (a GPU's launches: a tower call's
    count hardly grows with its batch)."""
    frames = camera_frames(2, 640, 480, n=2)
    prepared = vlm.prepare(frames)
    batch = [prepared] * size.batches[-1]
    tokens = vlm.encode_prepared(batch)
    scenes = SceneDetector()
    steps = {"prepare a 640x480 pair on the device": lambda: vlm.prepare(frames),
             f"tower + merger as loaded, {len(batch)} groups": lambda: vlm.encode_prepared(batch),
             "tower + merger as loaded, 1 group": lambda: vlm.encode_prepared(batch[:1]),
             "scene detector, one group": lambda: scenes.update(FrameTokens(len(tokens), 0.0, tokens[0]))}
    t = Table(f"Host synchronizations on a group's path outside the memory ({where})",
              ["step", "host syncs", "which", "operations dispatched"])
    for step, fn in steps.items():
        fn()
        with HostSyncs() as counted, DispatchedOps() as dispatched:
            fn()
        t.add(step, counted.total, ", ".join(f"{k} x{n}" for k, n in sorted(counted.counts.items())) or "none",
              dispatched.count)
    return t


def memory_table(vlm, size: DeviceSize, where: str) -> Table:
    """TokenMemory.add per group (the last 15 timed; every fourth group is counted instead: its
    host syncs and the operations it dispatches) and HieraVid's rank_for_query at half the
    memory, also over a store of many segments (a question's DPP batches them), with every
    tensor on the model's device (float32 features)."""
    side, capacity, groups = size.memory
    d = vlm.hidden_size
    t = Table(f"Memory and pruners on the device ({where}): median (min-max) ms", ["measure", "groups per call",
                                                                                  "ms per group", "ms per call",
                                                                                  "host syncs per call",
                                                                                  "operations dispatched per call"])
    cpu_feats = list(video_like_features(side, side, d, groups))  # made on the host: its generator is a CPU one
    for name in MEMORY_PRUNERS:
        feats = [g.to(vlm.device) for g in cpu_feats]
        memory = TokenMemory(capacity, get_pruner(name), 4, evict_slack=capacity // 4, device=vlm.device)
        add_ms, syncs, late, ops = [], [], [], []
        for i, g in enumerate(feats):
            if i % 4 == 3:  # every fourth group counted, not timed: a dispatch mode costs Python per operation
                with HostSyncs() as counted, DispatchedOps() as dispatched:
                    memory.add(FrameTokens(i, float(i), g))
                syncs.append(counted.total)
                late.append(counted.late)
                ops.append(dispatched.count)
                continue
            _sync(vlm.device)
            t0 = time.perf_counter()
            memory.add(FrameTokens(i, float(i), g))
            _sync(vlm.device)
            add_ms.append((time.perf_counter() - t0) * 1e3)
        t.add(f"TokenMemory.add, {name}, capacity {capacity}, {side}x{side}x{d}", 1,
              Stat.of(add_ms[-15:]).fmt(1), "", f"{min(syncs[-4:])}-{max(syncs[-4:])}"
              + (f" (+{max(late[-4:])} read late)" if max(late[-4:]) else ""), f"{min(ops[-4:])}-{max(ops[-4:])}")
        if name == "hieravid":
            _rank_row(t, vlm, memory, size, "")
    many = TokenMemory(capacity, get_pruner("hieravid"), 4, evict_slack=capacity // 4, device=vlm.device)
    for i, g in enumerate(video_like_features(side, side, d, groups, cut_every=max(2, groups // 10))):
        many.add(FrameTokens(i, float(i), g.to(vlm.device)))
    _rank_row(t, vlm, many, size, ", a cut every tenth of the stream")
    return t


def _rank_row(t: Table, vlm, memory: TokenMemory, size: DeviceSize, label: str) -> None:
    """HieraVid's rank_for_query at half the memory, as a question's full path runs it (in place,
    then the picked rows): time, host syncs and operations dispatched, with the segments held."""
    held = len(memory)
    query = torch.randn(16, vlm.hidden_size, device=vlm.device)

    def rank() -> torch.Tensor:
        with memory.frozen() as view:
            return view.select(memory.pruner.rank_for_query(view, query, held // 2)).tokens

    ms = _timed(rank, vlm.device, size.repeats)
    with HostSyncs() as counted, DispatchedOps() as dispatched:
        rank()
    with memory.frozen() as view:
        segments = len(torch.unique(view.meta["segment"]))
    t.add(f"hieravid rank_for_query in place + picked rows, {held // 2} of {held} tokens, {segments} segment{'s' * (segments != 1)}{label}",
          1, ms.fmt(1), ms.fmt(1), counted.total, dispatched.count)


def cameras_table(vlm, size: DeviceSize, where: str) -> tuple[Table, int]:
    s = replace(ScaleSettings(), width=SIDE, height=SIDE, duration_s=size.duration_s, max_batch=size.max_batch)
    frames = int(size.duration_s * 2)
    t = Table(f"Synthetic cameras at 1 group/s each (2 fps), {size.duration_s:g} s, shared tower, {where}",
              ["cameras", "landed groups/s", "dropped groups", "latency median s", "latency p95 s", "mean batch",
               "prune ms/group", "keeps up"])
    best = 0
    for n in size.cameras:
        r = asyncio.run(drive(vlm, n, frames, live=True, shared=True, s=s))
        lat = r["latency"]
        rate = r["landed"] / size.duration_s
        ok = rate >= 0.95 * n and r["dropped"] == 0 and p95(lat) <= 1.0
        best = n if ok else best
        t.add(n, f"{rate:.1f}", r["dropped"], f"{np.median(lat):.2f}" if lat else "n/a", f"{p95(lat):.2f}",
              f"{r['mean_batch']:.1f}", f"{r['prune_ms']:.1f}", "yes" if ok else "no")
    return t, best


def measure(size: DeviceSize, device: str) -> Iterator[Table]:
    """The tables, each as soon as it is measured (a later one failing on a new device keeps the
    earlier ones)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        vlm = build_sized(size.llm, dtype, SIDE * SIDE, vision=size.vision)
    where = torch.cuda.get_device_name(vlm.device) if vlm.device.type == "cuda" else "CPU"
    label = "Qwen2.5-VL-7B" if size.vision is QWEN25_VL_7B_VISION else "tiny"
    t = Table(f"Ingest per group, {label} vision tower, {str(dtype).removeprefix('torch.')} on {where}: median "
              f"(min-max) of {size.repeats} runs", ["measure", "groups per call", "ms per group", "ms per call",
                                                   "groups/s"])
    with torch.inference_mode():
        prep_diff = prepare_rows(vlm, size, t)
        vlm.preprocess_on_device = vlm.device.type != "cpu"
        tower_diff = tower_rows(vlm, size, t)
    yield t
    same = Table(f"Equal paths on {where}", ["check", "largest difference"])
    same.add("pixel rows: torch on the device vs numpy on the host (the CPU tests find 0)", f"{prep_diff:.3g}")
    same.add("tower tokens, 4 groups: as loaded vs transformers' own, relative to the largest token "
             f"({str(dtype).removeprefix('torch.')})", f"{tower_diff:.3g}")
    yield same
    with torch.inference_mode():
        yield ingest_syncs_table(vlm, size, where)
    cams, best = cameras_table(vlm, size, where)
    yield cams
    cap = Table("Cameras one model keeps up with (landed >= 95% of offered, no drops, p95 ingest latency <= 1 s)",
                ["sampling", "groups/s per camera", "cameras"])
    cap.add("2 fps", 1, best if best else f"fewer than {size.cameras[0]}")
    cap.add("1 fps (from the 2 fps run: half the groups per camera)", 0.5, 2 * best if best else "n/a")
    yield cap
    with torch.inference_mode():
        yield memory_table(vlm, size, where)


def main(argv: Sequence[str] | None = None) -> list[Table]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="7b")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = p.parse_args(argv)
    quiet()
    tables = []
    for table in measure(SIZES[args.size], args.device):
        print(table.markdown(), flush=True)
        tables.append(table)
    return tables


if __name__ == "__main__":
    main()
