"""Ordinary mistakes get one line and exit 2 at start, before the model loads: a file source
that is not a video, a device this torch cannot use, a model path that is no checkpoint, an
unwritable visuals directory, a CA file that is not PEM, a capacity that cannot be allocated.
A failure that can only show late is told once, with its traceback under -v."""
from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from stream.config import ConfigError
from stream.mqtt_settings import MqttSettings, check_settings
from stream.preflight import available_memory

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "stream.cli"]
QUIET = '[output]\nstatus_interval_s = 0.0\n'


def _run(tmp_path, model_cache, toml: str, *args: str, verbose: bool = False) -> tuple[int, list[str]]:
    """Run `streamprune [-v] run` on `toml`; the exit code and every line it printed, both streams."""
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(toml)
    env = {**os.environ, "STREAMPRUNE_CACHE": str(model_cache)}
    r = subprocess.run(CLI + ["-v"] * verbose + ["run", str(cfg), "--no-interactive", *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    return r.returncode, (r.stdout + r.stderr).splitlines()


def _assert_one_config_error(rc: int, lines: list[str], needle: str) -> None:
    assert rc == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("streamprune: config error: ") and needle in lines[0], lines
    assert "Traceback" not in lines[0]


def _file_source(path: Path) -> str:
    return f'[source]\nkind = "file"\npath = {json.dumps(str(path))}\n' + QUIET


def _audio_only(path: Path) -> None:
    """A valid MP4 with one AAC track and no picture."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


@pytest.mark.parametrize("kind, needle", [
    ("empty", "is not a readable video"),
    ("text", "is not a readable video"),
    ("audio", "has no video stream (audio)"),
])
def test_a_file_source_without_decodable_video_is_refused(tmp_path, model_cache, kind, needle):
    clip = tmp_path / f"{kind}.mp4"
    if kind == "empty":
        clip.write_bytes(b"")
    elif kind == "text":
        clip.write_text("this is a text file, not a video\n" * 20)
    else:
        _audio_only(clip)
    rc, lines = _run(tmp_path, model_cache, _file_source(clip))
    _assert_one_config_error(rc, lines, f"source.path: {clip} {needle}")


def test_a_device_this_torch_cannot_use_is_refused(tmp_path, model_cache):
    device = f"cuda:{torch.cuda.device_count()}" if torch.backends.cuda.is_built() else "cuda"
    rc, lines = _run(tmp_path, model_cache, QUIET, "--device", device)
    _assert_one_config_error(rc, lines, f"model.device: {device!r}")


@pytest.mark.parametrize("name, needle", [
    ("/nonexistent/dir", "no such checkpoint directory: /nonexistent/dir"),
    (".", ". has no config.json"),
])
def test_a_model_path_that_is_no_checkpoint_is_refused(tmp_path, model_cache, name, needle):
    rc, lines = _run(tmp_path, model_cache, QUIET, "--model", name)
    _assert_one_config_error(rc, lines, f"model.name: {needle}")


def test_an_unwritable_visuals_dir_is_refused_before_the_stream_runs(tmp_path, model_cache):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where a directory is needed")  # fails even for root, unlike a chmod
    rc, lines = _run(tmp_path, model_cache, QUIET, "--visuals", str(blocker / "vis"))
    _assert_one_config_error(rc, lines, f"output.visuals_dir: cannot write to {blocker / 'vis'}: ")


def test_a_ca_file_that_is_not_pem_is_a_config_error(tmp_path, model_cache):
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    toml = f'[mqtt]\nenabled = true\ntls = true\nca_file = {json.dumps(str(ca))}\n' + QUIET
    rc, lines = _run(tmp_path, model_cache, toml)
    _assert_one_config_error(rc, lines, f"mqtt.ca_file: {ca} is not a usable CA bundle")


def test_a_pem_ca_bundle_passes():
    bundle = ssl.get_default_verify_paths().cafile
    if not bundle:
        pytest.skip("this OpenSSL names no default CA bundle file")
    assert check_settings(MqttSettings(tls=True, ca_file=bundle)).ca_file == bundle
    with pytest.raises(ConfigError, match="ca_file: no such file"):
        check_settings(MqttSettings(tls=True, ca_file=bundle + ".missing"))


SEVEN_B = {  # the shape of Qwen2.5-VL-7B's config.json: enough to size its memory, no weights
    "model_type": "qwen2_5_vl",
    "text_config": {"model_type": "qwen2_5_vl_text", "hidden_size": 3584, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944},
    "vision_config": {"hidden_size": 1280, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2},
}


def test_a_capacity_that_cannot_be_preallocated_is_refused(tmp_path, model_cache):
    need = (10_000_000 + 256) * (3584 * 4 + 56)
    free = available_memory()
    if free is None or free > need:
        pytest.skip(f"needs a machine with less than {need / 1e9:.0f} GB available")
    checkpoint = tmp_path / "qwen7b"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(SEVEN_B))
    rc, lines = _run(tmp_path, model_cache, '[memory]\ncapacity = 10000000\n' + QUIET, "--model", str(checkpoint))
    _assert_one_config_error(rc, lines, f"memory.capacity: 10000000 tokens preallocate {need / 1e9:.1f} GB")
    assert "3584-wide float32" in lines[0]


def test_a_late_failure_is_told_once_and_v_shows_its_traceback(tmp_path, model_cache):
    checkpoint = tmp_path / "qwen7b"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(SEVEN_B))  # passes the checks; no weights to load
    rc, lines = _run(tmp_path, model_cache, QUIET, "--model", str(checkpoint))
    assert rc == 1, lines
    told = [line for line in lines if str(checkpoint.name) in line and "loading" not in line]
    assert len(told) == 1 and told[0].startswith("streamprune: ") and "-v" in told[0], lines
    assert not any("Traceback" in line for line in lines)
    rc, lines = _run(tmp_path, model_cache, QUIET, "--model", str(checkpoint), verbose=True)
    assert rc == 1 and any("Traceback" in line for line in lines), lines
