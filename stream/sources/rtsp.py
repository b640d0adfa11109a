"""Live streams through PyAV: `AVLiveSource` (any live input FFmpeg opens) and `RtspSource`.

Measured on the build machines: FFmpeg's RTSP demuxer never
reconnects, a killed server just ends the packet iteration over TCP, and a frozen one blocks a
read forever unless a timeout is set. So every open and read is bounded: the `timeout` socket
option (half of `stall_timeout_s`, because a timed-out read is retried once inside FFmpeg) and
PyAV's interrupt timeouts `(open_timeout_s, stall_timeout_s)` as a backstop; a frozen server is
then detected after about `stall_timeout_s`. `analyzeduration=0, probesize=32` bring the first
frame from ~1 s to ~0.1 s after connecting. Not `fflags=nobuffer`: with it, the H.264 clip the
tests serve demuxes but never decodes a frame (measured here). Any error or end becomes a
disconnect for `LiveSource` to reconnect. Credentials in a URL are replaced by `***` in names,
logs and errors.
"""
from __future__ import annotations

import math
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import av
import numpy as np

from ..errors import ConfigError
from ..validation import choice
from .base import Disconnected, LiveConfig, LiveSource, SourceError, StateCallback
from .file import decode_video
from .health import Backoff

TRANSPORTS = ("tcp", "udp", "udp_multicast", "http", "https")
SCHEMES = ("rtsp", "rtsps")
LOW_LATENCY = {"analyzeduration": "0", "probesize": "32"}


@dataclass(frozen=True)
class RtspConfig(LiveConfig):
    """`[source]` with kind = "rtsp"."""

    kind: str = choice("rtsp", default="rtsp")
    url: str = field(default="", repr=False)  # rtsp://[user:password@]host[:port]/path; not in repr: credentials
    transport: str = choice(*TRANSPORTS, default="tcp")
    options: dict = field(default_factory=dict)  # extra FFmpeg options (values as strings)

    def check(self) -> None:
        if urlsplit(self.url).scheme.lower() not in SCHEMES:
            raise ConfigError(f"an rtsp:// or rtsps:// URL is required, got {redact_url(self.url)!r}", "url")
        super().check()


def redact_url(url: str) -> str:
    """The URL with any user:password replaced by ***."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


def why(exc: BaseException, timeout_s: float) -> str:
    """A short reason for an FFmpeg/OS error, without the (possibly secret-bearing) URL."""
    if isinstance(exc, (av.error.ExitError, av.error.TimeoutError, TimeoutError)):
        return f"timed out (nothing received for {timeout_s:g} s)"
    return getattr(exc, "strerror", None) or type(exc).__name__


class AVLiveSource(LiveSource):
    """A live input opened with `av.open(target, format, options)`: reconnects, bounded reads.

    `pace` holds frames back to the stream's own clock, for a file standing in for a camera.
    """

    def __init__(
        self,
        target: str,
        name: str,
        *,
        format: str | None = None,
        options: dict[str, str] | None = None,
        pace: bool = False,
        open_timeout_s: float = 5.0,
        stall_timeout_s: float = 5.0,
        max_reconnects: int | None = None,
        backoff: Backoff | None = None,
        on_state: StateCallback | None = None,
    ):
        if not open_timeout_s > 0:
            raise ValueError(f"open_timeout_s must be > 0, got {open_timeout_s}")
        super().__init__(name, stall_timeout_s, max_reconnects, backoff, on_state)
        self.target = target
        self.shown = redact_url(target)
        self.format = format
        self.options = dict(options or {})
        self.pace = pace
        self.open_timeout_s = open_timeout_s

    def _connect(self) -> Generator[np.ndarray | None, None, None]:
        try:
            container = av.open(
                self.target, format=self.format, options=self.options,
                timeout=(self.open_timeout_s, self.stall_timeout_s),
            )
        except (av.error.FFmpegError, OSError) as exc:
            raise Disconnected(f"cannot open {self.shown}: {why(exc, self.open_timeout_s)}") from None
        with container:
            yield None
            origin: tuple[float, float] | None = None  # (wall, media time) the pacing counts from
            last = -math.inf
            try:
                for frame in decode_video(container, self):
                    if frame is None:
                        yield None
                        continue
                    t = frame.time
                    if self.pace and t is not None:
                        if origin is None or t < last:  # a clock that restarts (joined files) re-anchors
                            origin = (time.monotonic(), t)
                        last = t
                        delay = origin[0] + t - origin[1] - time.monotonic()
                        if delay > 0 and self._stop.wait(delay):
                            return
                    yield frame.to_ndarray(format="rgb24")
            except (av.error.FFmpegError, OSError, SourceError) as exc:
                raise Disconnected(f"lost {self.shown}: {why(exc, self.stall_timeout_s)}") from None


class RtspSource(AVLiveSource):
    """An RTSP camera. `options` adds or overrides FFmpeg demuxer options."""

    config_class = RtspConfig

    def __init__(
        self,
        url: str,
        transport: str = "tcp",
        *,
        open_timeout_s: float = 5.0,
        stall_timeout_s: float = 5.0,
        max_reconnects: int | None = None,
        backoff: Backoff | None = None,
        options: dict[str, str] | None = None,
        name: str | None = None,
        on_state: StateCallback | None = None,
    ):
        if urlsplit(url).scheme.lower() not in SCHEMES:
            raise ValueError(f"an RTSP source needs an rtsp:// or rtsps:// URL, got {redact_url(url)!r}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        opts = rtsp_options(transport, stall_timeout_s) | dict(options or {})
        parts = urlsplit(redact_url(url))
        super().__init__(
            url, name or f"rtsp:{parts.hostname}{parts.path}", options=opts,
            open_timeout_s=open_timeout_s, stall_timeout_s=stall_timeout_s,
            max_reconnects=max_reconnects, backoff=backoff, on_state=on_state,
        )
        self.transport = transport

    @classmethod
    def from_config(cls, cfg: RtspConfig, name: str) -> RtspSource:
        options = {k: str(v) for k, v in cfg.options.items()}
        return cls(cfg.url, cfg.transport, options=options or None, name=name, **cfg.connection())


def rtsp_options(transport: str, stall_timeout_s: float) -> dict[str, str]:
    """FFmpeg RTSP demuxer options: low latency, socket I/O bounded by half the stall timeout."""
    return {**LOW_LATENCY, "rtsp_transport": transport, "timeout": str(max(1, round(stall_timeout_s / 2 * 1e6)))}
