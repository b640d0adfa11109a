"""Supervised asyncio tasks: no long-running task dies silently.

A `Supervisor` runs named tasks (a camera's ingest, status ticker and watches; a service's
connection loop). An unexpected exception is logged with its traceback, counted, reported
through `on_change` and the task is started again after a delay that doubles per recent failure
up to a cap. More than `max_failures` failures within `window_s` mark the task `failed` for
good, and so does at once an exception listed in `fatal` (a world error its own layer already
gave up on, e.g. a camera that exhausted its reconnects). A task that returns is `done`; a
cancelled one (the owner stopping) is `stopped`, which is neither a failure nor reported.

`states()` is JSON-ready for status records: {name: {"state", "restarts", "failures",
"last_error"}}. Torch-free, so any front door can use it.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .errors import Error

log = logging.getLogger(__name__)

T = TypeVar("T")

RUNNING = "running"
RESTARTING = "restarting"
FAILED = "failed"
DONE = "done"
STOPPED = "stopped"
FINAL = (FAILED, DONE, STOPPED)


@dataclass(frozen=True)
class RestartPolicy:
    """Restart delays double from `initial_s` per failure within `window_s`, capped at `max_s`;
    the failure after `max_failures` within `window_s` gives up (0: never restart)."""

    initial_s: float = 0.5
    max_s: float = 30.0
    max_failures: int = 5
    window_s: float = 300.0

    def __post_init__(self) -> None:
        if not (0 <= self.initial_s <= self.max_s) or self.max_failures < 0 or self.window_s <= 0:
            raise ValueError(f"bad restart policy: {self}")

    def delay(self, recent_failures: int) -> float:
        return min(self.initial_s * 2 ** max(recent_failures - 1, 0), self.max_s)


@dataclass
class TaskState:
    """One supervised task as its owner and its readers see it. `error` is the exception that
    made it fail for good (None otherwise); `last_error` the latest failure as text."""

    name: str
    state: str = RUNNING
    restarts: int = 0
    failures: int = 0
    last_error: str | None = None
    error: BaseException | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        return {"state": self.state, "restarts": self.restarts, "failures": self.failures,
                "last_error": self.last_error}


OnChange = Callable[[TaskState], Awaitable[None] | None]


class Supervisor:
    """Named tasks restarted on failure (see the module docstring). `owner` prefixes log lines
    and task names; `on_change(state)` is called (and awaited when async) on the event loop after
    each change but a stop; an exception it raises is logged, never fatal to the task."""

    def __init__(self, owner: str, on_change: OnChange | None = None, policy: RestartPolicy = RestartPolicy(),
                 clock: Callable[[], float] = time.monotonic):
        self.owner = owner
        self.on_change = on_change
        self.policy = policy
        self.clock = clock
        self._states: dict[str, TaskState] = {}
        self._tasks: dict[str, asyncio.Task] = {}

    def start(self, name: str, run: Callable[[], Awaitable[None]], policy: RestartPolicy | None = None,
              fatal: tuple[type[BaseException], ...] = ()) -> asyncio.Task:
        """Run `run()` now and again after each failure; `fatal` exceptions fail it at once."""
        if name in self._tasks and not self._tasks[name].done():
            raise RuntimeError(f"{self.owner}: task {name!r} is already running")
        self._states[name] = state = TaskState(name)
        task = asyncio.create_task(self._supervise(state, run, policy or self.policy, fatal),
                                   name=f"{self.owner}-{name}")
        self._tasks[name] = task
        return task

    def state(self, name: str) -> TaskState:
        return self._states[name]

    def states(self) -> dict[str, dict]:
        """Every task's state, JSON-ready (see the module docstring)."""
        return {name: s.as_dict() for name, s in self._states.items()}

    @property
    def failed(self) -> list[str]:
        return [name for name, s in self._states.items() if s.state == FAILED]

    async def wait(self, name: str) -> TaskState:
        """Until the task is done, failed or stopped; its final state. Cancelling the waiter
        leaves the task running (unlike awaiting it through gather)."""
        await asyncio.wait({self._tasks[name]})
        return self._states[name]

    async def stop(self) -> None:
        """Cancel every task and wait for them: each ends `stopped` (or as it already ended)."""
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for state in self._states.values():  # a task cancelled before its first step never saw it
            if state.state not in FINAL:
                state.state = STOPPED

    async def __aenter__(self) -> Supervisor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _supervise(self, state: TaskState, run: Callable[[], Awaitable[None]], policy: RestartPolicy,
                         fatal: tuple[type[BaseException], ...]) -> None:
        recent: deque[float] = deque()
        try:
            while True:
                try:
                    await run()
                except Exception as exc:
                    if not await self._failed(state, exc, recent, policy, fatal):
                        return
                else:
                    state.state = DONE
                    await self._changed(state)
                    return
        except asyncio.CancelledError:
            if state.state not in FINAL:
                state.state = STOPPED
            raise

    async def _failed(self, state: TaskState, exc: Exception, recent: deque[float], policy: RestartPolicy,
                      fatal: tuple[type[BaseException], ...]) -> bool:
        """Log, count and report a failure; wait out the backoff. False: the task gave up."""
        now = self.clock()
        recent.append(now)
        while recent and now - recent[0] > policy.window_s:
            recent.popleft()
        state.failures += 1
        state.last_error = f"{type(exc).__name__}: {exc}"
        trace = None if isinstance(exc, Error) else exc  # an `Error` is already phrased for a person
        if isinstance(exc, fatal) or len(recent) > policy.max_failures:
            state.state, state.error = FAILED, exc
            # an `Error` (the world's) is reported by its owner's status and at the end of the run
            log.log(logging.INFO if trace is None else logging.ERROR, "%s: task %s failed for good (%d failure(s)): %s",
                    self.owner, state.name, state.failures, state.last_error, exc_info=trace)
            await self._changed(state)
            return False
        delay = policy.delay(len(recent))
        state.state = RESTARTING
        log.error("%s: task %s failed (%d in the last %.0f s), restarting in %.2f s: %s", self.owner,
                  state.name, len(recent), policy.window_s, delay, state.last_error, exc_info=trace)
        await self._changed(state)
        await asyncio.sleep(delay)
        state.restarts += 1
        state.state = RUNNING
        log.info("%s: task %s restarted (restart %d)", self.owner, state.name, state.restarts)
        await self._changed(state)
        return True

    async def _changed(self, state: TaskState) -> None:
        if self.on_change is None:
            return
        try:
            result = self.on_change(state)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("%s: reporting task %s as %s failed", self.owner, state.name, state.state)


