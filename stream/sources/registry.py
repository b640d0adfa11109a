"""The source kinds by name: a `[source]` table validated into its kind's settings, and the
source built from them.

Each kind lives in its own module with its settings dataclass (`config_class`) and
`from_config`. Kinds are imported when first used, so importing the registry does not load
PyAV or OpenCV; adding a kind is one line in `SOURCES`.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import fields

from ..errors import ConfigError
from ..validation import build
from .base import Source, SourceConfig

SOURCES = {
    "synthetic": "stream.sources.synthetic:SyntheticSource",
    "file": "stream.sources.file:FileSource",
    "rtsp": "stream.sources.rtsp:RtspSource",
    "webcam": "stream.sources.webcam:WebcamSource",
}
DEFAULT_KIND = "synthetic"


def source_class(kind: str) -> type[Source]:
    """The source class registered as `kind`."""
    if kind not in SOURCES:
        raise ValueError(f"unknown source kind {kind!r}; known kinds: {', '.join(SOURCES)}")
    module, _, attr = SOURCES[kind].partition(":")
    return getattr(importlib.import_module(module), attr)


def _dotted(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def source_config(table: dict, path: str = "source") -> SourceConfig:
    """Validate a `[source]` table (at dotted `path`) into the settings of its `kind`."""
    if not isinstance(table, dict):
        raise ConfigError(f"expected a table, got {table!r}", path)
    kind = table.get("kind", DEFAULT_KIND)
    if not isinstance(kind, str) or kind not in SOURCES:
        raise ConfigError(f"{kind!r} is not accepted; accepted values: {', '.join(SOURCES)}", _dotted(path, "kind"))
    cls = source_class(kind).config_class
    accepted = [f.name for f in fields(cls)]
    for key in table:
        if key not in accepted:
            raise ConfigError(f"not a field of a {kind} source; accepted fields: {', '.join(accepted)}",
                              _dotted(path, key))
    cfg = build(cls, table, path)
    try:
        cfg.check()
    except ConfigError as e:
        raise (e.under(path) if path else e) from None
    return cfg


def table_for(target: str) -> dict:
    """The `[source]` table for a command line's PATH_OR_URL: rtsp(s):// a camera stream,
    /dev/videoN or a bare device number a webcam, anything else a file."""
    if re.match(r"rtsps?://", target, re.IGNORECASE):
        return {"kind": "rtsp", "url": target}
    if re.fullmatch(r"/dev/video\d+|\d+", target):
        return {"kind": "webcam", "device": target}
    return {"kind": "file", "path": target}


def make_source(cfg: SourceConfig, name: str) -> Source:
    """The source `cfg` describes, called `name`."""
    return source_class(cfg.kind).from_config(cfg, name)
