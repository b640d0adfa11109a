"""Frame sources: async iterators of `Frame` (synthetic scripted camera, video files, RTSP
cameras, webcams), each with health as data (`state`, `stats`, `on_state` events).

One module per kind holds the source and its settings dataclass; `registry` maps kind names to
them. The concrete sources load on first use, so importing the base does not pull in PyAV or
OpenCV.
"""
from __future__ import annotations

import importlib
from typing import Any

from .base import Disconnected, LiveConfig, LiveSource, Pacer, Source, SourceConfig, SourceError
from .health import STATES, Backoff, SourceStats
from .registry import SOURCES, make_source, source_config

_LAZY = {
    "AVLiveSource": "rtsp",
    "FileConfig": "file",
    "FileSource": "file",
    "GroundTruthEvent": "synthetic",
    "RtspConfig": "rtsp",
    "RtspSource": "rtsp",
    "Script": "synthetic",
    "SyntheticConfig": "synthetic",
    "SyntheticSource": "synthetic",
    "WebcamConfig": "webcam",
    "WebcamSource": "webcam",
    "make_script": "synthetic",
}

__all__ = [
    "SOURCES", "STATES", "Backoff", "Disconnected", "LiveConfig", "LiveSource", "Pacer", "Source", "SourceConfig",
    "SourceError", "SourceStats", "make_source", "source_config", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
