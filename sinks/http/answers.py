"""A question asked over HTTP: its answer, or its text as the LLM writes it.

The camera calls `on_text` on the LLM's thread; the pieces cross to the event loop with
`call_soon_threadsafe`, which also keeps them ahead of the answer itself. A streamed answer's
text is the answer's `text` exactly: the camera strips the finished text, so whitespace is
held back until something follows it, and whatever the pieces lacked at the end (an incomplete
character the stream waits on) is sent last. Every wait also ends when the service stops: the
question is withdrawn and the asker gets `unavailable`.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from stream.camera_api import CameraService
from stream.errors import RequestError
from stream.events import Answer, Question

T = TypeVar("T")

STOPPING = "the service is stopping; ask again later"


async def until_closed(work: Awaitable[T], closing: asyncio.Event) -> T:
    """`work`'s result, or RequestError(`unavailable`) once `closing` is set (`work` cancelled)."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(closing.wait())
    try:
        await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise RequestError("unavailable", STOPPING)
    return task.result()


class StrippedText:
    """Pieces of a text in, pieces of the text's `strip()` out, as early as possible."""

    def __init__(self) -> None:
        self.sent = ""  # what went out so far
        self._held = ""  # whitespace waiting for what follows it

    def feed(self, piece: str) -> str:
        text = self._held + piece
        if not self.sent:
            text = text.lstrip()
        body = text.rstrip()
        self._held = text[len(body):]
        self.sent += body
        return body

    def finish(self, text: str) -> str:
        """The rest of the finished `text` ("" when the pieces already were all of it)."""
        if text.startswith(self.sent):
            rest = text[len(self.sent):]
            self.sent = text
            return rest
        return ""


class AnswerStream:
    """One question to `camera` with its text streamed: `await first()` until the first piece or
    the end (a refusal before any text raises there, so it can still be an HTTP error), then
    iterate `pieces()`; `answer` is set once it ends. Cancel with `close()`."""

    def __init__(self, camera: CameraService, question: Question, closing: asyncio.Event):
        loop = asyncio.get_running_loop()
        self._pieces: asyncio.Queue[str] = asyncio.Queue()
        self._closing = closing
        self._text = StrippedText()
        self.answer: Answer | None = None

        def on_text(piece: str) -> None:  # the LLM's thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._pieces.put_nowait, piece)

        self._task = asyncio.ensure_future(camera.ask(question, on_text))
        self._first: str | None = None

    async def first(self) -> None:
        """Until there is text to send or the answer is done; raises what refused the question."""
        while self._first is None:
            piece = await self._next()
            if piece is None:
                return
            self._first = self._text.feed(piece) or None

    async def pieces(self) -> AsyncIterator[str]:
        """The answer's text in pieces; then `answer` is set. Raises RequestError when the
        question is refused or the service stops."""
        try:
            if self._first is not None:
                yield self._first
            while (piece := await self._next()) is not None:
                if out := self._text.feed(piece):
                    yield out
            self.answer = self._task.result()
            if rest := self._text.finish(self.answer.text):
                yield rest
        finally:
            self.close()

    async def _next(self) -> str | None:
        """The next piece; None once the answer is done and every piece was taken."""
        if not self._pieces.empty():
            return self._pieces.get_nowait()
        if self._task.done():
            self._task.result()  # the refusal, if it was one
            return None
        get = asyncio.ensure_future(self._pieces.get())
        stop = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait([get, self._task, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not get.done():
                get.cancel()
        if get.done() and not get.cancelled():
            return get.result()
        if self._closing.is_set() and not self._task.done():
            self.close()
            raise RequestError("unavailable", STOPPING)
        return await self._next()

    def close(self) -> None:
        """Withdraw the question if it is still being answered."""
        if not self._task.done():
            self._task.cancel()
