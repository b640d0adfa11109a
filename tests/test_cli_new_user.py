"""The command line as a new user meets it: `--version`, `pruners`, `run --source` with no config
file, and the interactive prompt's commands (never sent to the LLM as questions)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import pruning

CLI = [sys.executable, "-m", "stream.cli"]


def _env(model_cache) -> dict:
    return {**os.environ, "STREAMPRUNE_CACHE": str(model_cache)}


def _run(args, cwd, model_cache, stdin: str | None = None, timeout: float = 240):
    return subprocess.run(CLI + args, cwd=cwd, env=_env(model_cache), capture_output=True, text=True, timeout=timeout,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)


def test_version_names_the_package(tmp_path, model_cache):
    from importlib.metadata import version

    r = _run(["--version"], tmp_path, model_cache)
    assert r.returncode == 0 and r.stdout.strip() == f"streamprune {version('streamprune')}"


def test_pruners_lists_every_pruner_with_its_paper_and_parameters(tmp_path, model_cache):
    r = _run(["pruners"], tmp_path, model_cache)
    assert r.returncode == 0, r.stderr
    names = [line for line in r.stdout.splitlines() if line and not line.startswith(" ")]
    assert names[:8] == list(pruning.PRUNERS) and len(pruning.PRUNERS) == 8
    for name in pruning.PRUNERS:
        cls = pruning.pruner_class(name)
        assert cls.paper and cls.paper in r.stdout
        for key, default in pruning.pruner_params(name).items():
            assert f"    {key} = {default!r}" in r.stdout
    assert "EchoPrune: Interpreting Redundancy as Temporal Echoes" in r.stdout
    assert "tau = 0.5  (> 0)" in r.stdout


def test_run_source_on_a_file_needs_no_config_and_answers(tmp_path, model_cache):
    from clips import picture, write_h264

    clip = tmp_path / "porch.mp4"
    write_h264(clip, [picture(i, 160, 120) for i in range(40)], fps=10)
    r = _run(["run", "--source", str(clip), "--ask", "What moved?", "--pruner", "moprune"], tmp_path, model_cache)
    assert r.returncode == 0, r.stderr
    assert "camera porch: file source" in r.stdout and "pruner moprune" in r.stdout
    assert "Q: What moved?" in r.stdout and r.stdout.count("A: ") == 1
    assert "covering 0.0-3.0 s" in r.stdout  # the whole 4 s file: the question waits for its end
    assert "summary: frames in 40" in r.stdout and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["run"], "run needs a config file or --source PATH_OR_URL"),
    (["run", "--source", "/no/such/clip.mp4"], "config error: source.path: no such file: /no/such/clip.mp4"),
    (["run", "--source", "rtsp://127.0.0.1:9/x", "--http", "port-eighty"], "--http: 'port-eighty' is not [HOST:]PORT"),
    (["run", "--source", "rtsp://127.0.0.1:9/x", "--http", "0.0.0.0:8080"],
     "http.host: '0.0.0.0' is reachable from other machines: set http.token"),
])
def test_command_line_mistakes_are_one_line_and_exit_2(tmp_path, model_cache, args, needle):
    r = _run(args, tmp_path, model_cache, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_camera_name_the_http_paths_cannot_carry_is_refused():
    from stream.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=r"^name: 'porch/east' must not contain '/'"):
        from_dict({"name": "porch/east", "http": {"enabled": True}})
    assert from_dict({"name": "porch/east"}).name == "porch/east"  # without HTTP it is only a name


def test_source_with_several_cameras_is_refused(tmp_path, model_cache):
    cfg = tmp_path / "two.toml"
    cfg.write_text('[[cameras]]\nname = "a"\n[[cameras]]\nname = "b"\n')
    r = _run(["run", str(cfg), "--source", "/dev/video0"], tmp_path, model_cache, timeout=60)
    assert r.returncode == 2 and "--source" not in r.stdout
    assert "a source given on the command line needs a config with one camera" in r.stderr


def test_interactive_commands_and_named_answers_with_two_cameras(tmp_path, model_cache):
    cfg = tmp_path / "two.toml"
    cfg.write_text(
        '[output]\nstatus_interval_s = 0.0\n[query]\nmax_new_tokens = 4\n'
        '[[cameras]]\nname = "yard"\n[cameras.source]\nkind = "synthetic"\nduration_s = 3.0\nfps = 4.0\n'
        'width = 160\nheight = 120\n'
        '[[cameras]]\nname = "door"\n[cameras.source]\nkind = "synthetic"\nduration_s = 3.0\nfps = 4.0\n'
        'width = 160\nheight = 120\n'
        '[[watches]]\nname = "person"\ncamera = "door"\nquestion = "Is anyone there?"\non_scene_change = true\n'
    )
    proc = subprocess.Popen(CLI + ["run", str(cfg), "--interactive"], cwd=tmp_path, env=_env(model_cache), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = ""
        while "the memory still answers questions" not in line:  # both 3 s streams are in memory
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
        out, err = proc.communicate("help\n/status\n/watches\nyard: what is there?\nhow many objects?\n/bogus\n/quit\n"
                                    "never asked\n", timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.count("/status   each camera's live status") == 1  # `help` without the slash is the command
    assert "Q: help" not in out and "never asked" not in out  # commands never reach the LLM; /quit ends reading
    assert "[yard] t=2.0s" in out and "[door] t=2.0s" in out  # /status: a line per camera
    assert "[door] 1 watch(es)" in out and "person: 'Is anyone there?' (trigger yes)" in out
    assert out.count("[yard] Q: what is there?") == 1 and "[door] Q: what is there?" not in out
    assert out.count("Q: how many objects?") == 2  # every camera answers, each named
    assert "[yard] Q: how many objects?" in out and "[door] Q: how many objects?" in out
    assert "unknown command '/bogus'; /help lists the commands" in out
    assert out.count("\n> ") + out.startswith("> ") >= 6  # a prompt after each line
    assert "summary: frames in 12" in out and "Traceback" not in err
