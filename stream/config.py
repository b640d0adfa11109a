"""Pipeline configuration: TOML validated into dataclasses, one table per concept.

Every field has a default (the defaults are the offline demo), a type, and where it matters the
accepted values or range (stream/validation.py). The source table is chosen by its `kind`
(stream/sources/registry.py), pruner parameters are checked against the pruner's own names and
ranges, and each `[[cameras]]` table is merged over the top level (a camera's `source` replaces
the top-level one; other tables merge field by field). A bad field is reported by its dotted
path with what is accepted, as a `ConfigError` the CLI prints without a traceback. Fields that
moved keep working and log where they live now.
"""
from __future__ import annotations

import copy
import logging
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pruning
from pruning.base import describe_range

from .errors import ConfigError
from .http_settings import HttpSettings, check_http
from .mqtt_settings import MqttSettings, check_settings, topic_level_problem
from .query import DEFAULT_SYSTEM, TIMESTAMP_MODES
from .sampler import POLICIES
from .sources.registry import source_config
from .validation import bounded, build, choice, convert
from .vlm.layer_pruning import parse_schedule
from .watches import WatchSpec, check_watch

log = logging.getLogger(__name__)

DTYPE_NAMES = ("float32", "bfloat16", "float16")
MEMORY_DEVICES = ("model", "cpu")


@dataclass(frozen=True)
class SamplerConfig:
    fps: float = bounded(2.0, 0.05, 60)  # frames per second fed to the encoder
    policy: str = choice(*POLICIES, default="auto")  # auto: latest for live sources, every for files
    queue: int = bounded(2, 1, 64)  # latest: frames buffered before the oldest is dropped
    max_latency_s: float = bounded(5.0, 0.1, 3600.0)  # latest: a group waiting longer for the vision tower is dropped


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny-random"  # hub id or local path; tiny-random builds a test model
    dtype: str = choice(*DTYPE_NAMES, default="float32")
    device: str = "cpu"
    max_pixels: int = bounded(448 * 448, 56 * 56, 4096 * 4096)  # pixel budget per frame
    encode_batch: int = bounded(16, 1, 1024)  # most groups per vision-tower call, from all cameras on the model


@dataclass(frozen=True)
class MemoryConfig:
    pruner: str = choice(*pruning.PRUNERS, default="echoprune")
    capacity: int = bounded(4096, 0, 10_000_000)  # long-term store, tokens
    recent_groups: int = bounded(4, 0, 1024)  # newest groups kept whole
    evict_slack: float = bounded(0.25, 0.0, 0.9)  # evict down to capacity x (1 - slack): early rows change every few groups
    params: dict = field(default_factory=dict)  # the pruner's own parameters
    device: str = choice(*MEMORY_DEVICES, default="model")  # model: the memory and its pruner live on the model's device


@dataclass(frozen=True)
class QueryConfig:
    llm_budget: int = bounded(0, 0, 10_000_000)  # visual tokens the LLM sees; 0 = whole memory
    max_new_tokens: int = bounded(32, 1, 1024)
    max_question_chars: int = bounded(500, 1, 100_000)
    queue_size: int = bounded(4, 1, 10_000)  # questions waiting per camera; beyond it: `busy`
    dedup_window_s: float = bounded(600.0, 0.0, 86_400.0)  # a repeated question id in it is answered once
    watch_share: float = bounded(0.5, 0.05, 1.0)  # most of the LLM's time the camera's watches may take
    timestamps: str = choice(*TIMESTAMP_MODES, default="mrope")
    system_prompt: str = DEFAULT_SYSTEM
    prompt_cache: bool = True  # keep the prompt's KV current as frames arrive; false: prefill every question
    prompt_cache_mib: float = bounded(0.0, 0.0, 16_777_216.0)  # the cache's limit; 0 = what the memory needs
    layer_pruning: list = field(default_factory=list)  # [[layer, keep_ratio], ...]: drop visual tokens inside the LLM on the full path; [] = off


@dataclass(frozen=True)
class QuestionConfig:
    text: str = ""
    at_s: float = bounded(0.0, 0.0, None)  # stream time at which it is asked


@dataclass(frozen=True)
class OutputConfig:
    jsonl: str = ""  # append every answer, watch event and error as one JSON line here ("" = off)
    status_interval_s: float = bounded(5.0, 0.0, 3600)  # 0 = no periodic status line
    visuals_dir: str = ""  # write the memory's contact sheet and timeline here at the end


