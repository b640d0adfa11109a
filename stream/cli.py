"""The `streamprune` command: `demo` (offline, synthetic camera) and `run CONFIG.toml`.

One run: load the model once, start every camera (stream/camera.py) under one exit stack,
subscribe the sinks and front doors to the cameras' bus, and wait until the run ends: the
streams end (no prompt, no MQTT), Ctrl-D at the prompt, or Ctrl-C / SIGTERM. Every ending is
clean: questions still waiting get `unavailable`, MQTT says `offline`, the summary prints and
the visuals are written; exit 0. A second Ctrl-C forces exit 130.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from . import preflight
from .config import Config, load_config
from .errors import ConfigError, Error
from .events import Question
from .supervisor import FAILED, Supervisor
from .preflight import one_line

log = logging.getLogger("streamprune")

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.toml"
FORCED_EXIT = 130


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


async def _interactive(cameras: dict) -> None:
    """Questions typed at the terminal until Ctrl-D, answered while the streams keep flowing.
    With several cameras, `name: question` asks one of them; a plain question asks every camera."""
    queue: asyncio.Queue = asyncio.Queue()
    threading.Thread(target=_stdin_lines, args=(asyncio.get_running_loop(), queue), daemon=True).start()
    hint = f" Prefix a camera name to ask one camera ({', '.join(cameras)})." if len(cameras) > 1 else ""
    print(f"Type a question and press Enter (Ctrl-D to quit).{hint}", flush=True)
    while (line := await queue.get()) is not None:
        name, _, rest = line.partition(":")
        if rest.strip() and name.strip() in cameras:
            targets, question = [cameras[name.strip()]], rest
        else:
            targets, question = list(cameras.values()), line
        if question.strip():
            for camera in targets:
                with contextlib.suppress(Error):  # refused: the console sink printed why
                    await camera.ask(Question(question, origin="cli"))


def _summary_line(s: dict) -> str:
    return (
        f"summary: frames in {s['frames_in']}, dropped {s['dropped']}, groups encoded {s['groups_encoded']}, "
        f"tokens kept {s['tokens_kept']} / seen {s['tokens_seen']}, encoder {s['encode_ms_per_group']:.1f} ms/group, "
        f"prune {s['prune_ms_per_group']:.2f} ms/group, answers {s['answers']}, wall {s['wall_s']:.1f} s"
    )


def _stop_on_signals(stop: asyncio.Event) -> None:
    """The first SIGINT or SIGTERM asks for a clean stop; a second one forces exit 130."""
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            print(f"\n{sig.name} again: exiting now", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(FORCED_EXIT)
        print(f"\n{sig.name}: stopping (again to force)", file=sys.stderr, flush=True)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


async def _first(*aws) -> None:
    """Until the first of `aws` completes; the others are cancelled."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_pipeline(cfg: Config, interactive: bool) -> int:
    """Load the model once, run every camera until the run ends, stop cleanly, summarise."""
    from sinks.console import ConsoleSink
    from sinks.jsonl import JsonlSink
    from sinks.visuals import VisualsSink

    from .bus import Bus
    from .camera import Camera
    from .vlm.registry import load_model

    m = cfg.model
    print(f"streamprune: loading {m.name} ({m.dtype}, {m.device}) ...", flush=True)
    vlm = await asyncio.to_thread(load_model, m.name, m.dtype, m.device, m.max_pixels)
    if vlm.random_weights:
        print(f"NOTE: {m.name} has RANDOM weights: its answers are noise. It shows the pipeline works; "
              "for real answers use --model Qwen/Qwen2.5-VL-3B-Instruct or a local checkpoint path.", flush=True)
    configs = cfg.camera_configs()
    bus = Bus([ConsoleSink(named=len(configs) > 1)] + ([JsonlSink(cfg.output.jsonl)] if cfg.output.jsonl else []))
    cameras = {c.name: Camera(c, vlm, bus) for c in configs}
    visuals = [VisualsSink(c.name, Path(c.output.visuals_dir), cameras[c.name].memory_map)
               for c in configs if c.output.visuals_dir]
    for sink in visuals:
        bus.subscribe(sink)
    mqtt = None
    if cfg.mqtt.enabled:
        from sinks.mqtt.service import MqttService

        mqtt = MqttService(cfg.mqtt, cameras)
        bus.subscribe(mqtt)
    for c in configs:
        print(f"camera {c.name}: {c.source.kind} source, sampled at {c.sampler.fps:g} fps, pruner {c.memory.pruner}, "
              f"capacity {c.memory.capacity} tokens + {c.memory.recent_groups} recent groups", flush=True)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    services = Supervisor("streamprune")  # the front doors' own tasks (cameras supervise theirs)
    try:
        async with contextlib.AsyncExitStack() as stack:
            for camera in cameras.values():
                await stack.enter_async_context(camera)
            ends = [stop.wait(), _until_done(cameras, interactive, mqtt is not None)]
            if mqtt is not None:
                serving = services.start("mqtt", mqtt.run)
                stack.push_async_callback(_stopped, serving)
                stack.push_async_callback(mqtt.close)
                ends.append(_failed_for_good(services, "mqtt", mqtt.say_offline))
                m = cfg.mqtt
                print(f"MQTT: serving {', '.join(cameras)} on {m.host}:{m.port}, topics {m.prefix}/<camera>/...", flush=True)
            await _first(*ends)
        for camera in cameras.values():
            print(f"[{camera.name}] " * (len(cameras) > 1) + _summary_line(camera.summary()), flush=True)
    finally:
        await bus.close()
    for sink in visuals:
        for path in sink.written:
            print(f"wrote {path}", flush=True)
    failed = [c for c in cameras.values() if c.error is not None]  # ingest failed for good; a stop is no failure
    for camera in failed:
        print(f"camera {camera.name} stopped: {camera.error}", file=sys.stderr, flush=True)
    return 1 if (failed and len(failed) == len(cameras)) or services.failed else 0


