"""Frame sources: async iterators of `Frame` (synthetic scripted camera, video files).

The concrete sources load on first use, so importing the base does not pull in PyAV or OpenCV.
"""
from __future__ import annotations

import importlib
from typing import Any

from .base import Pacer, Source, SourceError, SourceStats

_LAZY = {
    "FileSource": "file",
    "GroundTruthEvent": "synthetic",
    "Script": "synthetic",
    "SyntheticSource": "synthetic",
    "make_script": "synthetic",
}

__all__ = ["Pacer", "Source", "SourceError", "SourceStats", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