@dataclass(frozen=True)
class Config:
    name: str = "camera"
    source: Any = field(default_factory=lambda: source_config({}))  # one of the registry's kinds
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    questions: list[QuestionConfig] = field(default_factory=list)
    mqtt: MqttSettings = field(default_factory=MqttSettings)  # the MQTT front door (off by default)
    http: HttpSettings = field(default_factory=HttpSettings)  # the web page and HTTP APIs (off by default)
    watches: list[WatchSpec] = field(default_factory=list)  # standing questions; camera "" = every camera
    cameras: tuple["Config", ...] = ()  # several cameras, each complete; empty = this one

    def camera_configs(self) -> list["Config"]:
        """One complete config per camera (the top level itself when there is no `[[cameras]]`)."""
        return list(self.cameras) or [self]


MOVED = {  # old dotted field -> where it lives now
    "mqtt.max_question_chars": "query.max_question_chars",
    "mqtt.queue_size": "query.queue_size",
    "mqtt.dedup_window_s": "query.dedup_window_s",
}
CAMERA_SHORTHANDS = {  # [[cameras]] fields of the first edition -> the table they set
    "fps": ("sampler", "fps"), "pruner": ("memory", "pruner"), "params": ("memory", "params"),
    "capacity": ("memory", "capacity"), "recent_groups": ("memory", "recent_groups"),
}


def _move_old_fields(data: dict) -> None:
    for old, new in MOVED.items():
        (t_old, f_old), (t_new, f_new) = old.split("."), new.split(".")
        table = data.get(t_old)
        if isinstance(table, dict) and f_old in table:
            log.warning("config: %s is now %s", old, new)
            value = table.pop(f_old)
            target = data.setdefault(t_new, {})
            if isinstance(target, dict):
                target.setdefault(f_new, value)


def _camera_table(cam: Any, i: int) -> dict:
    """A `[[cameras]]` table in today's nested form (first-edition shorthands mapped; their
    "inherit" sentinels -1, 0 and "" dropped)."""
    if not isinstance(cam, dict):
        raise ConfigError(f"expected a table, got {cam!r}", f"cameras[{i}]")
    out = {k: v for k, v in cam.items() if k not in CAMERA_SHORTHANDS}
    for key, (table, name) in CAMERA_SHORTHANDS.items():
        value = cam.get(key)
        inherit = (value is None or (key in ("capacity", "recent_groups") and value == -1)
                   or (key == "fps" and value == 0) or (key == "pruner" and value == "")
                   or (key == "params" and not cam.get("pruner")))
        if inherit:
            continue
        target = out.setdefault(table, {})
        if not isinstance(target, dict):
            raise ConfigError(f"expected a table, got {target!r}", f"cameras[{i}].{table}")
        target.setdefault(name, value)
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _camera_data(top: dict, cam: dict) -> dict:
    """The top level with one camera's tables over it."""
    merged = _merge({k: v for k, v in top.items() if k != "source"}, {k: v for k, v in cam.items() if k != "source"})
    merged["source"] = cam.get("source", top.get("source", {}))
    memory = cam.get("memory", {})
    if isinstance(memory, dict) and "pruner" in memory and "params" not in memory:
        merged["memory"] = {**merged["memory"], "params": {}}  # another pruner's params do not carry over
    output, own = merged.get("output"), cam.get("output")
    visuals = output.get("visuals_dir", "") if isinstance(output, dict) else ""
    if visuals and isinstance(visuals, str) and not (isinstance(own, dict) and "visuals_dir" in own):
        merged["output"] = {**merged["output"], "visuals_dir": str(Path(visuals) / str(cam.get("name", "")))}
    return merged


def pruner_params(name: str, params: dict, path: str) -> dict:
    """The pruner's parameters checked by name, type and range, with the shared validator."""
    defaults = pruning.pruner_params(name)
    ranges = pruning.pruner_param_ranges(name)
    out = {}
    for key, value in params.items():
        if key not in defaults:
            raise ConfigError(f"unknown parameter of pruner {name!r}; accepted: {', '.join(defaults) or 'none'}",
                              f"{path}.{key}")
        default = defaults[key]
        tp = type(default) if default is not None else (float if isinstance(value, float) else int)
        lo, hi = ranges.get(key, (None, None))
        try:
            out[key] = convert(value, tp, f"{path}.{key}", {"min": lo, "max": hi})
        except ConfigError as e:
            if "out of range" not in e.detail:
                raise
            raise ConfigError(f"{value!r} is out of range; accepted: {describe_range(lo, hi)}", f"{path}.{key}") from None
    return out


