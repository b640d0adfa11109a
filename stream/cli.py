"""The `streamprune` command: `demo` (offline, synthetic camera) and `run CONFIG.toml`."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from pathlib import Path

from .config import Config, ConfigError, load_config

log = logging.getLogger("streamprune")

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.toml"


def _overrides(args: argparse.Namespace) -> dict:
    over: dict = {}
    for key, section, field in (("model", "model", "name"), ("dtype", "model", "dtype"),
                                ("device", "model", "device"), ("pruner", "memory", "pruner")):
        value = getattr(args, key, None)
        if value is not None:
            over.setdefault(section, {})[field] = value
    if getattr(args, "pruner", None) is not None:
        over["memory"]["params"] = {}
    if getattr(args, "visuals", None) is not None:
        over.setdefault("output", {})["visuals_dir"] = args.visuals
    return over


def _stdin_lines(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
    """Daemon thread: hand stdin lines to the loop; None at EOF."""
    for line in sys.stdin:
        loop.call_soon_threadsafe(queue.put_nowait, line.rstrip("\n"))
    loop.call_soon_threadsafe(queue.put_nowait, None)


async def _interactive(pipelines: dict) -> None:
    """Questions typed at the terminal, answered while the streams keep flowing. With several
    cameras, `name: question` asks one of them; a plain question asks every camera."""
    queue: asyncio.Queue = asyncio.Queue()
    threading.Thread(target=_stdin_lines, args=(asyncio.get_running_loop(), queue), daemon=True).start()
    hint = f" Prefix a camera name to ask one camera ({', '.join(pipelines)})." if len(pipelines) > 1 else ""
    print(f"Type a question and press Enter (Ctrl-D to quit).{hint}", flush=True)
    while (line := await queue.get()) is not None:
        name, _, rest = line.partition(":")
        targets = [pipelines[name.strip()]] if rest.strip() and name.strip() in pipelines else list(pipelines.values())
        question = rest if len(targets) == 1 and name.strip() in pipelines else line
        if question.strip():
            for pipeline in targets:
                await pipeline.ask_or_report(question)


def _summary_line(s: dict) -> str:
    return (
        f"summary: frames in {s['frames_in']}, dropped {s['dropped']}, groups encoded {s['groups_encoded']}, "
        f"tokens kept {s['tokens_kept']} / seen {s['tokens_seen']}, encoder {s['encode_ms_per_group']:.1f} ms/group, "
        f"prune {s['prune_ms_per_group']:.2f} ms/group, wall {s['wall_s']:.1f} s"
    )


def _start_mqtt(cfg: Config, pipelines: dict, fan):
    """With `[mqtt] enabled`: the cameras served over MQTT (also a sink of the pipelines' records),
    its task, and an event SIGTERM/SIGINT set for a clean stop. (None, None, None) otherwise."""
    if not cfg.mqtt.enabled:
        return None, None, None
    from sinks.base import FanOut
    from sinks.mqtt import MqttService

    service = MqttService(cfg.mqtt, pipelines, cfg.watches, on_record=FanOut(list(fan.sinks)).emit)
    fan.sinks.append(service)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    m = cfg.mqtt
    print(f"MQTT: serving {', '.join(pipelines)} on {m.host}:{m.port}, topics {m.prefix}/<camera>/...", flush=True)
    return service, asyncio.create_task(service.run()), stop


async def _until(work, stop: asyncio.Event | None) -> None:
    """Await `work`; when `stop` is set first, cancel it."""
    if stop is None:
        await work
        return
    task, stopped = asyncio.create_task(work), asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        stopped.cancel()
        await asyncio.gather(task, stopped, return_exceptions=True)
    if not task.cancelled() and task.exception() is not None:
        raise task.exception()


async def _camera(pipeline, named: bool) -> None:
    """One camera to the end of its stream: scripted questions, summary, pictures."""
    cfg = pipeline.cfg
    status = asyncio.create_task(pipeline.report_status(cfg.output.status_interval_s))
    scripted = asyncio.create_task(pipeline.scripted_questions())
    try:
        await pipeline.run()
        await scripted
    finally:
        for t in (status, scripted):
            t.cancel()
        await asyncio.gather(status, scripted, return_exceptions=True)
    print(f"[{pipeline.name}] " * named + _summary_line(pipeline.summary()), flush=True)
    if cfg.output.visuals_dir:
        from .visuals import write_visuals

        for path in write_visuals(pipeline.memory, Path(cfg.output.visuals_dir)):
            print(f"wrote {path}", flush=True)


async def run_pipeline(cfg: Config, interactive: bool) -> int:
    """Load the model once, run every camera to the end of its stream, answer, summarise."""
    from sinks.base import FanOut
    from sinks.console import ConsoleSink
    from sinks.jsonl import JsonlSink

    from .pipeline import CameraPipeline
    from .vlm.qwen import QwenVL

    m = cfg.model
    print(f"streamprune: loading {m.name} ({m.dtype}, {m.device}) ...", flush=True)
    vlm = await asyncio.to_thread(QwenVL.load, m.name, m.dtype, m.device, m.max_pixels)
    if vlm.random_weights:
        print(f"NOTE: {m.name} has RANDOM weights: its answers are noise. It shows the pipeline works; "
              "for real answers use --model Qwen/Qwen2.5-VL-3B-Instruct or a local checkpoint path.", flush=True)
    fan = FanOut([ConsoleSink()] + ([JsonlSink(cfg.output.jsonl)] if cfg.output.jsonl else []))
    pipelines = {c.name: CameraPipeline(c, vlm, emit=fan.emit) for c in cfg.camera_configs()}
    for c in cfg.camera_configs():
        print(f"camera {c.name}: {c.source.kind} source, sampled at {c.sampler.fps:g} fps, pruner {c.memory.pruner}, "
              f"capacity {c.memory.capacity} tokens + {c.memory.recent_groups} recent groups", flush=True)
    prompt = asyncio.create_task(_interactive(pipelines)) if interactive else None
    service, serving, stop = _start_mqtt(cfg, pipelines, fan)

    async def stream() -> None:
        results = await asyncio.gather(*(_camera(p, len(pipelines) > 1) for p in pipelines.values()),
                                       return_exceptions=True)
        for name, r in zip(pipelines, results):
            if isinstance(r, Exception):
                log.error("camera %s stopped: %s", name, r, exc_info=r)
                print(f"camera {name} stopped: {r}", file=sys.stderr, flush=True)
        if prompt is not None:
            print("stream ended; the memory still answers questions.", flush=True)
            await prompt
        if service is not None:
            print("stream ended; still answering over MQTT until SIGTERM or Ctrl-C.", flush=True)
            await asyncio.Event().wait()
        if len(results) == 1 and isinstance(results[0], Exception):
            raise results[0]

    try:
        await _until(stream(), stop)
    finally:
        if prompt is not None:
            prompt.cancel()
            await asyncio.gather(prompt, return_exceptions=True)
        for pipeline in pipelines.values():
            pipeline.close()
        await fan.close()
        if serving is not None:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamprune", description="Ask questions about live video from a bounded, pruned token memory.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("demo", "offline demo: a synthetic camera, three questions, a summary"),
                        ("run", "run the pipeline a config describes")):
        sp = sub.add_parser(name, help=help_)
        if name == "run":
            sp.add_argument("config", help="pipeline config (TOML), e.g. configs/file.toml")
            sp.add_argument("--interactive", action=argparse.BooleanOptionalAction, default=None,
                            help="read questions from the terminal while streaming (default: when stdin is a terminal)")
        else:
            sp.add_argument("--config", default=str(DEMO_CONFIG), help="demo config (default: configs/demo.toml)")
        sp.add_argument("--model", help="hub id or local path of a Qwen2.5-VL checkpoint (default from config: tiny-random)")
        sp.add_argument("--dtype", help="float32, bfloat16 or float16")
        sp.add_argument("--device", help="torch device, e.g. cpu or cuda")
        sp.add_argument("--pruner", help="pruner name (its params reset to defaults)")
        sp.add_argument("--visuals", help="directory for the memory's contact sheet and timeline PNGs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        cfg = load_config(args.config, _overrides(args))
    except ConfigError as e:
        print(f"streamprune: config error: {e}", file=sys.stderr)
        return 2
    interactive = getattr(args, "interactive", False)
    if interactive is None:
        interactive = sys.stdin.isatty()
    try:
        return asyncio.run(run_pipeline(cfg, interactive))
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError) as e:
        if args.verbose:
            raise
        print(f"streamprune: {e} (run with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
