"""The command line as a user meets it: the demo, `run` with a config, and config errors."""
from __future__ import annotations

import json
import os
import signal
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
    ('[memory.params]\nbogus = 1\n', "memory.params.bogus: unknown parameter of pruner 'echoprune'; accepted: "),
    ('[memory]\npruner = "echoprune"\n[memory.params]\ntau = -1.0\n', "memory.params.tau: -1.0 is out of range"),
    ('[source]\nkind = "file"\nurl = "rtsp://x"\n', "source.url: "),
    ('[source]\nkind = "hdmi"\n', "source.kind: 'hdmi' is not accepted"),
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


LIVE = ('[source]\nkind = "synthetic"\nduration_s = 600.0\nfps = 6.0\nrealtime = true\nspeed = 2.0\n'
        '[output]\nstatus_interval_s = 0.5\n')


def _start_live(tmp_path, model_cache, *extra):
    cfg = tmp_path / "live.toml"
    cfg.write_text(LIVE)
    env = {**os.environ, "STREAMPRUNE_CACHE": str(model_cache)}
    return subprocess.Popen(CLI + ["run", str(cfg), "--visuals", str(tmp_path / "vis"), *extra], cwd=tmp_path, env=env,
                            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _read_until(stream, needle: str, proc) -> str:
    line = ""
    while needle not in line:
        line = stream.readline()
        assert line, f"ended before {needle!r}: {proc.stderr.read() if stream is proc.stdout else ''}"
    return line


def _assert_clean_end(proc, tmp_path, out: str, err: str) -> None:
    assert proc.returncode == 0, err
    assert "summary: frames in" in out and "Traceback" not in err
    for name in ("contact_sheet.png", "timeline.png"):
        assert (tmp_path / "vis" / name).stat().st_size > 1000
        assert f"wrote {tmp_path / 'vis' / name}" in out


def test_run_takes_typed_questions_while_streaming_and_ctrl_d_ends_it(tmp_path, model_cache):
    import time

    proc = _start_live(tmp_path, model_cache, "--interactive")
    try:
        _read_until(proc.stdout, "Type a question", proc)
        time.sleep(2.5)  # let a few seconds of stream reach the memory
        proc.stdin.write("is anyone at the door?\n")
        proc.stdin.flush()
        _read_until(proc.stdout, "A: ", proc)
        evidence = proc.stdout.readline()
        _read_until(proc.stderr, "[camera] t=", proc)  # the periodic status line
        proc.stdin.close()  # Ctrl-D: the 10-minute stream ends now
        proc.wait(timeout=60)
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        proc.kill()
    assert "covering" in evidence
    _assert_clean_end(proc, tmp_path, out, err)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_a_live_run_cleanly(tmp_path, model_cache, sig):
    proc = _start_live(tmp_path, model_cache, "--no-interactive")
    try:
        _read_until(proc.stderr, "[camera] t=", proc)
        _read_until(proc.stderr, "[camera] t=", proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    _assert_clean_end(proc, tmp_path, out, err)
    assert "stopping" in err


def test_two_cameras_in_one_process_one_failing(tmp_path, model_cache):
    """A camera that fails once running (nothing answers at its address; no reconnects allowed)
    stops alone: the other streams to its end and answers; the failure is said once."""
    cfg = tmp_path / "two.toml"
    cfg.write_text(
        '[memory]\ncapacity = 300\n[output]\nstatus_interval_s = 0.0\n'
        '[[questions]]\nat_s = 1e9\ntext = "what happened?"\n'
        '[[cameras]]\nname = "yard"\npruner = "recent"\n[cameras.source]\nkind = "synthetic"\nduration_s = 6.0\nfps = 4.0\n'
        '[[cameras]]\nname = "broken"\n[cameras.source]\nkind = "rtsp"\nurl = "rtsp://127.0.0.1:9/x"\nmax_reconnects = 0\n'
    )
    r = _run(["run", str(cfg)], tmp_path, model_cache)
    assert r.returncode == 0, r.stderr
    assert "camera broken stopped" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.count("127.0.0.1:9") <= 3, r.stderr  # the attempt (logged), the state line, the end of the run
    assert "[yard] summary: frames in 24" in r.stdout and "groups encoded 6" in r.stdout
    assert r.stdout.count("A: ") == 1


def test_camera_tables_are_validated(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[cameras]]\nname = "a"\npruner = "nope"\n[[cameras]]\nname = "a"\n')
    with pytest.raises(ConfigError, match=r"cameras\[0\]\.memory\.pruner: 'nope' is not accepted"):
        load_config(cfg)
    cfg.write_text('[[cameras]]\nname = "a"\n[[cameras]]\nname = "a"\n')
    with pytest.raises(ConfigError, match=r"cameras\[1\]\.name: 'a' is used by two cameras"):
        load_config(cfg)
    cfg.write_text('[memory]\ncapacity = 100\n[[cameras]]\nname = "a"\ncapacity = 7\nfps = 1.0\n[[cameras]]\nname = "b"\n')
    a, b = load_config(cfg).camera_configs()
    assert (a.memory.capacity, a.sampler.fps, b.memory.capacity, b.sampler.fps) == (7, 1.0, 100, 2.0)
    cfg.write_text('[memory]\ncapacity = 100\n[query]\nmax_new_tokens = 9\n'
                   '[[cameras]]\nname = "a"\n[cameras.memory]\ncapacity = 7\n[cameras.source]\nkind = "synthetic"\nseed = 3\n'
                   '[[cameras]]\nname = "b"\n[cameras.memory]\npruner = "recent"\n')
    a, b = load_config(cfg).camera_configs()
    assert (a.memory.capacity, a.query.max_new_tokens, a.source.seed) == (7, 9, 3)
    assert (b.memory.capacity, b.memory.pruner, b.query.max_new_tokens) == (100, "recent", 9)


def test_fields_that_moved_keep_working(tmp_path):
    cfg = tmp_path / "old.toml"
    cfg.write_text('[mqtt]\nqueue_size = 9\nmax_question_chars = 50\n')
    q = load_config(cfg).query
    assert (q.queue_size, q.max_question_chars) == (9, 50)


def test_watches_need_no_mqtt(tmp_path):
    cfg = tmp_path / "w.toml"
    cfg.write_text('[[watches]]\nname = "door"\nquestion = "is anyone at the door?"\nevery_s = 2.0\n')
    (w,) = load_config(cfg).watches
    assert w.name == "door" and w.every_s == 2.0
