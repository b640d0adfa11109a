"""The one door questions come in by: validation, a bounded wait, `busy`, de-duplication,
`unavailable` at stop and `internal_error`, whichever front door the question came through.

The LLM answers one question at a time per camera. Up to `queue_size` more questions may wait
(in arrival order); one more is refused at once with `busy`. A question whose `id` was accepted within
`dedup_window_s` is refused with `duplicate` (front doors may stay silent on it). Once `stop()`
is called, waiting and in-flight questions get `unavailable`. Anything else that goes wrong while
answering is our bug: it is logged with its traceback and the asker gets `internal_error`.
Every answer is published as an `Answer` and every refusal (but `duplicate`) as a
`RequestFailed`, so every sink sees every door's traffic; a watch's own checks are not (their
outcome is a `WatchFired` event, and the watch logs its refusals).

Watch checks (origin `watch`) come second, so standing questions cannot starve people:
- they wait in a line of their own (also `queue_size` long; past it the check gets `busy`), so
  they never take a user question's place; the idle LLM goes to a waiting user question first;
- a user question that arrives while a watch check is being answered preempts it: the check is
  cancelled (the query handler then stops its generation after the current token) and gets
  `preempted` (the watch asks again later; counted in `errors` like every refusal), so a
  question waits for at most the prompt and one token of the check in flight, not its answer;
- watch checks get at most `watch_share` of the LLM's time: the LLM time of watch checks in the
  last `watch_window_s` (stretched to fit one check: at least its expected length / share) plus
  the expected length of the next one must fit in `watch_share` of the window, else the check
  waits, with the LLM idle for whoever asks. The expected length is the last completed check's.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from .errors import RequestError
from .events import Answer, Event, Question, RequestFailed

log = logging.getLogger(__name__)

MAX_ID_CHARS = 200
WATCH_ORIGIN = "watch"  # a watch's own checks: their outcome is a WatchFired event, not an answer
MAX_NEW_TOKENS = 1024
MAX_LLM_BUDGET = 10_000_000  # tokens; larger is surely a mistake (or an attack), not a budget


@dataclass(frozen=True)
class DoorSettings:
    max_question_chars: int = 500
    queue_size: int = 4  # questions that may wait while one is answered; beyond: `busy`
    dedup_window_s: float = 600.0  # a repeated id within it is `duplicate`; 0 = off
    watch_share: float = 0.5  # most of the LLM's time watch checks may take (1 = no limit)
    watch_window_s: float = 10.0  # the sliding window the share is measured over


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
    if q.llm_budget is not None and (isinstance(q.llm_budget, bool) or not isinstance(q.llm_budget, int)
                                     or not 1 <= q.llm_budget <= MAX_LLM_BUDGET):
        raise RequestError("bad_llm_budget", f"llm_budget must be an integer in 1..{MAX_LLM_BUDGET}")
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
        self._busy = False  # a question holds the LLM
        self._serving_watch = False  # ... and it is a watch check
        self._users: deque[asyncio.Future] = deque()  # waiting user questions' turns, oldest first
        self._checks: deque[asyncio.Future] = deque()  # waiting watch checks' turns, oldest first
        self._preempt = asyncio.Event()  # a user question waits behind the watch check in flight
        self._watch_runs: deque[tuple[float, float]] = deque()  # LLM time of watch checks: (start, end)
        self._watch_expected = 0.0  # LLM seconds the next watch check is expected to take
        self._retry: asyncio.TimerHandle | None = None  # a waiting check's next look at the share
        self._seen: dict[str | int, float] = {}  # accepted ids, oldest first
        self._stopped = asyncio.Event()

    @property
    def queued(self) -> int:
        """Questions (watch checks included) waiting behind the one being answered."""
        return len(self._users) + len(self._checks)

    def stop(self) -> None:
        """From now on every waiting, in-flight or new question gets `unavailable`."""
        self._stopped.set()
        if self._retry is not None:
            self._retry.cancel()
        for line in (self._users, self._checks):
            while line:
                turn = line.popleft()
                if not turn.done():
                    turn.set_exception(RequestError("unavailable", "the camera is stopping; ask again later"))

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
        watch = q.origin == WATCH_ORIGIN
        if watch and len(self._checks) >= self.settings.queue_size:
            raise RequestError("busy", f"{len(self._checks)} watch checks are waiting already; ask again later")
        if not watch and self._busy and len(self._users) >= self.settings.queue_size:
            raise RequestError("busy", f"{len(self._users)} questions are waiting already; ask again later")
        if q.id is not None and self.settings.dedup_window_s > 0:
            self._seen[q.id] = self.clock()
        await self._turn(watch)
        try:
            return await self._answer(q, on_text, watch)
        finally:
            self._release()

    async def _turn(self, watch: bool) -> None:
        """Until this question holds the LLM (see the module docstring for who goes first)."""
        line = self._checks if watch else self._users
        turn = asyncio.get_running_loop().create_future()
        line.append(turn)
        if not watch and self._serving_watch:
            self._preempt.set()
        self._dispatch()
        try:
            await turn
        except asyncio.CancelledError:  # the asker went away
            if turn.cancelled():
                with contextlib.suppress(ValueError):
                    line.remove(turn)
            elif turn.exception() is None:  # granted just before: hand the LLM on
                self._release()
            raise

    def _dispatch(self) -> None:
        """Give an idle LLM to the oldest waiting user question, else to the oldest waiting
        watch check once the share allows (looking again when it will)."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._busy:
            return
        for line in (self._users, self._checks):
            while line and line[0].done():  # cancelled while waiting
                line.popleft()
        if self._users:
            self._grant(self._users.popleft(), watch=False)
        elif self._checks:
            wait = self._share_wait(self.clock())
            if wait > 0:
                self._retry = asyncio.get_running_loop().call_later(wait, self._dispatch)
            else:
                self._grant(self._checks.popleft(), watch=True)

    def _grant(self, turn: asyncio.Future, watch: bool) -> None:
        self._busy, self._serving_watch = True, watch
        self._preempt.clear()
        turn.set_result(None)

    def _release(self) -> None:
        self._busy = self._serving_watch = False
        self._dispatch()

    def _window(self) -> float:
        """The share's window: `watch_window_s`, stretched so that one expected check fits."""
        return max(self.settings.watch_window_s, self._watch_expected / self.settings.watch_share)

    def _watch_time(self, now: float, window: float) -> float:
        """LLM seconds watch checks took within (now - window, now]."""
        while self._watch_runs and self._watch_runs[0][1] <= now - window:
            self._watch_runs.popleft()
        return sum(end - max(start, now - window) for start, end in self._watch_runs)

    def _share_wait(self, now: float) -> float:
        """Seconds before a watch check may start (0: now). The watch time in the window falls
        by at most a second per second, so the answer is a lower bound; `_dispatch` looks again."""
        share = self.settings.watch_share
        if share >= 1.0:
            return 0.0
        window = self._window()
        over = self._watch_time(now, window) + self._watch_expected - share * window
        return max(over, 0.001) if over > 0 else 0.0

    async def _answer(self, q: Question, on_text: OnText | None, watch: bool) -> Answer:
        if self._stopped.is_set():
            raise RequestError("unavailable", "the camera is stopping; ask again later")
        started = self.clock()
        work = asyncio.ensure_future(self.answerer(q, on_text))
        ends = [asyncio.ensure_future(self._stopped.wait())]
        if watch:
            ends.append(asyncio.ensure_future(self._preempt.wait()))
        abandoned = False
        try:
            await asyncio.wait([work, *ends], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for end in ends:
                end.cancel()
            if not work.done():  # stopping, preempted, or the asker went away: nobody waits for this answer
                work.cancel()
                abandoned = True
            if watch:
                self._watch_runs.append((started, self.clock()))
        if abandoned and watch and self._preempt.is_set() and not self._stopped.is_set():
            await asyncio.gather(work, return_exceptions=True)  # the answerer has let go of the LLM
            log.debug("watch check %r preempted by a question", q.text)
            raise RequestError("preempted", "a question came first; the watch asks again later")
        if abandoned:
            raise RequestError("unavailable", "the camera is stopping; ask again later")
        try:
            answer = work.result()
        except RequestError:
            raise
        except Exception:
            log.exception("answering %r failed", q.text)
            raise RequestError("internal_error", "the camera failed to answer; see the service log") from None
        if watch:
            self._watch_expected = self._watch_runs[-1][1] - started
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
