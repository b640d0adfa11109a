"""The camera service: one camera's ingest (source -> sampler -> encoder -> token memory), the
one door for its questions, its watches and scripted questions, and its event bus.

Use it as an async context manager: entering starts ingest, the status ticker, the watches and
the scripted questions; leaving stops them, and questions still waiting get `unavailable`.

Front doors call `ask(Question)`; sinks subscribe to `bus`. Ingest never waits for a question
and a question never waits for ingest (the encoder and the LLM run on their own threads).

Those four tasks are supervised (stream/supervisor.py): a crash is logged, shown in
`status().tasks` and the task restarts with backoff, until it fails too often (`failed`; the
scripted questions fail at once, as a restart would ask them again). A
restarted ingest keeps the memory and continues the same frame stream (only the group being
collected and a batch that failed are lost). If the source itself raised (a bug, not a world
error: those it survives, or gives up on with `SourceError`, which fails ingest for good) it is
reopened: a live source continues with pts after the last frame, a file or synthetic clip is
read again from its start and the frames it already delivered are skipped.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, replace

import cv2

import pruning

from .bus import Bus
from .camera_api import MemoryMap
from .config import Config, MemoryConfig
from .door import Door, DoorSettings, OnText
from .encode_scheduler import EncodeScheduler
from .encoder import RollingEncoder
from .errors import ConfigError, SourceError
from .events import Answer, Event, GroupAdded, Question, SceneChange, SourceState, Status
from .memory_map import memory_map
from .prompt_cache import limit_tokens
from .query import QueryHandler, QuerySettings
from .sampler import Sampler
from .scenes import SceneDetector
from .sources.base import Source
from .sources.registry import make_source
from .supervisor import DONE, FAILED, FINAL, RestartPolicy, Resumable, Supervisor, TaskState
from .types import Frame
from .vlm.base import LayoutSettings, VideoLM
from .watches import Watches

log = logging.getLogger(__name__)

THUMB_WIDTH = 96
INGEST, STATUS, WATCHES, QUESTIONS = "ingest", "status", "watches", "questions"
PTS_GAP_S = 1e-3  # between the last frame before a reopened live source and its first


def pruner_params(memory: MemoryConfig, vlm: VideoLM) -> dict:
    """The pruner's parameters: the papers' defaults for the model's family, under what the
    config sets."""
    return {**vlm.pruner_defaults.get(memory.pruner, {}), **memory.params}


def thumbnail(image, width: int = THUMB_WIDTH):
    """A small copy of a frame, for pictures of what the memory holds."""
    h, w = image.shape[:2]
    return cv2.resize(image, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)


@dataclass
class _Rates:
    at: float
    frames_in: int
    frames_out: int


class Camera:
    """One camera as a service (see the module docstring)."""

    restart_policy = RestartPolicy()  # for its supervised tasks

    def __init__(self, cfg: Config, vlm: VideoLM, bus: Bus | None = None, scheduler: EncodeScheduler | None = None):
        """`scheduler`: the model's shared vision-tower queue when several cameras run on it
        (None: this camera has the tower to itself)."""
        self.cfg = cfg
        self.name = cfg.name
        self.vlm = vlm
        self.model = vlm.name
        self.bus = bus if bus is not None else Bus()
        self.pruner = pruning.get_pruner(cfg.memory.pruner, **pruner_params(cfg.memory, vlm))
        self.memory = pruning.TokenMemory(cfg.memory.capacity, self.pruner, cfg.memory.recent_groups,
                                          evict_slack=int(cfg.memory.capacity * cfg.memory.evict_slack),
                                          device=vlm.device if cfg.memory.device == "model" else "cpu")
        self.source = self.open_source()
        self.sampler = Sampler(self.source, cfg.sampler.fps, cfg.sampler.policy, cfg.sampler.queue)
        self.encoder = RollingEncoder(vlm, self.memory, drop_when_behind=self.sampler.policy == "latest",
                                      on_group=self._on_group, scheduler=scheduler, name=self.name,
                                      max_latency_s=cfg.sampler.max_latency_s)
        self.scenes = SceneDetector()
        q = cfg.query
        interval = 1.0 / cfg.sampler.fps
        layout = LayoutSettings(system_prompt=q.system_prompt, timestamps=q.timestamps, frame_interval_s=interval)
        try:
            cache_tokens = (limit_tokens(vlm, q.prompt_cache_mib, self.memory, layout, q.max_new_tokens,
                                         q.max_question_chars) if q.prompt_cache else 0)
        except ConfigError as e:
            raise ConfigError(f"camera {self.name!r}: {e.detail}", e.path) from None
        schedule = tuple((int(layer), float(keep)) for layer, keep in q.layer_pruning)
        try:
            vlm.check_layer_schedule(schedule)  # at start, not at the first question
        except ValueError as e:
            raise ConfigError(f"camera {self.name!r}: {e}", "query.layer_pruning") from None
        self.queries = QueryHandler(vlm, self.memory, QuerySettings(
            llm_budget=q.llm_budget, max_new_tokens=q.max_new_tokens, timestamps=q.timestamps,
            system_prompt=q.system_prompt, prompt_cache=q.prompt_cache, prompt_cache_tokens=cache_tokens,
            frame_interval_s=interval, layer_pruning=schedule))
        self.door = Door(self.name, self._answer, self.publish, DoorSettings(
            max_question_chars=q.max_question_chars, queue_size=q.queue_size, dedup_window_s=q.dedup_window_s,
            watch_share=q.watch_share))
        self.watches = Watches(self.name, self.ask, self.publish, self.latest_jpeg,
                               max_question_chars=q.max_question_chars)
        for i, spec in enumerate(cfg.watches):
            if spec.camera in ("", self.name):
                try:
                    self.watches.add(replace(spec, camera=self.name))
                except ConfigError as e:  # a question too long for this camera's limit
                    raise e.under(f"watches[{i}]") from None
        self.latest_frame: Frame | None = None
        self.finished = asyncio.Event()  # ingest ended (the source ended, ingest failed for good, or a stop)
        self.error: BaseException | None = None  # why ingest failed for good; None while it runs or ended well
        self.supervisor = Supervisor(f"camera {self.name}", self._task_changed, self.restart_policy)
        self._rates = _Rates(time.monotonic(), 0, 0)
        self._started = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._frames_in: Resumable[Frame] | None = None
        self._pts_offset = 0.0  # added to a reopened live source's pts

    # -- the door --

    async def ask(self, question: Question, on_text: OnText | None = None) -> Answer:
        """Answer from the memory as it is now; raises RequestError when it will not. `on_text`
        receives the text as it is generated (on the LLM's thread)."""
        return await self.door.ask(question, on_text)

    async def _answer(self, q: Question, on_text: OnText | None) -> Answer:
        answer = await self.queries.aask(q, on_text)
        return replace(answer, camera=self.name, id=q.id, model=self.vlm.name, pruner=self.pruner.name,
                       origin=q.origin)

    async def publish(self, event: Event) -> None:
        await self.bus.publish(event)

    # -- lifecycle --

    async def __aenter__(self) -> "Camera":
        self._loop = asyncio.get_running_loop()
        sup = self.supervisor
        sup.start(INGEST, self._ingest, fatal=(SourceError,))
        sup.start(STATUS, lambda: self._tick(self.cfg.output.status_interval_s))
        sup.start(WATCHES, self.watches.run)
        sup.start(QUESTIONS, self._scripted_questions, policy=replace(sup.policy, max_failures=0))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Refuse new and waiting questions (`unavailable`), stop ingest and the schedules."""
        self.door.stop()
        self.source.close()
        await self.supervisor.stop()
        if self._frames_in is not None:
            await self._frames_in.aclose()
        self.finished.set()
        await self.publish(self.status())
        await asyncio.to_thread(self.encoder.close)  # waits for a batch in flight: off the event loop
        self.queries.close()

    async def done(self) -> None:
        """Until ingest has ended and the scripted questions are answered."""
        await self.finished.wait()
        await self.supervisor.wait(QUESTIONS)

    def open_source(self) -> Source:
        """The source the config describes, reporting to this camera; called again to reopen it."""
        source = make_source(self.cfg.source, self.name)
        source.on_state = self._on_source_state
        return source

    async def _ingest(self) -> None:
        """One run of source -> sampler -> encoder; the supervisor calls it again after a failure,
        and it continues the same frame stream (an ended one: to encode the groups still
        waiting), or reopens the source when that stream raised."""
        if self._frames_in is None:
            self._frames_in = Resumable(self._frames())
        elif self._frames_in.error is not None:
            self._reopen()
        await self.encoder.run(self._frames_in)

    def _reopen(self) -> None:
        """A new source in place of one that raised, continuing after its last frame (module docstring)."""
        position = self.source.stats.position_s
        last = None if position is None else position + self._pts_offset
        self.source = self.open_source()
        if last is not None and self.source.live:
            self._pts_offset = last + PTS_GAP_S
            self.encoder.reset_at_pts = self._pts_offset  # a new connection: its first group has no predecessor
        log.warning("camera %s: source reopened, continuing after pts %s", self.name, last)
        self.sampler.source = self._continued(self.source, None if self.source.live else last)
        self._frames_in = Resumable(self._frames())

    async def _continued(self, source: Source, skip_to: float | None):
        """`source`'s frames with the live pts offset, from after `skip_to` (None: all)."""
        offset = self._pts_offset
        async for frame in source:
            if skip_to is None or frame.pts > skip_to:
                yield replace(frame, pts=frame.pts + offset) if offset else frame

    async def _frames(self):
        async for frame in self.sampler:
            self.latest_frame = frame
            yield frame

    async def _tick(self, interval_s: float) -> None:
        """A live `Status` every `interval_s` until ingest ends."""
        if interval_s <= 0:
            return
        while not self.finished.is_set():
            try:
                await asyncio.wait_for(self.finished.wait(), interval_s)
            except TimeoutError:
                await self.publish(self.status(new_window=True))

    async def _task_changed(self, task: TaskState) -> None:
        """The supervisor's report: the end of ingest ends the stream, and every other change but
        a helper task's normal end goes out as a status (so MQTT's retained status and the JSONL
        show a task failing, and why)."""
        if task.name != INGEST and task.state == DONE:  # the ticker or the scripted questions finished
            return
        if task.name == INGEST and task.state in FINAL:
            if task.state == FAILED:  # let go of the camera or file: nothing reads it any more
                self.error = task.error
                self.source.close()
                if self._frames_in is not None:
                    await self._frames_in.aclose()
            self.finished.set()
        await self.publish(self.status())

    async def _scripted_questions(self) -> None:
        """Ask each configured question once the stream reaches its `at_s` (or at the end)."""
        for q in sorted(self.cfg.questions, key=lambda q: q.at_s):
            while (self.stream_s < q.at_s or self.memory.groups_seen == 0) and not self.finished.is_set():
                await asyncio.sleep(0.05)
            try:
                await self.ask(Question(q.text, origin="script"))
            except Exception as e:  # refused: the door published why
                log.info("camera %s: scripted question %r not answered: %s", self.name, q.text, e)

    # -- events from the encoder thread and the source --

    def _on_group(self, group: pruning.FrameTokens, frames: list[Frame]) -> None:
        """Encoder thread: the group is in memory; have the prompt cache catch up, tell the sinks,
        and the watches on a new scene."""
        self.queries.refresh_soon()
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        events: list[Event] = [GroupAdded(self.name, group.index, group.pts, len(self.memory), thumbnail(frames[0].image))]
        cuts = self.scenes.update(group)
        events += [SceneChange(self.name, index, pts) for index, pts in cuts]
        if cuts:
            loop.call_soon_threadsafe(self.watches.scene_change)
        for event in events:
            asyncio.run_coroutine_threadsafe(self.publish(event), loop)

    async def _on_source_state(self, source_name: str, old: str, new: str, stats: dict) -> None:
        """Source health to the sinks; a reconnect resets the pruner's stream state at the first
        group of the new connection (its first group has no predecessor)."""
        start = stats.get("stream_start_pts")
        if old == "reconnecting" and new == "streaming" and start is not None:
            self.encoder.reset_at_pts = start + self._pts_offset
        await self.publish(SourceState(self.name, old, new, self.source.health()))

    # -- what front doors and sinks may read --

    @property
    def stream_s(self) -> float:
        """Stream time (pts) of the newest group in the memory."""
        return self.encoder.stats.newest_pts

    def latest_jpeg(self, quality: int = 85) -> bytes | None:
        """The newest sampled frame as JPEG (for event snapshots), or None before the first."""
        frame = self.latest_frame
        if frame is None:
            return None
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        return buf.tobytes() if ok else None

    def memory_map(self) -> MemoryMap:
        return memory_map(self.memory)

    def status(self, new_window: bool = False) -> Status:
        """Live counters; fps over the window since the last status tick (the ticker passes
        `new_window=True`, so other readers do not shorten its window)."""
        now = time.monotonic()
        s, e = self.sampler.stats, self.encoder.stats
        span = max(now - self._rates.at, 1e-9)
        fps_in = (s.frames_in - self._rates.frames_in) / span
        fps_out = (s.frames_out - self._rates.frames_out) / span
        if new_window:
            self._rates = _Rates(now, s.frames_in, s.frames_out)
        last = self.door.last_answer
        return Status(
            camera=self.name, stream_s=self.stream_s, fps_in=fps_in, fps_out=fps_out, frames_in=s.frames_in,
            frames_out=s.frames_out, dropped=s.dropped + e.groups_dropped * self.encoder.group_size,
            groups_encoded=e.groups_encoded, memory_tokens=len(self.memory), tokens_seen=self.memory.tokens_seen,
            encode_ms=e.encode_ms, prune_ms=e.prune_ms, backlog=e.backlog, queued=self.door.queued,
            answers=self.door.answers, errors=dict(self.door.errors), watches=len(self.watches), watch_counters=dict(self.watches.counters),
            last_answer_s=last.total_s if last else None, source=self.source.health(),
            tasks=self.supervisor.states(), prompt_cache=self.queries.cache_report(), ingest_latency_ms=e.latency_ms,
            tower=asdict(self.encoder.client.stats),
        )

    def summary(self) -> dict:
        """Totals for the end-of-run line."""
        s, e = self.sampler.stats, self.encoder.stats
        n = max(e.groups_encoded, 1)
        return {
            "frames_in": s.frames_in, "frames_sampled": s.frames_out,
            "dropped": s.dropped + e.groups_dropped * self.encoder.group_size,
            "groups_encoded": e.groups_encoded, "tokens_kept": len(self.memory),
            "tokens_seen": self.memory.tokens_seen, "encode_ms_per_group": e.encode_ms_total / n,
            "prune_ms_per_group": e.prune_ms_total / n, "answers": self.door.answers,
            "wall_s": time.monotonic() - self._started,
        }
