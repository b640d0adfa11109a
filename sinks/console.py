"""Console sink: answers, errors and watch events on stdout, status and source lines on stderr."""
from __future__ import annotations

import sys
import unicodedata
from typing import TextIO

from stream.bus import Sink
from stream.events import Answer, Event, RequestFailed, SourceState, Status, WatchFired


def printable(text: str) -> str:
    """Control characters (a random-weight model emits them) shown as U+FFFD, not executed."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else "\ufffd" for c in text)


def format_answer(a: Answer) -> str:
    return (
        f"Q: {printable(a.question)}\n"
        f"A: {printable(a.text) or '(empty answer)'}\n"
        f"   ttft {a.ttft_s * 1e3:.0f} ms, total {a.total_s * 1e3:.0f} ms, "
        f"prefilled {a.prefilled_tokens} of {a.prompt_tokens} prompt tokens ({a.prompt_path}), "
        f"{a.tokens_used} visual tokens from {a.groups} groups "
        f"covering {a.t_start:.1f}-{a.t_end:.1f} s (memory {a.memory_tokens} tokens)"
    )


def format_status(s: Status) -> str:
    last = f", last answer {s.last_answer_s:.2f} s" if s.last_answer_s is not None else ""
    src = s.source
    age = src.get("last_frame_age_s")
    source = f", source {src.get('state')}" + (f" (last frame {age:.1f} s ago)" if age is not None and age >= 2 else "")
    cache = f", prompt cache {s.prompt_cache['tokens']} tokens" if s.prompt_cache else ""
    return (
        f"[{s.camera}] t={s.stream_s:.1f}s in {s.fps_in:.1f} fps, out {s.fps_out:.1f} fps, "
        f"dropped {s.dropped}, memory {s.memory_tokens} tokens, "
        f"enc {s.encode_ms:.0f} ms/group, prune {s.prune_ms:.1f} ms/group, backlog {s.backlog}{last}{cache}{source}"
        + "".join(format_task(name, t) for name, t in s.tasks.items() if t.get("failures"))
    )


def format_task(name: str, t: dict) -> str:
    """A supervised task that has failed, so a crash shows on the status line (else nothing); the
    error itself is logged when it happens and `status()` carries it."""
    return f", task {name} {t['state']} ({t['failures']} failure(s), {t['restarts']} restart(s))"


class ConsoleSink(Sink):
    """`named`: prefix answers and errors with the camera's name (several cameras in one run)."""

    name = "console"

    def __init__(self, out: TextIO | None = None, status_out: TextIO | None = None, named: bool = False):
        self.out = out
        self.status_out = status_out
        self.named = named

    async def handle(self, event: Event) -> None:
        out = self.out or sys.stdout
        tag = f"[{getattr(event, 'camera', '')}] " if self.named else ""
        if isinstance(event, Answer):
            print(tag + format_answer(event), file=out, flush=True)
        elif isinstance(event, RequestFailed):
            print(f"{tag}error ({event.code}): {printable(event.message)}", file=out, flush=True)
        elif isinstance(event, WatchFired):
            print(f"{tag}watch {event.watch!r} fired: {printable(event.answer)} "
                  f"({event.t_start:.1f}-{event.t_end:.1f} s)", file=out, flush=True)
        elif isinstance(event, Status):
            print(format_status(event), file=self.status_out or sys.stderr, flush=True)
        elif isinstance(event, SourceState):
            error = event.health.get("last_error")
            print(f"[{event.camera}] source {event.old} -> {event.new}" + (f": {error}" if error and event.new != "streaming" else ""),
                  file=self.status_out or sys.stderr, flush=True)
