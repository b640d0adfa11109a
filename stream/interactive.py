"""The terminal session of `streamprune run`: a prompt, questions to the cameras, and a few
commands (/help, /status, /quit) that are never sent to the LLM.

Lines come from a daemon thread reading stdin, so the streams keep flowing while the user
types. With several cameras, `name: question` asks one of them and a plain question asks them
all; the console sink names the camera in each answer.
"""
from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Callable, Mapping
from typing import TextIO

from .camera_api import CameraService
from .errors import Error
from .events import Question, Status

PROMPT = "> "
COMMANDS = {
    "/help": "this list",
    "/status": "each camera's live status: stream time, fps, memory, source health",
    "/watches": "each camera's standing questions and their last answers",
    "/quit": "stop streamprune (also Ctrl-D)",
}
BARE = {"help": "/help", "quit": "/quit", "exit": "/quit"}  # typed without the slash: not questions either


def _stdin_lines(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
    """Daemon thread: hand stdin lines to the loop; None at EOF."""
    for line in sys.stdin:
        loop.call_soon_threadsafe(queue.put_nowait, line.rstrip("\n"))
    loop.call_soon_threadsafe(queue.put_nowait, None)


def help_text(cameras: Mapping[str, CameraService]) -> str:
    names = list(cameras)
    how = (f"Type a question and press Enter: every camera answers ({', '.join(names)}); "
           f"'{names[0]}: question' asks one." if len(names) > 1 else "Type a question and press Enter.")
    return how + "\n" + "\n".join(f"  {c:<9} {what}" for c, what in COMMANDS.items())


def watches_text(cameras: Mapping[str, CameraService]) -> str:
    lines = []
    for name, camera in cameras.items():
        listing = camera.watches.describe()
        lines.append(f"[{name}] {len(listing)} watch(es)")
        for w in listing:
            state = {True: "holds", False: "does not hold", None: "not answered yet"}[w["matches"]]
            last = f", last answer {w['last_answer']!r}" if w["last_answer"] is not None else ""
            lines.append(f"  {w['name']}: {w['question']!r} (trigger {w['trigger']}): {state}{last}")
    return "\n".join(lines)


class Session:
    """Reads commands and questions until /quit or end of input; `format_status` renders a
    camera's status line (the console sink's)."""

    def __init__(self, cameras: Mapping[str, CameraService], format_status: Callable[[Status], str],
                 out: TextIO | None = None):
        self.cameras = dict(cameras)
        self.format_status = format_status
        self.out = out

    def say(self, text: str, end: str = "\n") -> None:
        print(text, end=end, file=self.out or sys.stdout, flush=True)

    async def run(self) -> None:
        queue: asyncio.Queue = asyncio.Queue()
        threading.Thread(target=_stdin_lines, args=(asyncio.get_running_loop(), queue), daemon=True).start()
        self.say(help_text(self.cameras))
        self.say(PROMPT, end="")
        while (line := await queue.get()) is not None:
            if not await self.handle(line):
                return
            self.say(PROMPT, end="")

    async def handle(self, line: str) -> bool:
        """One line; False when the session should end."""
        text = line.strip()
        command = BARE.get(text.lower(), text.lower()) if text else ""
        if command == "/quit":
            return False
        if command == "/help":
            self.say(help_text(self.cameras))
        elif command == "/status":
            for camera in self.cameras.values():
                self.say(self.format_status(camera.status()))
        elif command == "/watches":
            self.say(watches_text(self.cameras))
        elif command.startswith("/"):
            self.say(f"unknown command {text.split()[0]!r}; /help lists the commands")
        elif text:
            await self.ask(text)
        return True

    async def ask(self, text: str) -> None:
        name, _, rest = text.partition(":")
        if rest.strip() and name.strip() in self.cameras:
            targets, question = [self.cameras[name.strip()]], rest.strip()
        else:
            targets, question = list(self.cameras.values()), text
        for camera in targets:
            with contextlib.suppress(Error):  # refused: the console sink printed why
                await camera.ask(Question(question, origin="cli"))