async def _failed_for_good(services: Supervisor, name: str, last_words) -> None:
    """Returns (ending the run) only if the supervised service `name` gave up; `last_words()`
    then tells its clients (MQTT: `offline`, which a clean disconnect would not send)."""
    state = await services.wait(name)
    if state.state == FAILED:
        print(f"streamprune: {name} failed for good: {state.last_error}; stopping", file=sys.stderr, flush=True)
        await last_words()
    else:
        await asyncio.Event().wait()


async def _stopped(task: asyncio.Task) -> None:
    """Wait for a service task that was told to stop (it ends by itself after `close()`)."""
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _until_done(cameras: dict, interactive: bool, serving: bool) -> None:
    """Until the run has nothing more to do: Ctrl-D at the prompt; with MQTT, never (a signal
    ends it); otherwise the end of every stream and its scripted questions."""
    prompt = asyncio.create_task(_interactive(cameras)) if interactive else None
    try:
        streams = asyncio.gather(*(c.done() for c in cameras.values()))
        if prompt is not None:
            await _first(prompt, _announce(streams, "stream ended; the memory still answers questions (Ctrl-D to quit)."))
            return
        await streams
        if serving and all(c.error is not None for c in cameras.values()):
            print("every camera failed; stopping.", file=sys.stderr, flush=True)  # MQTT can do no more
            return
        if serving:
            print("stream ended; still answering over MQTT until SIGTERM or Ctrl-C.", flush=True)
            await asyncio.Event().wait()
    finally:
        if prompt is not None:
            prompt.cancel()
            await asyncio.gather(prompt, return_exceptions=True)


async def _announce(aw, message: str) -> None:
    await aw
    print(message, flush=True)
    await asyncio.Event().wait()


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
        sp.add_argument("--model", help="hub id or local path of a checkpoint (default from config: tiny-random)")
        sp.add_argument("--dtype", help="float32, bfloat16 or float16")
        sp.add_argument("--device", help="torch device, e.g. cpu or cuda")
        sp.add_argument("--pruner", help="pruner name (its params reset to defaults)")
        sp.add_argument("--visuals", help="directory for the memory's contact sheet and timeline PNGs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, _overrides(args))
        preflight.check(cfg)
        from transformers.utils import logging as hf_logging  # after the cheap checks: a mistake is told at once

        hf_logging.disable_progress_bar()
        preflight.check_memory_fits(cfg)
    except Error as e:
        log.info("config check failed", exc_info=True)
        print(f"streamprune: config error: {one_line(e)}", file=sys.stderr)
        return 2
    interactive = getattr(args, "interactive", False)
    if interactive is None:
        interactive = sys.stdin.isatty()
    try:
        return asyncio.run(run_pipeline(cfg, interactive))
    except KeyboardInterrupt:
        return FORCED_EXIT
    except ConfigError as e:  # found once the model is loaded (the prompt cache's limit against its KV size)
        print(f"streamprune: config error: {one_line(e)}", file=sys.stderr)
        return 2
    except (Error, OSError, ValueError) as e:
        if args.verbose:
            raise
        print(f"streamprune: {one_line(e)} (run with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
