"""One vision-tower queue per loaded model, shared by every camera on it.

Each camera's encoder prepares its groups (resize, normalise, patchify: `VideoLM.prepare`) on
its own thread and submits them here; one worker thread takes what waits from every camera and
runs the tower once for all of it (`VideoLM.encode_prepared`), then hands each camera its own
results, in the order it submitted them. The tower costs little more for 16 groups than for
one, so batching across cameras is what lets one model serve many cameras.

- Batch size adapts to load: a batch is everything waiting, up to `max_batch` groups; at light
  load that is one camera's group, at once.
- No camera starves: jobs are taken oldest first, and a camera has at most one job waiting (its
  encoder waits for the result before submitting again), so a job waits behind at most one job
  per other camera.
- A per-camera latency bound: a live camera's group that has waited longer than its
  `max_latency_s` since it was complete is dropped, not encoded, and counted for that camera
  (the GPU cannot keep up; better fresh groups than a growing delay).
- A camera that fails does not fail the others: when a shared batch raises, each job is
  encoded alone and only the one that raises gets the error.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .vlm.base import VideoLM

log = logging.getLogger(__name__)

DROPPED = None  # a group's result when it waited past its camera's latency bound


@dataclass
class ClientStats:
    """One camera's share of the tower."""

    groups_encoded: int = 0
    groups_dropped: int = 0  # waited past the latency bound
    wait_ms: float = 0.0  # from complete to the start of its tower batch, last group
    max_wait_ms: float = 0.0
    batch_groups: int = 0  # groups in the last tower batch it was part of (all cameras)


@dataclass
class EncodeClient:
    """A camera's handle: its name, its latency bound (None: never drop, e.g. a file) and counters."""

    name: str
    max_latency_s: float | None
    stats: ClientStats = field(default_factory=ClientStats)


@dataclass
class _Job:
    client: EncodeClient
    prepared: list[Any]
    ready: list[float]  # time.monotonic() when each group was complete
    future: Future = field(default_factory=Future)


@dataclass
class SchedulerStats:
    batches: int = 0
    groups: int = 0
    shared_batches: int = 0  # tower calls that carried more than one camera's groups


class EncodeScheduler:
    """See the module docstring. Thread-safe; `close()` stops the worker and fails what waits."""

    def __init__(self, vlm: VideoLM, max_batch: int = 16):
        self.vlm = vlm
        self.max_batch = max_batch
        self.stats = SchedulerStats()
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._worker: threading.Thread | None = None  # started by the first job

    def client(self, name: str, max_latency_s: float | None = None) -> EncodeClient:
        return EncodeClient(name, max_latency_s)

    def encode(self, client: EncodeClient, groups: list[list[Any]], ready: list[float] | None = None) -> list[Any]:
        """Blocking, on the camera's thread: prepare `groups` here, encode them with whatever
        else waits, and return one result per group (`DROPPED` for a group past the bound)."""
        prepared = [self.vlm.prepare(g) for g in groups]
        now = time.monotonic()
        return self.submit(client, prepared, ready or [now] * len(groups)).result()

    def submit(self, client: EncodeClient, prepared: list[Any], ready: list[float]) -> Future:
        job = _Job(client, prepared, ready)
        with self._cond:
            if self._closed:
                raise RuntimeError("the encode scheduler is closed")
            self._jobs.append(job)
            self._cond.notify()
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name=f"tower-{self.vlm.name}", daemon=True)
                self._worker.start()
        return job.future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
            worker = self._worker
        if worker is not None:
            worker.join()

    # -- the worker thread --

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if self._closed:
                    for job in self._jobs:
                        job.future.set_exception(RuntimeError("the encode scheduler closed"))
                    self._jobs.clear()
                    return
                jobs = self._take()
            try:
                self._encode(jobs)
            except BaseException as e:  # a bug here: fail the cameras waiting, loudly, and go on
                log.exception("the encode scheduler failed a batch")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)

    def _take(self) -> list[_Job]:
        """Oldest jobs first, up to `max_batch` groups (a larger job alone goes whole)."""
        jobs, n = [], 0
        while self._jobs and (not jobs or n + len(self._jobs[0].prepared) <= self.max_batch):
            job = self._jobs.popleft()
            jobs.append(job)
            n += len(job.prepared)
        return jobs

    def _encode(self, jobs: list[_Job]) -> None:
        now = time.monotonic()
        keep = [[now - t <= job.client.max_latency_s if job.client.max_latency_s is not None else True
                 for t in job.ready] for job in jobs]
        items = [p for job, k in zip(jobs, keep) for p, ok in zip(job.prepared, k) if ok]
        try:
            encoded = self.vlm.encode_prepared(items) if items else []
        except Exception as e:
            if len(jobs) == 1:
                jobs[0].future.set_exception(e)
                return
            log.warning("a shared tower batch of %d cameras failed; encoding each alone", len(jobs), exc_info=True)
            for job in jobs:
                self._encode([job])
            return
        self.stats.batches += 1
        self.stats.shared_batches += len({id(job.client) for job in jobs}) > 1
        self.stats.groups += len(items)
        results = iter(encoded)
        for job, k in zip(jobs, keep):
            s = job.client.stats
            out = [next(results) if ok else DROPPED for ok in k]
            dropped = k.count(False)
            s.groups_dropped += dropped
            s.groups_encoded += len(k) - dropped
            s.batch_groups = len(items)
            s.wait_ms = (now - job.ready[-1]) * 1e3
            s.max_wait_ms = max(s.max_wait_ms, (now - job.ready[0]) * 1e3)
            if dropped:
                log.info("camera %s: %d group(s) waited over %.1f s for the tower and were dropped",
                         job.client.name, dropped, job.client.max_latency_s)
            job.future.set_result(out)