def _one_camera(data: dict, where: str) -> Config:
    """One camera's complete config from its merged tables; `where` is "" or "cameras[1]"."""
    prefix = f"{where}." if where else ""
    data = dict(data)
    source = source_config(data.pop("source", {}) or {}, f"{prefix}source")
    data.pop("cameras", None)
    cfg = build(Config, data, where)
    memory = replace(cfg.memory, params=pruner_params(cfg.memory.pruner, cfg.memory.params, f"{prefix}memory.params"))
    try:
        schedule = parse_schedule(cfg.query.layer_pruning)
    except ValueError as e:
        raise ConfigError(f"{e}; e.g. [[14, 0.5], [21, 0.25]]", f"{prefix}query.layer_pruning") from None
    if not cfg.name.strip():
        raise ConfigError("must not be empty", f"{prefix}name")
    for i, q in enumerate(cfg.questions):
        if not q.text.strip():
            raise ConfigError("must not be empty", f"{prefix}questions[{i}].text")
    return replace(cfg, source=source, memory=memory, query=replace(cfg.query, layer_pruning=[list(s) for s in schedule]))


def _check_service(cfg: Config, names: list[str]) -> None:
    """Rules across cameras: the front doors' settings, watches naming real cameras."""
    try:
        check_settings(cfg.mqtt)
    except ConfigError as e:
        raise e.under("mqtt") from None
    try:
        check_http(cfg.http)
    except ConfigError as e:
        raise e.under("http") from None
    if cfg.http.enabled:
        for i, name in enumerate(names):
            if "/" in name:
                raise ConfigError(f"{name!r} must not contain '/' (it is one level of the HTTP API's paths)",
                                  f"cameras[{i}].name" if cfg.cameras else "name")
    if cfg.mqtt.enabled:
        for i, name in enumerate(names):
            if (problem := topic_level_problem(name)) is not None:
                raise ConfigError(f"{name!r} {problem}", f"cameras[{i}].name" if cfg.cameras else "name")
    seen: dict[str, set[str]] = {n: set() for n in names}
    for i, w in enumerate(cfg.watches):
        try:
            check_watch(w)
        except ConfigError as e:
            raise e.under(f"watches[{i}]") from None
        if w.camera and w.camera not in names:
            raise ConfigError(f"no camera named {w.camera!r}; cameras: {', '.join(names)}", f"watches[{i}].camera")
        for camera in [w.camera] if w.camera else names:
            if w.name in seen[camera]:
                raise ConfigError(f"{w.name!r} is used twice for camera {camera!r}", f"watches[{i}].name")
            seen[camera].add(w.name)


def from_dict(data: dict) -> Config:
    """Validate a config given as plain tables (what TOML gives)."""
    data = copy.deepcopy(data)
    _move_old_fields(data)
    cameras = data.get("cameras", [])
    if not isinstance(cameras, list):
        raise ConfigError(f"expected an array of tables ([[cameras]]), got {cameras!r}", "cameras")
    top = _one_camera(data, "")
    if not cameras:
        _check_service(top, [top.name])
        return top
    built = []
    for i, cam in enumerate(cameras):
        table = _camera_table(cam, i)
        _move_old_fields(table)
        built.append(_one_camera(_camera_data(data, table), f"cameras[{i}]"))
    names = [c.name for c in built]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError(f"{name!r} is used by two cameras", f"cameras[{i}].name")
    cfg = replace(top, cameras=tuple(built))
    _check_service(cfg, names)
    return cfg


def load_config(path: str | Path | None, overrides: dict | None = None) -> Config:
    """Read and validate a TOML config (None: the defaults); `overrides` ({"model": {"name": ...}})
    win, for every camera; a `source` override replaces the source table whole."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such config file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    over = dict(overrides or {})
    source = over.pop("source", None)
    data = _merge(data, over)
    if source is not None:
        if data.get("cameras"):
            raise ConfigError("a source given on the command line needs a config with one camera, not [[cameras]]",
                              "cameras")
        data["source"] = source
    per_camera = {k: v for k, v in over.items() if k == "memory"}  # the model is shared; outputs per camera
    if per_camera and isinstance(data.get("cameras"), list):
        data["cameras"] = [_merge(_camera_table(c, i), per_camera) for i, c in enumerate(data["cameras"])]
    return from_dict(data)


__all__ = ["Config", "ConfigError", "load_config", "from_dict"]
