"""Frames from a video file through PyAV (any container/codec FFmpeg reads), decoded in a thread.

Damage is survived and counted in `stats.decode_errors` (and `stats.errors`), one per damaged
packet: packets the decoder rejects are skipped; packets the demuxer flags corrupt (MPEG-TS sync
or continuity loss, a cut last packet) are counted but still decoded, as FFmpeg does by default,
because they are often whole and dropping one corrupts every frame that references it; a
demuxer error (a truncated file) ends the pass, counted in `stats.errors`. A resolution or
pixel-format change just yields RGB frames of the new size. `decode_video` is that packet loop,
shared with the live PyAV sources.

pts is seconds since the stream's start time (index / fps when a frame has none) and is kept
strictly increasing: a timestamp that goes back (the next loop, a concatenated file restarting
its clock) continues one frame duration after the previous frame.
"""
from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from ..errors import ConfigError
from ..validation import bounded, choice
from .base import Pacer, Source, SourceConfig, SourceError, StateCallback, iterate_in_thread

DEFAULT_FPS = 30.0  # frame duration when the stream declares no rate


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
            position = -step
            try:
                for frame in decode_video(container, self):
                    if self.closed:
                        return
                    if frame is None:
                        continue
                    if frame.pts is None:
                        position += step
                    else:
                        position = float((frame.pts - start) * stream.time_base)
                    yield position, step, frame.to_ndarray(format="rgb24")
            except av.error.FFmpegError as exc:
                self.record_error(f"demuxing stopped early: {exc}")


def decode_video(
    container: av.container.InputContainer, source: Source
) -> Generator[av.VideoFrame | None, None, None]:
    """The frames of the container's first video stream, and None after each packet that gave
    none (so a live reader can watch the clock). Packets the decoder rejects are skipped and
    packets the demuxer flags corrupt are decoded anyway, each counted once as a decode error
    on `source`; demuxer errors propagate."""
    if not container.streams.video:
        raise SourceError(f"no video stream in {container.name}")
    stream = container.streams.video[0]
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.error.FFmpegError as exc:
            source.record_decode_error(f"skipped an undecodable packet at dts {packet.dts}: {exc}")
            yield None
            continue
        if packet.is_corrupt:
            source.record_decode_error(f"decoded a packet flagged corrupt at dts {packet.dts}")
        if not frames:
            yield None
        yield from frames
