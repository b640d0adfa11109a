"""One camera's pipeline: source -> sampler -> rolling encoder -> token memory, plus its
query handler, scripted questions and periodic status records."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass

import cv2

import pruning
from pruning.similarity import cos

from .answer import Answer, QueryError
from .config import Config, SourceConfig
from .encoder import RollingEncoder
from .query import QueryHandler, QuerySettings
from .sampler import Sampler
from .sources.base import Source
from .types import Frame
from .vlm.qwen import QwenVL

log = logging.getLogger(__name__)


def make_source(cfg: SourceConfig, name: str) -> Source:
    """The configured frame source."""
    if cfg.kind == "synthetic":
        from .sources.synthetic import SyntheticSource

        return SyntheticSource(duration_s=cfg.duration_s, fps=cfg.fps, seed=cfg.seed, width=cfg.width,
                               height=cfg.height, realtime=cfg.realtime, speed=cfg.speed, name=name)
    if cfg.kind == "file":
        from .sources.file import FileSource

        return FileSource(cfg.path, realtime=cfg.realtime, loop=cfg.loop, speed=cfg.speed, name=name)
    from .sources.health import Backoff

    live = dict(open_timeout_s=cfg.open_timeout_s, stall_timeout_s=cfg.stall_timeout_s,
                max_reconnects=None if cfg.max_reconnects < 0 else cfg.max_reconnects,
                backoff=Backoff(cfg.reconnect_initial_s, cfg.reconnect_max_s), name=name)
    if cfg.kind == "rtsp":
        from .sources.rtsp import RtspSource

        return RtspSource(cfg.url, cfg.transport, options={k: str(v) for k, v in cfg.options.items()} or None, **live)
    if cfg.kind == "webcam":
        from .sources.webcam import WebcamSource

        device = int(cfg.device) if cfg.device.isdigit() else cfg.device
        return WebcamSource(device, cfg.width, cfg.height, cfg.fps, input_format=cfg.input_format or None, **live)
    raise ValueError(f"unknown source kind {cfg.kind!r}")


class SceneDetector:
    """A scene change is a group whose mean token has cosine < `threshold` to the previous
    group's (MoPrune's boundary rule, Sec. 3.3), whatever pruner the memory uses."""

    def __init__(self, threshold: float = 0.8):
        self.threshold = threshold
        self._prev = None

    def update(self, tokens) -> bool:
        mean = tokens.reshape(-1, tokens.shape[-1]).float().mean(0)
        changed = self._prev is not None and float(cos(mean, self._prev)) < self.threshold
        self._prev = mean
        return changed


@dataclass
class _Rates:
    at: float
    frames_in: int
    frames_out: int


class CameraPipeline:
    """Everything for one camera; `run()` ingests until the source ends."""

    def __init__(self, cfg: Config, vlm: QwenVL, emit=None):
        self.cfg = cfg
        self.name = cfg.name
        self.vlm = vlm
        self.pruner = pruning.get_pruner(cfg.memory.pruner, **cfg.memory.params)
        self.memory = pruning.TokenMemory(cfg.memory.capacity, self.pruner, cfg.memory.recent_groups)
        self.source = make_source(cfg.source, cfg.name)
        self.source.on_state = self._on_source_state
        self.sampler = Sampler(self.source, cfg.sampler.fps, cfg.sampler.policy, cfg.sampler.queue)
        self.encoder = RollingEncoder(vlm, self.memory, drop_when_behind=self.sampler.policy == "latest",
                                      on_group=self._on_group)
        self.scenes = SceneDetector()
        self.latest_frame: Frame | None = None
        q = cfg.query
        self.queries = QueryHandler(vlm, self.memory, QuerySettings(
            llm_budget=q.llm_budget, max_new_tokens=q.max_new_tokens,
            max_question_chars=q.max_question_chars, timestamps=q.timestamps, system_prompt=q.system_prompt,
        ))
        self.emit = emit
        self.finished = asyncio.Event()
        self._rates = _Rates(time.monotonic(), 0, 0)
        self._started = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def stream_s(self) -> float:
        """Stream time (pts) of the newest group in the memory."""
        return self.encoder.stats.newest_pts

    async def _frames(self):
        async for frame in self.sampler:
            self.latest_frame = frame
            yield frame

    def _on_group(self, group: pruning.FrameTokens) -> None:
        """Encoder thread: report scene changes to the sinks (on the event loop)."""
        if self.scenes.update(group.tokens) and self._loop is not None:
            record = {"type": "scene_change", "camera": self.name, "pts": group.pts, "group": group.index}
            asyncio.run_coroutine_threadsafe(self._send(record), self._loop)

    async def _on_source_state(self, source_name: str, old: str, new: str, stats: dict) -> None:
        """Source health to the sinks; a reconnect resets the pruner's stream state at the first
        group of the new connection (its first group has no predecessor)."""
        if old == "reconnecting" and new == "streaming":
            self.encoder.reset_at_pts = stats.get("stream_start_pts")
        await self._send({"type": "source_state", "camera": self.name, "old": old, "new": new, **stats})

    def latest_jpeg(self, quality: int = 85) -> bytes | None:
        """The newest sampled frame as JPEG (for event snapshots), or None before the first."""
        frame = self.latest_frame
        if frame is None:
            return None
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        return buf.tobytes() if ok else None

    async def run(self) -> None:
        """Ingest until the source ends, then drain the encoder."""
        self._loop = asyncio.get_running_loop()
        try:
            await self.encoder.run(self._frames())
        finally:
            self.finished.set()

    async def ask(self, question: str, **kw) -> Answer:
        """Answer now from the memory; ingest keeps running. Sends the answer to the sinks."""
        answer = await self.queries.aask(question, **kw)
        await self._send(self.answer_record(answer))
        return answer

    async def answer(self, question: str, llm_budget: int | None = None, max_new_tokens: int | None = None,
                     request_id: str | None = None) -> dict:
        """The answer record for a request (what MQTT publishes); not sent to the sinks.
        Raises QueryError for a request that cannot be answered."""
        answer = await self.queries.aask(question, llm_budget, max_new_tokens)
        return {**self.answer_record(answer), "id": request_id}

    async def ask_or_report(self, question: str, request_id: str | None = None, **kw) -> Answer | None:
        """Like `ask`, but a bad request becomes an error record instead of an exception."""
        try:
            return await self.ask(question, **kw)
        except QueryError as e:
            await self._send({"type": "error", "camera": self.name, "id": request_id, "code": e.code,
                              "message": e.message, "question": question})
            return None

    async def scripted_questions(self) -> None:
        """Ask each configured question once the stream reaches its `at_s` (or at the end)."""
        for q in sorted(self.cfg.questions, key=lambda q: q.at_s):
            while (self.stream_s < q.at_s or self.memory.groups_seen == 0) and not self.finished.is_set():
                await asyncio.sleep(0.05)
            await self.ask_or_report(q.text)

    def answer_record(self, a: Answer) -> dict:
        return {"type": "answer", "camera": self.name, "model": self.vlm.name, "pruner": self.pruner.name,
                "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), **a.to_dict()}

    def status_record(self) -> dict:
        """Counters and rates since the previous status record."""
        now = time.monotonic()
        s, e = self.sampler.stats, self.encoder.stats
        span = max(now - self._rates.at, 1e-9)
        fps_in = (s.frames_in - self._rates.frames_in) / span
        fps_out = (s.frames_out - self._rates.frames_out) / span
        self._rates = _Rates(now, s.frames_in, s.frames_out)
        last = self.queries.last_answer
        return {
            "type": "status", "camera": self.name, "stream_s": self.stream_s, "fps_in": fps_in,
            "fps_out": fps_out, "frames_in": s.frames_in, "frames_out": s.frames_out,
            "dropped": s.dropped + e.groups_dropped * self.encoder.group_size,
            "groups_encoded": e.groups_encoded, "memory_tokens": len(self.memory),
            "tokens_seen": self.memory.tokens_seen, "encode_ms": e.encode_ms, "prune_ms": e.prune_ms,
            "backlog": e.backlog, "last_answer_s": last.total_s if last else None,
            "source": self.source.health(),
        }

    def summary(self) -> dict:
        """Totals for the end-of-run line."""
        s, e = self.sampler.stats, self.encoder.stats
        n = max(e.groups_encoded, 1)
        return {
            "frames_in": s.frames_in, "frames_sampled": s.frames_out,
            "dropped": s.dropped + e.groups_dropped * self.encoder.group_size,
            "groups_encoded": e.groups_encoded, "tokens_kept": len(self.memory),
            "tokens_seen": self.memory.tokens_seen, "encode_ms_per_group": e.encode_ms_total / n,
            "prune_ms_per_group": e.prune_ms_total / n, "wall_s": time.monotonic() - self._started,
        }

    async def report_status(self, interval_s: float) -> None:
        """Emit a status record every `interval_s` until ingest ends."""
        if interval_s <= 0:
            return
        while not self.finished.is_set():
            try:
                await asyncio.wait_for(self.finished.wait(), interval_s)
            except TimeoutError:
                await self._send(self.status_record())

    async def _send(self, record: dict) -> None:
        if self.emit is not None:
            await self.emit(record)

    def close(self) -> None:
        self.source.close()
        self.encoder.close()
        self.queries.close()
