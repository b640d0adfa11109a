"""The command line as a user meets it: the demo, `run` with a config, and config errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stream.config import Config, ConfigError, from_dict, load_config

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "stream.cli"]


def _run(args, cwd, model_cache, timeout=240):
    env = {**os.environ, "STREAMPRUNE_CACHE": str(model_cache)}
    return subprocess.run(CLI + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_demo_prints_answers_summary_and_pictures(tmp_path, model_cache):
    out = tmp_path / "out"
    r = _run(["demo", "--visuals", str(out)], ROOT, model_cache)
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stdout
    assert r.stdout.count("Q: ") == 3 and r.stdout.count("A: ") == 3
    assert "ttft" in r.stdout and "visual tokens" in r.stdout and "covering" in r.stdout
    summary = [line for line in r.stdout.splitlines() if line.startswith("summary:")]
    assert len(summary) == 1
    for field in ("frames in 600", "dropped 0", "groups encoded 60", "tokens kept", "encoder", "prune"):
        assert field in summary[0]
    assert (out / "contact_sheet.png").stat().st_size > 1000 and (out / "timeline.png").stat().st_size > 1000


def test_run_file_config_writes_jsonl(tmp_path, model_cache):
    from clips import picture, write_h264

    clip = tmp_path / "clip.mp4"
    write_h264(clip, [picture(i, 160, 120) for i in range(40)], fps=10)
    cfg = tmp_path / "file.toml"
    text = (ROOT / "configs" / "file.toml").read_text().replace('"clip.mp4"', json.dumps(str(clip)))
    cfg.write_text(text.replace('jsonl = ""', f"jsonl = {json.dumps(str(tmp_path / 'a.jsonl'))}"))
    r = _run(["run", str(cfg), "--pruner", "recent"], tmp_path, model_cache)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["type"] == "answer" and lines[0]["pruner"] == "recent"
    assert lines[0]["t_end"] >= 3.0


@pytest.mark.parametrize("toml, needle", [
    ('[memory]\npruner = "nope"\n', "memory.pruner: 'nope' is not accepted; accepted values: echoprune"),
    ('[sampler]\nfps = "fast"\n', "sampler.fps: expected a number"),
    ('[sampler]\nfpz = 2\n', "sampler.fpz: unknown field; accepted fields: fps, policy, queue"),
    ('[memory]\ncapacity = -1\n', "memory.capacity: -1 is out of range"),
    ('[source]\nkind = "file"\npath = "/no/such.mp4"\n', "source.path: no such file"),
    ('[memory.params]\nbogus = 1\n', "memory.params: pruner 'echoprune' has no parameter bogus"),
    ('[[questions]]\ntext = ""\n', "questions[0].text: must not be empty"),
    ('[query]\ntimestamps = "xml"\n', "query.timestamps: 'xml' is not accepted; accepted values: mrope, text"),
    ("name = [1\n", "not valid TOML"),
])
def test_bad_config_names_the_field_without_traceback(tmp_path, model_cache, toml, needle):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError, match=None) as e:
        load_config(cfg)
    assert needle in str(e.value)
    if toml.startswith("[memory]\npruner"):
        r = _run(["run", str(cfg)], tmp_path, model_cache, timeout=60)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr


def test_missing_config_file_is_a_clear_error(tmp_path, model_cache):
    r = _run(["run", str(tmp_path / "missing.toml")], tmp_path, model_cache, timeout=60)
    assert r.returncode == 2 and "no such config file" in r.stderr and "Traceback" not in r.stderr


def test_shipped_configs_validate():
    for path in (ROOT / "configs").glob("*.toml"):
        if path.name == "file.toml":
            continue  # needs a real clip at source.path
        assert isinstance(load_config(path), Config)
    assert from_dict({}) == Config()


def test_run_takes_typed_questions_while_streaming(tmp_path, model_cache):
    import time

    cfg = tmp_path / "live.toml"
    cfg.write_text('[source]\nkind = "synthetic"\nduration_s = 12.0\nfps = 6.0\nrealtime = true\nspeed = 2.0\n'
                   '[output]\nstatus_interval_s = 1.0\n')
    env = {**os.environ, "STREAMPRUNE_CACHE": str(model_cache)}
    proc = subprocess.Popen(CLI + ["run", str(cfg), "--interactive"], cwd=tmp_path, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = ""
        while "Type a question" not in line:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
        time.sleep(2.5)  # let a few seconds of stream reach the memory
        proc.stdin.write("is anyone at the door?\n")
        proc.stdin.flush()
        answer = ""
        while not answer.startswith("A: "):
            answer = proc.stdout.readline()
            assert answer, proc.stderr.read()
        evidence = proc.stdout.readline()
        proc.stdin.close()
        rest = proc.stdout.read()
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "covering" in evidence and "summary:" in rest
    assert "[camera] t=" in err  # the periodic status line


def test_two_cameras_in_one_process_one_failing(tmp_path, model_cache):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    cfg = tmp_path / "two.toml"
    cfg.write_text(
        '[memory]\ncapacity = 300\n[output]\nstatus_interval_s = 0.0\n'
        '[[questions]]\nat_s = 1e9\ntext = "what happened?"\n'
        '[[cameras]]\nname = "yard"\npruner = "recent"\n[cameras.source]\nkind = "synthetic"\nduration_s = 6.0\nfps = 4.0\n'
        f'[[cameras]]\nname = "broken"\n[cameras.source]\nkind = "file"\npath = {json.dumps(str(junk))}\n'
    )
    r = _run(["run", str(cfg)], tmp_path, model_cache)
    assert r.returncode == 0, r.stderr
    assert "camera broken stopped" in r.stderr
    assert "[yard] summary: frames in 24" in r.stdout and "groups encoded 6" in r.stdout
    assert r.stdout.count("A: ") == 1


def test_camera_tables_are_validated(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[cameras]]\nname = "a"\npruner = "nope"\n[[cameras]]\nname = "a"\n')
    with pytest.raises(ConfigError, match=r"cameras\[0\]\.pruner: 'nope' is not accepted"):
        load_config(cfg)
    cfg.write_text('[[cameras]]\nname = "a"\n[[cameras]]\nname = "a"\n')
    with pytest.raises(ConfigError, match=r"cameras\[1\]\.name: 'a' is used by two cameras"):
        load_config(cfg)
    cfg.write_text('[memory]\ncapacity = 100\n[[cameras]]\nname = "a"\ncapacity = 7\nfps = 1.0\n[[cameras]]\nname = "b"\n')
    a, b = load_config(cfg).camera_configs()
    assert (a.memory.capacity, a.sampler.fps, b.memory.capacity, b.sampler.fps) == (7, 1.0, 100, 2.0)
