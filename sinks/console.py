"""Console sink: answers and status lines for a person at a terminal."""
from __future__ import annotations

import sys
import unicodedata
from typing import TextIO

from .base import Sink


def printable(text: str) -> str:
    """Control characters (a random-weight model emits them) shown as U+FFFD, not executed."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else "\ufffd" for c in text)


def format_answer(r: dict) -> str:
    return (
        f"Q: {printable(r['question'])}\n"
        f"A: {printable(r['text']) or '(empty answer)'}\n"
        f"   ttft {r['ttft_s'] * 1e3:.0f} ms, total {r['total_s'] * 1e3:.0f} ms, "
        f"{r['tokens_used']} visual tokens from {r['groups_covered']} groups "
        f"covering {r['t_start']:.1f}-{r['t_end']:.1f} s (memory {r['memory_tokens']} tokens)"
    )


def format_status(r: dict) -> str:
    last = f", last answer {r['last_answer_s']:.2f} s" if r.get("last_answer_s") is not None else ""
    return (
        f"[{r['camera']}] t={r['stream_s']:.1f}s in {r['fps_in']:.1f} fps, out {r['fps_out']:.1f} fps, "
        f"dropped {r['dropped']}, memory {r['memory_tokens']} tokens, "
        f"enc {r['encode_ms']:.0f} ms/group, prune {r['prune_ms']:.1f} ms/group, backlog {r['backlog']}{last}"
    )


class ConsoleSink(Sink):
    name = "console"

    def __init__(self, out: TextIO = sys.stdout, status_out: TextIO = sys.stderr):
        self.out = out
        self.status_out = status_out

    async def emit(self, record: dict) -> None:
        kind = record.get("type")
        if kind == "answer":
            print(format_answer(record), file=self.out, flush=True)
        elif kind == "status":
            print(format_status(record), file=self.status_out, flush=True)
        elif kind == "error":
            print(f"error ({record['code']}): {record['message']}", file=self.out, flush=True)
