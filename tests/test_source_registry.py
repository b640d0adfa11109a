"""The source registry: each kind's `[source]` table validated into its own settings (bad fields
named by dotted path), the shipped configs, and the source each kind builds from its settings."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from stream.errors import ConfigError
from stream.sources import (
    SOURCES, Backoff, FileConfig, FileSource, RtspConfig, RtspSource, SyntheticConfig, SyntheticSource,
    WebcamConfig, WebcamSource, make_source, source_config,
)

ROOT = Path(__file__).resolve().parent.parent


def error(table: dict, path: str = "source") -> ConfigError:
    with pytest.raises(ConfigError) as e:
        source_config(table, path)
    return e.value


def test_each_kind_has_its_own_settings_and_synthetic_is_the_default(tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.touch()
    assert list(SOURCES) == ["synthetic", "file", "rtsp", "webcam"]
    assert source_config({}) == SyntheticConfig()
    assert source_config({"kind": "file", "path": str(clip), "loop": True}) == FileConfig(path=str(clip), loop=True)
    rtsp = source_config({"kind": "rtsp", "url": "rtsp://cam/a", "max_reconnects": 3, "options": {"probesize": 5}})
    assert rtsp == RtspConfig(url="rtsp://cam/a", max_reconnects=3, options={"probesize": 5})
    assert source_config({"kind": "webcam", "fps": 15}) == WebcamConfig(fps=15.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rtsp.url = "rtsp://other/b"


def test_the_shipped_configs_source_tables_validate():
    checked = 0
    for path in sorted((ROOT / "configs").glob("*.toml")):
        data = tomllib.loads(path.read_text())
        tables = [("source", data["source"])] if "source" in data else []
        tables += [(f"cameras[{i}].source", c["source"]) for i, c in enumerate(data.get("cameras", []))]
        for where, table in tables:
            if table.get("kind") == "file":
                assert "source.path: no such file: clip.mp4" in str(error(table, where))  # set by the user
                continue
            cfg = source_config(table, where)
            assert cfg.kind == table.get("kind", "synthetic")
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize("table, path, needle", [
    ({"kind": "rtsp", "url": "rtsp://cam/a", "stall_timeout_s": 0}, "cameras[1].source.stall_timeout_s",
     "0 is out of range; accepted: 0.1..3600"),
    ({"fps": "fast"}, "cameras[1].source.fps", "expected a number, got 'fast'"),
    ({"kind": "rtsp", "url": "rtsp://cam/a", "transport": "pigeon"}, "cameras[1].source.transport",
     "'pigeon' is not accepted; accepted values: tcp, udp, udp_multicast, http, https"),
    ({"kind": "webcam", "max_reconnects": -2}, "cameras[1].source.max_reconnects", "-2 is out of range"),
    ({"kind": "file"}, "cameras[1].source.path", "required for a file source"),
    ({"kind": "file", "path": "/no/such.mp4"}, "cameras[1].source.path", "no such file: /no/such.mp4"),
    ({"kind": "rtsp"}, "cameras[1].source.url", "an rtsp:// or rtsps:// URL is required, got ''"),
    ({"kind": "webcam", "reconnect_initial_s": 2.0, "reconnect_max_s": 1.0}, "cameras[1].source.reconnect_max_s",
     "must be >= reconnect_initial_s"),
])
def test_a_bad_field_is_named_by_its_dotted_path(table, path, needle):
    e = error(table, "cameras[1].source")
    assert e.path == path and str(e) == f"{path}: {e.detail}" and needle in e.detail


def test_a_field_of_another_kind_is_named_with_the_fields_this_kind_accepts(tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.touch()
    e = error({"kind": "file", "path": str(clip), "url": "rtsp://cam/a"})
    assert str(e) == "source.url: not a field of a file source; accepted fields: kind, path, realtime, speed, loop"
    e = error({"kind": "rtsp", "url": "rtsp://cam/a", "loop": True}, "cameras[0].source")
    assert e.path == "cameras[0].source.loop" and e.detail.startswith("not a field of a rtsp source; accepted")
    assert "url, transport, options" in e.detail and "reconnect_max_s" in e.detail
    assert error({"colour": "red"}).detail.startswith("not a field of a synthetic source")


@pytest.mark.parametrize("kind", ["ftp", 3, ""])
def test_an_unknown_kind_lists_the_accepted_kinds(kind):
    e = error({"kind": kind, "url": "ftp://cam"}, "cameras[2].source")
    assert e.path == "cameras[2].source.kind"
    assert e.detail == f"{kind!r} is not accepted; accepted values: synthetic, file, rtsp, webcam"


def test_credentials_stay_out_of_errors_and_reprs():
    e = error({"kind": "rtsp", "url": "http://admin:hunter2@cam/a"})
    assert "hunter2" not in str(e) and "***@cam" in str(e)
    assert "hunter2" not in repr(source_config({"kind": "rtsp", "url": "rtsp://admin:hunter2@cam/a"}))


def test_a_table_at_the_top_level_has_bare_field_names():
    assert error({"kind": "rtsp", "url": "x"}, "").path == "url"
    assert error([], "cameras[0].source").detail == "expected a table, got []"


def test_make_source_builds_each_kind_from_its_settings(tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.touch()
    synthetic = make_source(source_config({"width": 64, "height": 48, "fps": 4, "seed": 3, "duration_s": 2}), "a")
    assert isinstance(synthetic, SyntheticSource) and synthetic.name == "a"
    assert (synthetic.width, synthetic.height, synthetic.fps, synthetic.seed, synthetic.n_frames) == (64, 48, 4.0, 3, 8)

    file = make_source(source_config({"kind": "file", "path": str(clip), "realtime": True, "loop": True}), "b")
    assert isinstance(file, FileSource) and file.loop and file.live and file.path == clip

    cfg = source_config({"kind": "rtsp", "url": "rtsp://u:p@cam/a", "transport": "udp", "options": {"probesize": 5},
                         "reconnect_initial_s": 0.2, "reconnect_max_s": 2.0, "stall_timeout_s": 4.0})
    rtsp = make_source(cfg, "c")
    assert isinstance(rtsp, RtspSource) and rtsp.name == "c" and rtsp.transport == "udp"
    assert rtsp.options["probesize"] == "5" and rtsp.options["timeout"] == "2000000"
    assert rtsp.max_reconnects is None and rtsp.stall_timeout_s == 4.0
    assert (rtsp.backoff.initial_s, rtsp.backoff.max_s) == (0.2, 2.0) and isinstance(rtsp.backoff, Backoff)

    webcam = make_source(source_config({"kind": "webcam", "device": str(clip), "max_reconnects": 2}), "d")
    assert isinstance(webcam, WebcamSource) and webcam.kind == "file" and webcam.max_reconnects == 2
    assert webcam.name == "d" and webcam.pace


def test_importing_the_registry_loads_no_decoder():
    code = "import sys, stream.sources.registry; print(sorted({'av', 'cv2'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
