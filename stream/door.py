"""The one door questions come in by: validation, a bounded wait, `busy`, de-duplication,
`unavailable` at stop and `internal_error`, whichever front door the question came through.

The LLM answers one question at a time per camera. Up to `queue_size` more may wait (in arrival
order); one more is refused at once with `busy`. A question whose `id` was accepted within
`dedup_window_s` is refused with `duplicate` (front doors may stay silent on it). Once `stop()`
is called, waiting and in-flight questions get `unavailable`. Anything else that goes wrong while
answering is our bug: it is logged with its traceback and the asker gets `internal_error`.
Every answer is published as an `Answer` and every refusal (but `duplicate`) as a
`RequestFailed`, so every sink sees every door's traffic; a watch's own checks are not (their
outcome is a `WatchFired` event, and the watch logs its refusals).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from .errors import RequestError
from .events import Answer, Event, Question, RequestFailed

log = logging.getLogger(__name__)

MAX_ID_CHARS = 200
WATCH_ORIGIN = "watch"  # a watch's own checks: their outcome is a WatchFired event, not an answer
MAX_NEW_TOKENS = 1024


@dataclass(frozen=True)
class DoorSettings:
    max_question_chars: int = 500
    queue_size: int = 4  # questions that may wait while one is answered; beyond: `busy`
    dedup_window_s: float = 600.0  # a repeated id within it is `duplicate`; 0 = off


def validate(q: Question, max_question_chars: int) -> Question:
    """The question with its text stripped, or the RequestError naming what is wrong."""
    if q.id is not None and (isinstance(q.id, bool) or not isinstance(q.id, (str, int))
                             or len(str(q.id)) > MAX_ID_CHARS):
        raise RequestError("bad_request", f"id must be a string or an integer of at most {MAX_ID_CHARS} characters")
    if not isinstance(q.text, str) or not q.text.strip():
        raise RequestError("empty_question", "the question is missing or empty")
    text = q.text.strip()
    if len(text) > max_question_chars:
        raise RequestError("question_too_long", f"the question has {len(text)} characters; the limit is {max_question_chars}")
    if q.llm_budget is not None and (isinstance(q.llm_budget, bool) or not isinstance(q.llm_budget, int) or q.llm_budget < 1):
        raise RequestError("bad_llm_budget", f"llm_budget must be a positive integer, got {q.llm_budget!r}")
    if q.max_new_tokens is not None and (isinstance(q.max_new_tokens, bool) or not isinstance(q.max_new_tokens, int)
                                         or not 1 <= q.max_new_tokens <= MAX_NEW_TOKENS):
        raise RequestError("bad_max_new_tokens",
                           f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS}, got {q.max_new_tokens!r}")
    return q if text == q.text else replace(q, text=text)


OnText = Callable[[str], None]
Answerer = Callable[[Question, "OnText | None"], Awaitable[Answer]]  # (question, on_text): the answer
Publish = Callable[[Event], Awaitable[None]]


class Door:
    """Serialises questions to `answerer` with the rules above; counts what it refused by code."""

    def __init__(self, camera: str, answerer: Answerer, publish: Publish | None = None,
                 settings: DoorSettings = DoorSettings(), clock: Callable[[], float] = time.monotonic):
        self.camera = camera
        self.answerer = answerer
        self.publish = publish
        self.settings = settings
        self.clock = clock
        self.errors: Counter = Counter()
        self.answers = 0
        self.last_answer: Answer | None = None
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._seen: dict[str | int, float] = {}  # accepted ids, oldest first
        self._stopped = asyncio.Event()

    @property
    def queued(self) -> int:
        """Questions waiting behind the one being answered."""
        return self._waiting

    def stop(self) -> None:
        """From now on every waiting, in-flight or new question gets `unavailable`."""
        self._stopped.set()

    async def ask(self, question: Question, on_text: OnText | None = None) -> Answer:
        """The answer, or the RequestError saying why there is none (both also published).
        `on_text` receives the answer's text as it is generated (on the LLM's thread)."""
        try:
            answer = await self._ask(question, on_text)
        except RequestError as e:
            self.errors[e.code] += 1
            if self.publish is not None and e.code != "duplicate" and question.origin != WATCH_ORIGIN:
                text = question.text if isinstance(question.text, str) else ""
                await self.publish(RequestFailed(self.camera, e.code, e.message, question.id, text, question.origin))
            raise
        if self.publish is not None and question.origin != WATCH_ORIGIN:
            await self.publish(answer)
        return answer

    async def _ask(self, question: Question, on_text: OnText | None) -> Answer:
        q = validate(question, self.settings.max_question_chars)
        if self._stopped.is_set():
            raise RequestError("unavailable", "the camera is stopping; ask again later")
        if self._is_duplicate(q.id):
            raise RequestError("duplicate", f"a question with id {q.id!r} was accepted already")
        if self._lock.locked() and self._waiting >= self.settings.queue_size:
            raise RequestError("busy", f"{self._waiting} questions are waiting already; ask again later")
        if q.id is not None and self.settings.dedup_window_s > 0:
            self._seen[q.id] = self.clock()
        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1
        try:
            return await self._answer(q, on_text)
        finally:
            self._lock.release()

    async def _answer(self, q: Question, on_text: OnText | None) -> Answer:
        if self._stopped.is_set():
            raise RequestError("unavailable", "the camera is stopping; ask again later")
        work = asyncio.ensure_future(self.answerer(q, on_text))
        stopped = asyncio.ensure_future(self._stopped.wait())
        abandoned = False
        try:
            await asyncio.wait([work, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not work.done():  # stopping, or the asker went away: nobody waits for this answer
                work.cancel()
                abandoned = True
        if abandoned:
            raise RequestError("unavailable", "the camera is stopping; ask again later")
        try:
            answer = work.result()
        except RequestError:
            raise
        except Exception:
            log.exception("answering %r failed", q.text)
            raise RequestError("internal_error", "the camera failed to answer; see the service log") from None
        self.answers += 1
        self.last_answer = answer
        return answer

    def _is_duplicate(self, rid: str | int | None) -> bool:
        if rid is None or self.settings.dedup_window_s <= 0:
            return False
        cutoff = self.clock() - self.settings.dedup_window_s
        while self._seen and next(iter(self._seen.values())) < cutoff:
            del self._seen[next(iter(self._seen))]
        return rid in self._seen
