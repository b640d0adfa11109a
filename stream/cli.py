"""The `streamprune` command: `demo` (offline, synthetic camera), `run [CONFIG.toml] [--source
PATH_OR_URL]` and `pruners` (what each pruner is and takes).

One run: load the model once, start every camera (stream/camera.py) under one exit stack,
subscribe the sinks and front doors (MQTT, HTTP) to the cameras' bus, and wait until the run
ends: the streams end (no prompt, no front door), /quit or Ctrl-D at the prompt, or Ctrl-C /
SIGTERM. Every ending is clean: questions still waiting get `unavailable`, MQTT says
`offline`, the summary prints and the visuals are written; exit 0. A second Ctrl-C forces exit
130.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from . import preflight
from .config import Config, load_config
from .errors import ConfigError, Error
from .interactive import Session
from .supervisor import FAILED, Supervisor
from .preflight import one_line

log = logging.getLogger("streamprune")

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.toml"
FORCED_EXIT = 130
END_OF_STREAM_S = 1e9  # a `--ask` question's at_s: asked when the stream ends
DEFAULT_HTTP = "127.0.0.1:8080"


def package_version() -> str:
    try:
        return version("streamprune")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _camera_name(target: str) -> str:
    """A camera name for a `--source` with no config: the file's stem or the stream's host."""
    stem = re.sub(r"^[a-z]+://([^@/]*@)?", "", target, flags=re.IGNORECASE)
    stem = Path(stem.split("/")[0] if "://" in target else stem).stem or stem
    return re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-") or "camera"


def _http_table(value: str) -> dict:
    """`--http [HOST:]PORT` as an `[http]` table."""
    host, _, port = value.rpartition(":")
    if not port.isdigit():
        raise ConfigError(f"{value!r} is not [HOST:]PORT, e.g. 8080 or 127.0.0.1:8080", "--http")
    return {"enabled": True, "port": int(port), **({"host": host.strip("[]")} if host else {})}


def _overrides(args: argparse.Namespace) -> dict:
    from .sources.registry import table_for

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
    source = getattr(args, "source", None)
    if source is not None:
        over["source"] = table_for(source)
        if getattr(args, "config", None) is None:
            over["name"] = _camera_name(source)
    if getattr(args, "http", None) is not None:
        over["http"] = _http_table(args.http)
    if getattr(args, "ask", None):
        over["questions"] = [{"text": text, "at_s": END_OF_STREAM_S} for text in args.ask]
    return over


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
    from sinks.console import ConsoleSink, format_status
    from sinks.jsonl import JsonlSink
    from sinks.visuals import VisualsSink

    from .bus import Bus
    from .camera import Camera
    from .encode_scheduler import EncodeScheduler
    from .vlm.registry import load_model

    m = cfg.model
    print(f"streamprune: loading {m.name} ({m.dtype}, {m.device}) ...", flush=True)
    vlm = await asyncio.to_thread(load_model, m.name, m.dtype, m.device, m.max_pixels)
    if vlm.random_weights:
        print(f"NOTE: {m.name} has RANDOM weights: its answers are noise. It shows the pipeline works; "
              "for real answers use --model Qwen/Qwen2.5-VL-3B-Instruct or a local checkpoint path.", flush=True)
    configs = cfg.camera_configs()
    bus = Bus([ConsoleSink(named=len(configs) > 1)] + ([JsonlSink(cfg.output.jsonl)] if cfg.output.jsonl else []))
    tower = EncodeScheduler(vlm, m.encode_batch)  # one queue for the model: every camera's groups batched
    cameras = {c.name: Camera(c, vlm, bus, tower) for c in configs}
    visuals = [VisualsSink(c.name, Path(c.output.visuals_dir), cameras[c.name].memory_map)
               for c in configs if c.output.visuals_dir]
    for sink in visuals:
        bus.subscribe(sink)
    mqtt = http = None
    if cfg.mqtt.enabled:
        from sinks.mqtt.service import MqttService

        mqtt = MqttService(cfg.mqtt, cameras)
        bus.subscribe(mqtt)
    if cfg.http.enabled:
        from sinks.http.service import HttpService

        http = HttpService(cfg.http, cameras, package_version())
        bus.subscribe(http)
    if len(cameras) > 1:
        print(f"vision tower: shared by {len(cameras)} cameras, up to {m.encode_batch} groups per call", flush=True)
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
            session = Session(cameras, format_status) if interactive else None
            doors = [name for name, door in (("MQTT", mqtt), ("HTTP", http)) if door is not None]
            ends = [stop.wait(), _until_done(cameras, session, doors)]
            if http is not None:
                await http.start()
                serving = services.start("http", http.run)
                stack.push_async_callback(_stopped, serving)
                stack.push_async_callback(http.close)
                ends.append(_failed_for_good(services, "http", _nothing))
                print(f"HTTP: web page and API on {http.url}", flush=True)
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
        await asyncio.to_thread(tower.close)
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


async def _nothing() -> None:
    """No last words: HTTP clients see the connection refused."""


async def _stopped(task: asyncio.Task) -> None:
    """Wait for a service task that was told to stop (it ends by itself after `close()`)."""
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _until_done(cameras: dict, session: Session | None, doors: list[str]) -> None:
    """Until the run has nothing more to do: /quit or Ctrl-D at the prompt; with a front door
    (MQTT, HTTP), never (a signal ends it); otherwise the end of every stream and its scripted
    questions."""
    prompt = asyncio.create_task(session.run()) if session is not None else None
    try:
        streams = asyncio.gather(*(c.done() for c in cameras.values()))
        if prompt is not None:
            await _first(prompt, _announce(streams, "stream ended; the memory still answers questions (/quit to stop)."))
            return
        await streams
        if doors and all(c.error is not None for c in cameras.values()):
            print("every camera failed; stopping.", file=sys.stderr, flush=True)  # the front doors can do no more
            return
        if doors:
            print(f"stream ended; still answering over {' and '.join(doors)} until SIGTERM or Ctrl-C.", flush=True)
            await asyncio.Event().wait()
    finally:
        if prompt is not None:
            prompt.cancel()
            await asyncio.gather(prompt, return_exceptions=True)


async def _announce(aw, message: str) -> None:
    await aw
    print(message, flush=True)
    await asyncio.Event().wait()


def pruners_text() -> str:
    """Every pruner with its paper, what it does, and its parameters with defaults and ranges."""
    import pruning
    from pruning.base import describe_range

    lines = []
    for name in pruning.PRUNERS:
        cls = pruning.pruner_class(name)
        summary = " ".join((cls.__doc__ or "").split("\n\n")[0].split())
        lines += [f"{name}", f"  {cls.paper}", f"  {summary}"]
        ranges = pruning.pruner_param_ranges(name)
        params = pruning.pruner_params(name)
        for key, default in params.items():
            lo, hi = ranges.get(key, (None, None))
            lines.append(f"    {key} = {default!r}  ({describe_range(lo, hi)})")
        if not params:
            lines.append("    (no parameters)")
    lines.append("Choose one with --pruner NAME or [memory] pruner = \"NAME\"; set parameters in [memory.params]. "
                 "A model family applies its papers' values where they differ (EchoPrune on LLaVA-OneVision: "
                 "tau 0.1, radius 1); a value the config sets wins.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamprune", description="Ask questions about live video from a bounded, pruned token memory.")
    p.add_argument("--version", action="version", version=f"streamprune {package_version()}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("pruners", help="list the pruners: papers, parameters and defaults")
    for name, help_ in (("demo", "offline demo: a synthetic camera, three questions, a summary"),
                        ("run", "run a camera (--source) or the pipeline a config describes")):
        sp = sub.add_parser(name, help=help_)
        if name == "run":
            sp.add_argument("config", nargs="?", help="pipeline config (TOML), e.g. configs/file.toml; optional with --source")
            sp.add_argument("--source", metavar="PATH_OR_URL",
                            help="a video file, an rtsp:// URL or a webcam (/dev/video0); replaces the config's source")
            sp.add_argument("--ask", action="append", metavar="QUESTION",
                            help="ask this when the stream ends (repeatable; replaces the config's questions)")
            sp.add_argument("--interactive", action=argparse.BooleanOptionalAction, default=None,
                            help="read questions from the terminal while streaming (default: when stdin is a terminal)")
        else:
            sp.add_argument("--config", default=str(DEMO_CONFIG), help="demo config (default: configs/demo.toml)")
        sp.add_argument("--http", nargs="?", const=DEFAULT_HTTP, metavar="[HOST:]PORT",
                        help=f"serve the web page and HTTP APIs (default {DEFAULT_HTTP})")
        sp.add_argument("--model", help="hub id or local path of a checkpoint (default from config: tiny-random)")
        sp.add_argument("--dtype", help="float32, bfloat16 or float16")
        sp.add_argument("--device", help="torch device, e.g. cpu or cuda")
        sp.add_argument("--pruner", help="pruner name (its params reset to defaults); `streamprune pruners` lists them")
        sp.add_argument("--visuals", help="directory for the memory's contact sheet and timeline PNGs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "pruners":
        print(pruners_text())
        return 0
    if args.command == "run" and args.config is None and args.source is None:
        print("streamprune: run needs a config file or --source PATH_OR_URL (e.g. streamprune run --source clip.mp4)",
              file=sys.stderr)
        return 2
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
