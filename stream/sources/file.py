"""Frames from a video file through PyAV (any container/codec FFmpeg reads), decoded in a thread.

Damage is survived and counted in `stats.decode_errors` (and `stats.errors`), one per damaged
packet: packets the decoder rejects are skipped; packets the demuxer flags corrupt (MPEG-TS sync
or continuity loss, a cut last packet) are counted but still decoded, as FFmpeg does by default,
because they are often whole and dropping one corrupts every frame that references it; a
demuxer error (a truncated file) ends the pass, counted in `stats.errors`. A resolution or
pixel-format change just yields RGB frames of the new size. `decode_video` is that packet loop,
shared with the live PyAV sources.

A decoded frame that FFmpeg flags corrupt (damage the decoder concealed) counts too, once per
damage: a flagged frame within `REORDER_DEPTH` packets of a damage already counted is that one.

pts is seconds since the stream's start time, in presentation order and strictly increasing.
The decoder's frame order is the display order, but a container that stores decode order only
(AVI with packed B-frames) or a muxer that wrote pts = dts labels frames with their neighbours'
times, so the times of the next `REORDER_DEPTH` frames are handed out smallest first; a
duplicate moves up by a thousandth of a frame. A frame without a pts takes its dts, else the
newest time plus one frame (index / fps for a file without timestamps). Only a jump back of
more than `REORDER_DEPTH` frames is a clock restart (the next loop, a concatenated file): the
stream continues one frame duration after the previous frame, and a file's last pts stays
within a frame of its duration.
"""
from __future__ import annotations

import errno
import heapq
import math
import os
from collections import deque
from collections.abc import AsyncIterator, Generator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import av
import numpy as np

from ..errors import ConfigError
from ..validation import bounded, choice
from .base import Pacer, Source, SourceConfig, SourceError, StateCallback, iterate_in_thread

DEFAULT_FPS = 30.0  # frame duration when the stream declares no rate
REORDER_DEPTH = 8  # frames: how far decoder output may stray from pts order and still be put back

T = TypeVar("T")


@dataclass(frozen=True)
class FileConfig(SourceConfig):
    """`[source]` with kind = "file"."""

    kind: str = choice("file", default="file")
    path: str = ""  # any container/codec FFmpeg reads
    realtime: bool = False  # pace to wall clock (a live camera); False = as fast as decoded
    speed: float = bounded(1.0, 0.01, 1000)  # with realtime: playback speed factor
    loop: bool = False  # start over at the end

    def check(self) -> None:
        if not self.path:
            raise ConfigError("required for a file source", "path")
        if not Path(self.path).expanduser().exists():
            raise ConfigError(f"no such file: {self.path}", "path")


