"""Pipeline configuration: TOML validated into dataclasses.

Every field has a default (the defaults are the offline demo), a type, and where it matters
the accepted values or range (stream/validation.py). A bad field is reported by its dotted path
with what is accepted, as a `ConfigError` the CLI prints without a traceback.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

import pruning
from sinks.mqtt_settings import MqttSettings, SettingsError, WatchSpec, check_service

from .query import DEFAULT_SYSTEM, TIMESTAMP_MODES
from .sampler import POLICIES
from .validation import ConfigError, bounded, build, choice
from .vlm.qwen import DTYPES

SOURCE_KINDS = ("synthetic", "file", "rtsp", "webcam")
TRANSPORTS = ("tcp", "udp", "udp_multicast", "http", "https")


@dataclass(frozen=True)
class SourceConfig:
    kind: str = choice(*SOURCE_KINDS, default="synthetic")
    path: str = ""  # file: any container/codec FFmpeg reads
    url: str = ""  # rtsp: rtsp://[user:password@]host[:port]/path
    transport: str = choice(*TRANSPORTS, default="tcp")  # rtsp
    device: str = "0"  # webcam: "0" = /dev/video0, a /dev path, or a file / URL
    input_format: str = ""  # webcam: v4l2 pixel format, e.g. "mjpeg"; "" = the driver's
    open_timeout_s: float = bounded(5.0, 0.1, 600)  # rtsp, webcam
    stall_timeout_s: float = bounded(5.0, 0.1, 3600)  # rtsp, webcam: no frame this long = lost
    max_reconnects: int = bounded(-1, -1, 10**9)  # rtsp, webcam: failed attempts in a row; -1 = forever
    reconnect_initial_s: float = bounded(0.5, 0.01, 3600)  # rtsp, webcam: first backoff delay
    reconnect_max_s: float = bounded(30.0, 0.01, 86400)  # rtsp, webcam: backoff cap
    options: dict = field(default_factory=dict)  # rtsp: extra FFmpeg options (values as strings)
    fps: float = bounded(10.0, 0.1, 240)  # synthetic: frames rendered per second; webcam: capture fps
    duration_s: float = bounded(60.0, 1.0, 86400 * 7)  # synthetic: length of the scripted scene
    seed: int = 0  # synthetic: the scene script and noise
    width: int = bounded(640, 32, 7680)  # synthetic
    height: int = bounded(480, 32, 4320)  # synthetic
    realtime: bool = False  # pace to wall clock (a live camera); False = as fast as decoded
    speed: float = bounded(1.0, 0.01, 1000)  # with realtime: playback speed factor
    loop: bool = False  # file: start over at the end


@dataclass(frozen=True)
class SamplerConfig:
    fps: float = bounded(2.0, 0.05, 60)  # frames per second fed to the encoder
    policy: str = choice(*POLICIES, default="auto")  # auto: latest for live sources, every for files
    queue: int = bounded(2, 1, 64)  # latest: frames buffered before the oldest is dropped


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny-random"  # hub id or local path (Qwen2.5-VL); tiny-random builds a test model
    dtype: str = choice(*DTYPES, default="float32")
    device: str = "cpu"
    max_pixels: int = bounded(448 * 448, 56 * 56, 4096 * 4096)  # pixel budget per frame


@dataclass(frozen=True)
class MemoryConfig:
    pruner: str = choice(*pruning.PRUNERS, default="echoprune")
    capacity: int = bounded(4096, 0, 10_000_000)  # long-term store, tokens
    recent_groups: int = bounded(4, 0, 1024)  # newest groups kept whole
    params: dict = field(default_factory=dict)  # the pruner's own parameters


@dataclass(frozen=True)
class QueryConfig:
    llm_budget: int = bounded(0, 0, 10_000_000)  # visual tokens the LLM sees; 0 = whole memory
    max_new_tokens: int = bounded(32, 1, 1024)
    max_question_chars: int = bounded(500, 1, 100_000)
    timestamps: str = choice(*TIMESTAMP_MODES, default="mrope")
    system_prompt: str = DEFAULT_SYSTEM


@dataclass(frozen=True)
class QuestionConfig:
    text: str = ""
    at_s: float = bounded(0.0, 0.0, None)  # stream time at which it is asked


@dataclass(frozen=True)
class OutputConfig:
    jsonl: str = ""  # append every answer as one JSON line here ("" = off)
    status_interval_s: float = bounded(5.0, 0.0, 3600)  # 0 = no periodic status line
    visuals_dir: str = ""  # write the memory's contact sheet and timeline here at the end


@dataclass(frozen=True)
class CameraConfig:
    """One of several cameras in one process; unset fields take the top-level values."""

    name: str = ""
    source: SourceConfig = field(default_factory=SourceConfig)
    fps: float = bounded(0.0, 0.0, 60)  # sampler fps; 0 = sampler.fps
    pruner: str = ""  # "" = memory.pruner (with memory.params)
    params: dict = field(default_factory=dict)  # the pruner's parameters when `pruner` is set
    capacity: int = bounded(-1, -1, 10_000_000)  # -1 = memory.capacity
    recent_groups: int = bounded(-1, -1, 1024)  # -1 = memory.recent_groups


@dataclass(frozen=True)
class Config:
    name: str = "camera"
    source: SourceConfig = field(default_factory=SourceConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    questions: list[QuestionConfig] = field(default_factory=list)
    mqtt: MqttSettings = field(default_factory=MqttSettings)  # the MQTT service (off by default)
    watches: list[WatchSpec] = field(default_factory=list)  # standing questions, served over MQTT
    cameras: list[CameraConfig] = field(default_factory=list)  # several cameras; empty = this one

    def camera_configs(self) -> list["Config"]:
        """One complete config per camera (the top level itself when `cameras` is empty)."""
        if not self.cameras:
            return [self]
        out = []
        for cam in self.cameras:
            memory = replace(
                self.memory,
                pruner=cam.pruner or self.memory.pruner,
                params=cam.params if cam.pruner else self.memory.params,
                capacity=self.memory.capacity if cam.capacity < 0 else cam.capacity,
                recent_groups=self.memory.recent_groups if cam.recent_groups < 0 else cam.recent_groups,
            )
            visuals = str(Path(self.output.visuals_dir) / cam.name) if self.output.visuals_dir else ""
            out.append(replace(
                self, name=cam.name, source=cam.source, memory=memory, cameras=[],
                sampler=replace(self.sampler, fps=cam.fps or self.sampler.fps),
                output=replace(self.output, visuals_dir=visuals),
            ))
        return out


def _check_camera(cfg: Config, where: str) -> None:
    """One camera's source and pruner; `where` is the dotted path of its table ("" or "cameras[1].")."""
    src = f"{where}source"
    if cfg.source.kind == "file" and not cfg.source.path:
        raise ConfigError(f"{src}.path: required when source.kind = \"file\"")
    if cfg.source.kind == "file" and not Path(cfg.source.path).expanduser().exists():
        raise ConfigError(f"{src}.path: no such file: {cfg.source.path}")
    if cfg.source.kind == "rtsp" and not cfg.source.url.startswith(("rtsp://", "rtsps://")):
        raise ConfigError(f"{src}.url: an rtsp:// URL is required when source.kind = \"rtsp\", got {cfg.source.url!r}")
    if cfg.source.reconnect_max_s < cfg.source.reconnect_initial_s:
        raise ConfigError(f"{src}.reconnect_max_s: must be >= reconnect_initial_s")
    if where and cfg.memory.pruner not in pruning.PRUNERS:
        raise ConfigError(f"{where}pruner: {cfg.memory.pruner!r} is not accepted; accepted values: {', '.join(pruning.PRUNERS)}")
    try:
        pruning.get_pruner(cfg.memory.pruner, **cfg.memory.params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where + 'params' if where else 'memory.params'}: {e}") from None


def check(cfg: Config) -> Config:
    """Cross-field rules that one field alone cannot express."""
    cameras = cfg.camera_configs()
    names = [c.name for c in cameras]
    for i, cam in enumerate(cameras):
        where = f"cameras[{i}]." if cfg.cameras else ""
        if not cam.name.strip():
            raise ConfigError(f"{where}name: must not be empty")
        if names.index(cam.name) != i:
            raise ConfigError(f"{where}name: {cam.name!r} is used by two cameras")
        _check_camera(cam, where)
    for i, q in enumerate(cfg.questions):
        if not q.text.strip():
            raise ConfigError(f"questions[{i}].text: must not be empty")
    try:
        check_service(cfg.mqtt, cfg.watches, names)
    except SettingsError as e:
        raise ConfigError(str(e)) from None
    return cfg


def load_config(path: str | Path, overrides: dict | None = None) -> Config:
    """Read and validate a TOML config; `overrides` ({"model": {"name": ...}}) win."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return from_dict(_merge(data, overrides or {}))


def from_dict(data: dict) -> Config:
    return check(build(Config, data))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


__all__ = ["Config", "ConfigError", "load_config", "from_dict"]
