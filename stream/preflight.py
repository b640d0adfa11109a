"""Checks at start for the ordinary mistakes a config can make, before the model loads.

`load_config` checks the config's shape without touching the world; these checks look at it:
the torch device exists, a local model path is a checkpoint directory, a file source holds a
decodable video stream, output paths can be written, and the memories' preallocated buffers
fit in memory. Each problem is a `ConfigError` naming its field, so the CLI prints one line
and exits 2 instead of failing after the model loaded or the stream ran.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import av
import torch

from .config import Config
from .errors import ConfigError
from .sources.file import FileConfig
from .vlm.registry import DTYPES, hidden_size, local_checkpoint_problem, model_config, unsupported, vectors_per_token

log = logging.getLogger(__name__)

INDEX_BYTES_PER_ROW = 56  # the store's int64 slot/free/group/pts/row/col and float32 score/weight columns
PIXELS_PER_TOKEN = 28 * 28  # Qwen2.5-VL: 14 px patches merged 2x2, the fallback when a config lacks them


def check(cfg: Config) -> None:
    """Raise a ConfigError for the first problem found by the checks that need no model
    (`check_memory_fits` reads the model's config, which may build the test model or ask the hub)."""
    check_device(cfg.model.device)
    if (problem := local_checkpoint_problem(cfg.model.name)) is not None:
        raise ConfigError(problem, "model.name")
    for prefix, cam in _prefixed(cfg):
        if isinstance(cam.source, FileConfig):
            probe_video(cam.source.path, f"{prefix}source.path")
        if cam.output.visuals_dir:
            check_writable_dir(cam.output.visuals_dir, f"{prefix}output.visuals_dir")
    if cfg.output.jsonl:
        check_appendable(cfg.output.jsonl, "output.jsonl")


def _prefixed(cfg: Config) -> list[tuple[str, Config]]:
    """Each camera's config with the dotted prefix its fields are reported under."""
    if not cfg.cameras:
        return [("", cfg)]
    return [(f"cameras[{i}].", c) for i, c in enumerate(cfg.cameras)]


def one_line(text: str) -> str:
    """Messages from libraries (FFmpeg, the hub client, OpenSSL) folded onto one line."""
    return " ".join(str(text).split())


def check_device(device: str) -> None:
    """The device parses and this torch can use it (a CPU build has no CUDA)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"{device!r} is not a torch device ({one_line(e)})", "model.device") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ConfigError(f"{device!r} needs a CUDA build of torch; this one is {torch.__version__} (CPU only)",
                              "model.device")
        count = torch.cuda.device_count()
        if count == 0:
            raise ConfigError(f"{device!r}: torch sees no CUDA device (driver, CUDA_VISIBLE_DEVICES?)", "model.device")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"{device!r}: torch sees {count} CUDA device(s), numbered from 0", "model.device")
        return
    backend = getattr(torch, dev.type, None)
    is_available = getattr(backend, "is_available", None)
    if is_available is None or not is_available():
        raise ConfigError(f"{device!r} is not available to this torch ({torch.__version__})", "model.device")


def probe_video(path: str, field: str) -> None:
    """Open the file with PyAV as the file source will and decode up to its first frame."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{path} is a directory; expected a video file", field)
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                kinds = ", ".join(s.type for s in container.streams) or "no streams"
                raise ConfigError(f"{path} has no video stream ({kinds})", field)
            for frame in container.decode(container.streams.video[0]):
                log.debug("preflight: %s decodes (%dx%d)", path, frame.width, frame.height)
                return
    except (av.error.FFmpegError, OSError) as e:
        raise ConfigError(f"{path} is not a readable video: {one_line(e)}", field) from None
    raise ConfigError(f"{path} has a video stream but no decodable frame", field)


def check_writable_dir(path: str, field: str) -> None:
    """Create the directory and write a scratch file in it, so pictures written when the
    stream ends are not lost to a permission or a full disk."""
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p) as f:
            f.write(b"streamprune")
    except OSError as e:
        raise ConfigError(f"cannot write to {path}: {e.strerror or one_line(e)}", field) from None


def check_appendable(path: str, field: str) -> None:
    """Open the file for appending, as the JSONL sink will (its directory created)."""
    p = Path(path).expanduser()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("a"):
            pass
    except OSError as e:
        raise ConfigError(f"cannot append to {path}: {e.strerror or one_line(e)}", field) from None


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), None if unknown.
    The memory's store lives in host memory whatever the model's device."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def store_bytes(capacity: int, width: int, dtype: str, group_tokens: int) -> int:
    """What `TokenMemory` preallocates for its long-term store: `capacity` plus one group of
    rows, each a token of `width` values in the model's dtype and its index columns."""
    element = torch.empty((), dtype=DTYPES[dtype]).element_size()
    return (capacity + group_tokens) * (width * element + INDEX_BYTES_PER_ROW)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def check_memory_fits(cfg: Config) -> None:
    """The model's family is served, and every camera's store together fits in the available
    memory (a Qwen3-VL token holds its deepstack vectors too)."""
    try:
        mc = model_config(cfg.model.name)
    except ConfigError as e:
        raise ConfigError(e.detail, "model.name") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the model's config: {one_line(e)}", "model.name") from None
    if (problem := unsupported(cfg.model.name, mc.model_type)) is not None:
        raise ConfigError(problem, "model.name")
    free = available_memory()
    if free is None:
        log.info("preflight: available memory unknown (no /proc/meminfo); capacity not checked")
        return
    vectors = vectors_per_token(mc)
    width = hidden_size(mc) * vectors
    what = f"{hidden_size(mc)}-wide {cfg.model.dtype} tokens" + (f" with {vectors - 1} deepstack vectors each" if vectors > 1 else "")
    vision = getattr(mc, "vision_config", None)
    side = getattr(vision, "patch_size", 0) * getattr(vision, "spatial_merge_size", 0)
    per_token = side * side or PIXELS_PER_TOKEN
    total = 0
    for prefix, cam in _prefixed(cfg):
        need = store_bytes(cam.memory.capacity, width, cfg.model.dtype, cam.model.max_pixels // per_token)
        total += need
        if total > free:
            together = f" ({_gb(total)} with the cameras before it)" if total > need else ""
            raise ConfigError(
                f"{cam.memory.capacity} tokens preallocate {_gb(need)}{together} ({what} "
                f"of {cfg.model.name}), more than the {_gb(free)} of memory available; lower it",
                f"{prefix}memory.capacity")
    log.info("preflight: the memories preallocate %s of %s available", _gb(total), _gb(free))
