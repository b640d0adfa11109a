"""Frame sources: async iterators of `Frame` (synthetic scripted camera, video files, RTSP
cameras, webcams), each with health as data (`state`, `stats`, `on_state` events).

The concrete sources load on first use, so importing the base does not pull in PyAV or OpenCV.
"""
from __future__ import annotations

import importlib
from typing import Any

from .base import Disconnected, LiveSource, Pacer, Source, SourceError
from .health import STATES, Backoff, SourceStats

_LAZY = {
    "AVLiveSource": "rtsp",
    "FileSource": "file",
    "GroundTruthEvent": "synthetic",
    "RtspSource": "rtsp",
    "Script": "synthetic",
    "SyntheticSource": "synthetic",
    "WebcamSource": "webcam",
    "make_script": "synthetic",
}

__all__ = [
    "STATES", "Backoff", "Disconnected", "LiveSource", "Pacer", "Source", "SourceError", "SourceStats", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
