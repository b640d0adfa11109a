"""Validating TOML/JSON tables into frozen dataclasses, torch-free so sinks can use it too.

A field's metadata may name its accepted values (`choice`) or range (`bounded`). A float field
must be a finite number: TOML and Python's JSON accept NaN and infinity, and NaN passes every
range check. A bad field is reported by its dotted path and what is accepted, as a
`ConfigError`.
"""
from __future__ import annotations

import math
import typing
from dataclasses import MISSING, field, fields, is_dataclass
from typing import Any

from .errors import ConfigError


def choice(*values: str, default: str) -> Any:
    return field(default=default, metadata={"choices": values})


def bounded(default: Any, lo: float | None = None, hi: float | None = None) -> Any:
    return field(default=default, metadata={"min": lo, "max": hi})


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a table"}.get(tp, str(tp))


def convert(value: Any, tp: Any, path: str, meta: typing.Mapping[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"expected a table, got {value!r}", path)
        return build(tp, value, path)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"expected an array of tables, got {value!r}", path)
        return [convert(v, item, f"{path}[{i}]", {}) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is dict and isinstance(value, dict):
        return dict(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", path)
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"expected a finite number, got {value!r}", path)
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{value!r} is not accepted; accepted values: {', '.join(meta['choices'])}", path)
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
        raise ConfigError(f"{value!r} is out of range; accepted: {span}", path)
    return value


def build(cls: type, data: dict, prefix: str = "") -> Any:
    """Validate a TOML table into dataclass `cls`, naming any bad field by dotted path."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in known:
            raise ConfigError(f"unknown field; accepted fields: {', '.join(known)}", path)
        kwargs[key] = convert(value, hints[key], path, known[key].metadata)
    for f in known.values():
        if f.default is MISSING and f.default_factory is MISSING and f.name not in kwargs:
            raise ConfigError("required", f"{prefix}.{f.name}" if prefix else f.name)
    return cls(**kwargs)
