"""A webcam through PyAV's v4l2 input, on the same reader, timeouts and reconnects as RTSP.

`device` is a number N or its digits (/dev/videoN), a device path, a stream URL or a video
file. URLs and files go through exactly the code a capture device does (only `av.open`'s
format and options differ), which is how the tests exercise it where no /dev/video exists; a
file stands in for a camera: paced to its own clock, replayed from the start after each end
(a reconnect). A missing or unreadable device or file is an error at construction, naming the
path; a camera unplugged later is a disconnect like any other, retried until it returns.

PyAV rather than OpenCV: one reader for every live source, and damaged packets can be counted
(OpenCV's read() hides them). Not verified on a real camera here (no /dev/video, no
v4l2loopback): device opening is only checked up to FFmpeg's v4l2 demuxer rejecting /dev/null.
"""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..validation import bounded, choice
from .base import LiveConfig, StateCallback
from .health import Backoff
from .rtsp import LOW_LATENCY, AVLiveSource, redact_url, rtsp_options

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WebcamConfig(LiveConfig):
    """`[source]` with kind = "webcam"; the capture mode applies to devices only."""

    kind: str = choice("webcam", default="webcam")
    device: str = "0"  # "0" = /dev/video0, a /dev path, or a file / URL
    input_format: str = ""  # v4l2 pixel format, e.g. "mjpeg"; "" = the driver's
    fps: float = bounded(10.0, 0.1, 240)  # capture fps
    width: int = bounded(640, 32, 7680)  # capture size
    height: int = bounded(480, 32, 4320)


def v4l2_options(
    width: int | None, height: int | None, fps: float | None, input_format: str | None
) -> dict[str, str]:
    """FFmpeg v4l2 demuxer options for the requested capture mode (unset = the driver's choice)."""
    opts = {}
    if width is not None and height is not None:
        opts["video_size"] = f"{width}x{height}"
    if fps is not None:
        opts["framerate"] = f"{fps:g}"
    if input_format:
        opts["input_format"] = input_format
    return opts


class WebcamSource(AVLiveSource):
    """A capture device (or a URL or file through the same path); `width`, `height`, `fps` and
    `input_format` (e.g. "mjpeg", often needed for 720p30 over USB) request a capture mode and
    apply to devices only."""

    config_class = WebcamConfig

    def __init__(
        self,
        device: int | str = 0,
        width: int | None = None,
        height: int | None = None,
        fps: float | None = None,
        *,
        input_format: str | None = None,
        open_timeout_s: float = 5.0,
        stall_timeout_s: float = 5.0,
        max_reconnects: int | None = None,
        backoff: Backoff | None = None,
        name: str | None = None,
        on_state: StateCallback | None = None,
    ):
        if (width is None) != (height is None) or (width is not None and (width < 1 or height < 1)):
            raise ValueError(f"give both width and height (>= 1) or neither, got {width}x{height}")
        if fps is not None and not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        kind, target = classify(device)
        fmt, pace = None, False
        if kind == "device":
            fmt, opts = "v4l2", v4l2_options(width, height, fps, input_format)
        elif kind == "url":
            rtsp = urlsplit(target).scheme.lower() in ("rtsp", "rtsps")
            opts = rtsp_options("tcp", stall_timeout_s) if rtsp else dict(LOW_LATENCY)
        else:
            opts, pace = {}, True
        if kind != "device" and (width is not None or fps is not None or input_format):
            log.info("%s: width, height, fps and input_format apply to capture devices only", redact_url(target))
        super().__init__(
            target, name or f"webcam:{redact_url(target)}", format=fmt, options=opts, pace=pace,
            open_timeout_s=open_timeout_s, stall_timeout_s=stall_timeout_s,
            max_reconnects=max_reconnects, backoff=backoff, on_state=on_state,
        )
        self.kind = kind

    @classmethod
    def from_config(cls, cfg: WebcamConfig, name: str) -> WebcamSource:
        return cls(cfg.device, cfg.width, cfg.height, cfg.fps, input_format=cfg.input_format or None, name=name,
                   **cfg.connection())


def classify(device: int | str) -> tuple[str, str]:
    """("device" | "url" | "file", target); a missing or unreadable device or file raises here."""
    if isinstance(device, bool) or not isinstance(device, (int, str)):
        raise TypeError(f"device must be a number, a /dev path, a URL or a file path, got {device!r}")
    if isinstance(device, str) and device.isdigit():  # "2" from a config file means /dev/video2
        device = int(device)
    if isinstance(device, int):
        if device < 0:
            raise ValueError(f"device number must be >= 0, got {device}")
        device = f"/dev/video{device}"
    if "://" in device:
        return "url", device
    path = Path(device).expanduser()
    kind = "device" if str(path).startswith("/dev/") else "file"
    what = "no camera at this device path (is it plugged in? see `ls /dev/video*`)" if kind == "device" \
        else "video file not found"
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, what, str(path))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "expected a capture device or a video file", str(path))
    if not os.access(path, os.R_OK):
        hint = " (add the user to the 'video' group)" if kind == "device" else ""
        raise PermissionError(errno.EACCES, f"cannot read {kind}{hint}", str(path))
    return kind, str(path)