class Resumable(Generic[T]):
    """An async iterator whose consumer may be cancelled and restarted without losing it.

    Cancelling a task inside `async for` over an async generator closes the generator (and a
    source with it); here a cancelled step keeps running and the next `__anext__` takes its
    result, so a restarted consumer continues where the stream is. `ended` turns True once
    the stream is exhausted or raised, `error` is what it raised. `aclose()` ends it for good.
    """

    def __init__(self, it: AsyncIterator[T]):
        self._it = it
        self._step: asyncio.Task | None = None
        self.ended = False
        self.error: BaseException | None = None

    def __aiter__(self) -> Resumable[T]:
        return self

    async def __anext__(self) -> T:
        if self.ended:
            raise StopAsyncIteration
        if self._step is None:
            self._step = asyncio.create_task(self._next())
        step = self._step
        try:
            item, more = await asyncio.shield(step)
        except asyncio.CancelledError:
            if not step.cancelled():  # our consumer was cancelled: the step stays for the next call
                raise
            self._step, self.ended = None, True
            raise
        except BaseException as exc:
            self._step, self.ended, self.error = None, True, exc
            raise
        self._step = None
        if not more:
            self.ended = True
            raise StopAsyncIteration
        return item  # type: ignore[return-value]

    async def _next(self) -> tuple[T | None, bool]:
        try:
            return await self._it.__anext__(), True
        except StopAsyncIteration:
            return None, False

    async def aclose(self) -> None:
        self.ended = True
        if self._step is not None:
            self._step.cancel()
            await asyncio.gather(self._step, return_exceptions=True)
            self._step = None
        close = getattr(self._it, "aclose", None)
        if close is not None:
            await close()