class FileSource(Source):
    """A video file as a stream; `loop` restarts it forever, `realtime` paces to wall clock / speed.

    `file_position_s` is the file position of the last frame handed out (it restarts on each
    loop, `loops` counts the restarts, while the pts in `stats.position_s` keep increasing);
    `duration_s` is the file's length, None until the file is opened or when the container does
    not say.
    """

    config_class = FileConfig

    def __init__(
        self,
        path: str | os.PathLike[str],
        realtime: bool = False,
        loop: bool = False,
        speed: float = 1.0,
        name: str | None = None,
        on_state: StateCallback | None = None,
    ):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(errno.ENOENT, "video file not found", str(self.path))
        if self.path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "expected a video file, got a directory", str(self.path))
        if not os.access(self.path, os.R_OK):
            raise PermissionError(errno.EACCES, "video file is not readable", str(self.path))
        super().__init__(name or f"file:{self.path.name}", live=realtime, on_state=on_state)
        self.realtime = realtime
        self.loop = loop
        self._pacer = Pacer(speed) if realtime else None
        self.file_position_s = 0.0
        self.duration_s: float | None = None
        self.loops = 0

    @classmethod
    def from_config(cls, cfg: FileConfig, name: str) -> FileSource:
        return cls(Path(cfg.path).expanduser(), realtime=cfg.realtime, loop=cfg.loop, speed=cfg.speed, name=name)

    def health(self) -> dict:
        """Counters plus progress through the file."""
        return {**super().health(), "file_position_s": self.file_position_s, "duration_s": self.duration_s,
                "loops": self.loops}

    async def _produce(self) -> AsyncIterator[tuple[float, np.ndarray]]:
        async for pts, position, image in iterate_in_thread(self._decode, self._stop, self.name):
            if self._pacer is not None:
                await self._pacer.wait(pts)
            self.file_position_s = position
            yield pts, image

    def _decode(self) -> Generator[tuple[float, float, np.ndarray], None, None]:
        """(stream pts, file position, image) over one pass, or forever when looping."""
        last: float | None = None
        offset = 0.0
        while True:
            produced = 0
            for position, step, image in self._decode_pass():
                pts = position + offset
                if last is not None and pts <= last:
                    offset += last + step - pts
                    pts = last + step
                last = pts
                produced += 1
                yield pts, position, image
            if not self.loop or produced == 0 or self.closed:
                return
            self.loops += 1

    def _decode_pass(self) -> Generator[tuple[float, float, np.ndarray], None, None]:
        """(file position s, frame duration s, image) for each decodable frame of one pass."""
        try:
            container = av.open(str(self.path))
        except (av.error.FFmpegError, OSError) as exc:
            raise SourceError(f"cannot open video file {self.path}: {exc}") from exc
        with container:
            if not container.streams.video:
                raise SourceError(f"no video stream in {self.path}")
            stream = container.streams.video[0]
            rate = stream.guessed_rate or stream.average_rate
            step = 1.0 / float(rate) if rate else 1.0 / DEFAULT_FPS
            if container.duration is not None:
                self.duration_s = container.duration / av.time_base
            start = stream.start_time or 0
            for position, frame in presentation_times(self._stamped(container, stream, start), step):
                if self.closed:
                    return
                yield position, step, frame.to_ndarray(format="rgb24")

    def _stamped(self, container: av.container.InputContainer, stream: av.VideoStream,
                 start: int) -> Generator[tuple[float | None, av.VideoFrame], None, None]:
        """(file seconds or None, frame) in decoder order; a demuxer error ends the pass, counted."""
        try:
            for frame in decode_video(container, self):
                if self.closed:
                    return
                if frame is None:
                    continue
                ts = frame.pts if frame.pts is not None else frame.dts
                yield (None if ts is None else float((ts - start) * stream.time_base)), frame
        except av.error.FFmpegError as exc:
            self.record_error(f"demuxing stopped early: {exc}")


def presentation_times(stamped: Iterable[tuple[float | None, T]], step: float,
                       depth: int = REORDER_DEPTH) -> Generator[tuple[float, T], None, None]:
    """Decoder-order (seconds or None, item) -> (seconds, item): the items keep their order, the
    seconds of the next `depth` items are handed out smallest first and strictly increase
    (a duplicate moves up by step / 1000). None is the newest time plus `step` (0 first).
    A jump back of more than `depth` steps is a restarted clock: what waits is handed out and
    the new clock's times follow as they are."""
    waiting: deque[T] = deque()
    times: list[float] = []
    newest = last = -math.inf

    def hand_out() -> tuple[float, T]:
        nonlocal last
        last = max(heapq.heappop(times), last + step / 1000)
        return last, waiting.popleft()

    for t, item in stamped:
        if t is None:
            t = 0.0 if newest == -math.inf else newest + step
        elif t < newest - depth * step:
            while waiting:
                yield hand_out()
            newest = last = -math.inf
        newest = max(newest, t)
        heapq.heappush(times, t)
        waiting.append(item)
        if len(waiting) > depth:
            yield hand_out()
    while waiting:
        yield hand_out()

def decode_video(
    container: av.container.InputContainer, source: Source
) -> Generator[av.VideoFrame | None, None, None]:
    """The frames of the container's first video stream, and None after each packet that gave
    none (so a live reader can watch the clock). Packets the decoder rejects are skipped and
    packets the demuxer flags corrupt are decoded anyway, each counted once as a decode error
    on `source`, and so is a frame the decoder flags corrupt unless a damage was counted within
    the last `REORDER_DEPTH` packets (then it is that damage showing); demuxer errors propagate."""
    if not container.streams.video:
        raise SourceError(f"no video stream in {container.name}")
    stream = container.streams.video[0]
    counted = 0  # packets left during which a flagged frame is a damage already counted
    for packet in container.demux(stream):
        counted = max(0, counted - 1)
        try:
            frames = packet.decode()
        except av.error.FFmpegError as exc:
            source.record_decode_error(f"skipped an undecodable packet at dts {packet.dts}: {exc}")
            counted = REORDER_DEPTH
            yield None
            continue
        if packet.is_corrupt:
            source.record_decode_error(f"decoded a packet flagged corrupt at dts {packet.dts}")
            counted = REORDER_DEPTH
        if not frames:
            yield None
        for frame in frames:
            if frame.is_corrupt:
                if not counted:
                    source.record_decode_error(f"decoded a frame flagged corrupt at pts {frame.pts}")
                counted = REORDER_DEPTH
            yield frame
