"""Worker processes for the benchmarks that can run jobs side by side.

This machine has 2 cores and the pruners at toy sizes are mostly Python overhead, so two
single-threaded processes get through a batch of replays about twice as fast as one process
with two threads. Spawned (not forked) so no worker inherits torch's thread pools. `workers=0`
runs every job inline, which the smoke test uses.
"""
from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, as_completed
from typing import Any

from .common import quiet, set_threads


def _init_worker() -> None:
    set_threads(1)
    quiet()


class InlineExecutor(Executor):
    """Runs each job at submit time in this process."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to whoever reads the future
            fut.set_exception(exc)
        return fut


def make_pool(workers: int) -> Executor:
    if workers <= 0:
        return InlineExecutor()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)


def run_jobs(pool: Executor, fn: Callable[..., Any], jobs: Iterable[tuple]) -> list[Any]:
    """fn(*job) for every job, results in job order; the first failure is raised."""
    futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
    out: list[Any] = [None] * len(futures)
    for fut in as_completed(futures):
        out[futures[fut]] = fut.result()
    return out
