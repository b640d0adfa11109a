"""Benchmark of the source layer alone (no model): decode + sample cost per frame, and the
sustained frame rate of a live RTSP camera, for 640x480 and 1280x720 H.264 at 30 fps.

- decode+sample: a 10 s H.264 clip read as fast as possible through FileSource (PyAV decode and
  RGB conversion in the reader thread, hand-off to asyncio) and the sampler (`every`, 2 fps);
  wall ms and CPU ms per decoded frame, and the frame rate that is the ceiling of the layer.
  "bare PyAV" is the same decode + RGB conversion in a plain loop, for the layer's overhead.
- live: the same clip served in real time by tests/rtsp_server.py (GStreamer, /clip: demux and
  RTP only, so the server costs little) and read by RtspSource through the `latest` sampler;
  the frames per second the source delivered over a steady window, and the CPU it took.

Medians over repeats with [min, max]. Prints a table and writes bench/results/sources.md.
Run: .venv/bin/python bench/bench_sources.py [--repeats 5] [--live-repeats 3]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream.sampler import Sampler  # noqa: E402
from stream.sources import FileSource, RtspSource  # noqa: E402
from stream.sources.synthetic import SyntheticSource  # noqa: E402

SIZES = ((640, 480), (1280, 720))
FPS = 30
SECONDS = 10
SERVER = ROOT / "tests" / "rtsp_server.py"


def make_clip(path: Path, w: int, h: int) -> None:
    """A 10 s textured scene (the synthetic camera) as H.264 MP4, as a camera would send it."""
    scene = SyntheticSource(duration_s=SECONDS, fps=FPS, width=w, height=h, seed=3)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "ultrafast", "tune": "zerolatency", "g": str(FPS)}
        for i in range(SECONDS * FPS):
            frame = av.VideoFrame.from_ndarray(scene.render(i / FPS), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def bare_decode(path: Path) -> tuple[float, float, int]:
    """(wall s, cpu s, frames) of PyAV decode + RGB conversion in a plain loop."""
    wall, cpu = time.perf_counter(), time.process_time()
    n = 0
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frame.to_ndarray(format="rgb24")
            n += 1
    return time.perf_counter() - wall, time.process_time() - cpu, n


async def layer_decode(path: Path) -> tuple[float, float, int, int]:
    """(wall s, cpu s, frames decoded, frames sampled) through FileSource and the sampler."""
    wall, cpu = time.perf_counter(), time.process_time()
    sampler = Sampler(FileSource(path), fps=2.0, policy="every")
    sampled = 0
    async for _ in sampler:
        sampled += 1
    return time.perf_counter() - wall, time.process_time() - cpu, sampler.stats.frames_in, sampled


async def live(url: str, warmup_s: float = 1.0, window_s: float = 4.0) -> tuple[float, float, int, int]:
    """(fps delivered, cpu ms per frame, frames sampled, dropped) over a steady window."""
    source = RtspSource(url, stall_timeout_s=5)
    sampler = Sampler(source, fps=2.0, policy="latest")
    marks: dict[str, tuple[float, float, int]] = {}

    async def consume() -> None:
        async for _ in sampler:
            pass

    task = asyncio.create_task(consume())
    try:
        while source.stats.frames == 0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(warmup_s)
        marks["a"] = (time.perf_counter(), time.process_time(), source.stats.frames)
        await asyncio.sleep(window_s)
        marks["b"] = (time.perf_counter(), time.process_time(), source.stats.frames)
    finally:
        source.close()
        await asyncio.wait_for(task, 10)
    (w0, c0, f0), (w1, c1, f1) = marks["a"], marks["b"]
    frames = f1 - f0
    return frames / (w1 - w0), (c1 - c0) * 1e3 / max(frames, 1), sampler.stats.frames_out, sampler.stats.dropped


def start_server(clip: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(["/usr/bin/python3", str(SERVER), "--port", "0", "--clip", str(clip)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = proc.stdout.readline().decode().split()
    if len(line) != 2 or line[0] != "READY":
        proc.kill()
        raise SystemExit("the RTSP server did not start: run `make system-deps` (GStreamer, python3-gi)")
    return proc, int(line[1])


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--live-repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sources.md")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w, h in SIZES:
            clip = Path(tmp) / f"clip-{w}x{h}.mp4"
            make_clip(clip, w, h)
            bare = [bare_decode(clip) for _ in range(args.repeats)]
            layer = [asyncio.run(layer_decode(clip)) for _ in range(args.repeats)]
            proc, port = start_server(clip)
            try:
                runs = [asyncio.run(live(f"rtsp://127.0.0.1:{port}/clip")) for _ in range(args.live_repeats)]
            finally:
                proc.terminate()
                proc.wait(10)
            n = layer[0][2]
            rows.append({
                "size": f"{w}x{h}",
                "frames": n,
                "bare_ms": spread([b[0] * 1e3 / b[2] for b in bare]),
                "layer_ms": spread([r[0] * 1e3 / r[2] for r in layer]),
                "layer_cpu_ms": spread([r[1] * 1e3 / r[2] for r in layer]),
                "layer_fps": spread([r[2] / r[0] for r in layer], "{:.0f}"),
                "sampled": layer[0][3],
                "live_fps": spread([r[0] for r in runs], "{:.1f}"),
                "live_cpu_ms": spread([r[1] for r in runs]),
                "live_cpu_pct": spread([r[0] * r[1] / 10 for r in runs], "{:.0f}"),
            })

    header = ("| stream | bare PyAV decode+RGB ms/frame | source+sampler ms/frame (wall) | CPU ms/frame | "
              "max sustained fps | live RTSP fps delivered | live CPU ms/frame | live CPU % of one core |")
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['size']} @ {FPS} fps | {r['bare_ms']} | {r['layer_ms']} | {r['layer_cpu_ms']} | "
                     f"{r['layer_fps']} | {r['live_fps']} | {r['live_cpu_ms']} | {r['live_cpu_pct']} |")
    table = "\n".join(lines)
    print(table)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
               f"{platform.python_version()}, PyAV {av.__version__} (FFmpeg {av.ffmpeg_version_info}), "
               f"numpy {np.__version__}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# Source layer benchmark\n\n"
        f"`bench/bench_sources.py`; {machine}. Medians over {args.repeats} repeats (live: "
        f"{args.live_repeats} windows of 4 s after 1 s warm-up), [min, max].\n\n"
        f"{table}\n\n"
        f"- Clips: {SECONDS} s of the synthetic textured scene, H.264 (x264 ultrafast, zerolatency, "
        f"GOP {FPS}), {rows[0]['frames']} frames; the sampler keeps 2 fps ({rows[0]['sampled']} frames).\n"
        "- source+sampler: FileSource as fast as it decodes (reader thread, asyncio hand-off) through "
        "the `every` sampler; max sustained fps = frames / wall time, the ceiling of the layer.\n"
        "- live: the same clip served in real time over RTSP/TCP by the GStreamer test server "
        "(demux + RTP only), read by RtspSource through the `latest` sampler; CPU is this process "
        "(decode thread + event loop), not the server.\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
