"""Every benchmark runs end to end at toy sizes and writes sane tables; the recall benchmark's
ground truth (which token is evidence of which event) is checked by hand."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is run from the checkout, not installed
    sys.path.insert(0, str(ROOT))

from bench import (ingest, ingest_device, ingest_scale, memory_growth, prompt_cache, prompt_cache_device,  # noqa: E402
                   prune_cost, recall, run_all, ttft)
from bench.common import ALL_PRUNERS, SEED_PRUNERS, Stat, Table  # noqa: E402


def _table(report, title_start: str) -> Table:
    return next(t for t in report.tables if t.title.startswith(title_start))


def _num(cell: str) -> float:
    """The median of a `median (lo-hi)` cell."""
    return float(cell.split()[0].rstrip("x"))


def _written(tmp_path: Path, name: str) -> dict:
    assert (tmp_path / f"{name}.md").read_text().startswith("## ")
    return json.loads((tmp_path / "raw" / f"{name}.json").read_text())


def test_stat_and_table():
    s = Stat.of([3.0, 1.0, 2.0, float("nan")])
    assert (s.median, s.lo, s.hi, s.n) == (2.0, 1.0, 3.0, 3)
    assert s.fmt(1) == "2.0 (1.0-3.0)" and Stat.of([]).fmt() == "n/a" and Stat.of([4.0]).fmt(1) == "4.0"
    t = Table("t", ["a", "b"])
    t.add("x", 0.5)
    assert t.markdown().splitlines()[2:5] == ["| a | b |", "|---|---|", "| x | 0.5 |"]


def test_covered_cells_by_hand():
    # 480x640 frame, 4x4 grid: cells are 120 high, 160 wide.
    cov = recall._covered((0, 0, 170, 100), (4, 4), (480, 640))  # most of cell (0,0), 10 px of (0,1)
    assert torch.nonzero(cov).tolist() == [[0, 0]]
    split = recall._covered((150, 100, 190, 140), (4, 4), (480, 640))  # 40x40: 600 px in (0,1) and (1,1)
    assert torch.nonzero(split).tolist() == [[0, 1], [1, 1]]  # no cell holds half: the largest shares count
    small = recall._covered((150, 100, 200, 160), (4, 4), (480, 640))  # 50x60: (1,1) holds 40x40 = 53%
    assert torch.nonzero(small).tolist() == [[1, 1]]
    whole = recall._covered((0, 0, 640, 480), (4, 4), (480, 640))
    assert bool(whole.all())


def test_score_counts_events_and_distractors():
    events = (recall.Event("brief", "a", 0.0, 1.0, torch.tensor([0, 1])),
              recall.Event("move", "b", 5.0, 9.5, torch.tensor([7])))
    distractor = torch.zeros(8, dtype=torch.bool)
    distractor[[2, 3]] = True
    truth = recall.Truth((2, 2), 2, events, distractor)
    sc = recall.score(truth, torch.tensor([1, 2, 3, 4]), last_s=1.0, duration_s=10.0)
    assert sc["recall"] == 0.5 and sc["recent_recall"] == 0.0 and sc["recent_events"] == 1
    assert sc["distractor_share"] == 0.5 and sc["by_kind"]["brief"] == 1.0 and math.isnan(sc["by_kind"]["cut"])
    assert sc["event_seconds"] == 0.5 and sc["background_share"] == 0.5  # no frames: an event's seconds = its hit


def test_score_counts_event_seconds_and_background():
    # Event a shows at 4 frames: held tokens cover two of them; b at 1 frame, not held.
    frames = (torch.tensor([0]), torch.tensor([0, 1]), torch.tensor([4]), torch.tensor([5]))
    events = (recall.Event("move", "a", 0.0, 2.0, torch.tensor([0, 1, 4, 5]), frames),
              recall.Event("brief", "b", 1.0, 1.5, torch.tensor([6]), (torch.tensor([6]),)))
    distractor = torch.zeros(8, dtype=torch.bool)
    distractor[3] = True
    actor = torch.zeros(8, dtype=torch.bool)
    actor[[0, 1, 4, 5, 6]] = True
    truth = recall.Truth((2, 2), 2, events, distractor, actor, (("blink", distractor),))
    sc = recall.score(truth, torch.tensor([1, 2, 3, 5]), last_s=1.0, duration_s=2.0)
    assert sc["recall"] == 0.5 and sc["event_seconds"] == (2 / 4 + 0) / 2
    assert sc["distractor_share"] == 0.25 and sc["distractor_by_kind"] == {"blink": 0.25}
    assert sc["background_share"] == 0.25  # token 2: no actor, no distractor


def test_ground_truth_marks_the_actor():
    s = recall.RecallSettings.quick()
    truth = recall.ground_truth(s, seed=0)
    h, w = truth.grid
    assert truth.n_groups == s.duration_s * s.fps / 2 and truth.distractor.numel() == truth.n_groups * h * w
    src = recall._source(s, 0)
    assert len(truth.events) == len([e for e in src.events if e.kind != "stay"])
    for e in truth.events:
        assert e.tokens.numel() > 0 and torch.equal(torch.unique(torch.cat(e.frames)), e.tokens)
        groups = torch.unique(e.tokens // (h * w))
        assert (groups * 2 / s.fps <= e.end_s).all() and ((groups + 1) * 2 / s.fps > e.start_s).all()
    kinds = dict(truth.by_kind)
    assert set(kinds) == {"flicker", "blink", "sway", "shimmer"}
    periodic = torch.stack([kinds[k] for k in ("blink", "sway", "shimmer")]).any(0).view(truth.n_groups, -1)
    assert 0.10 <= float(periodic.float().mean()) <= 0.20  # the periodic distractors cover 10-20% of the frame
    assert bool((periodic.sum(1) > 0).all())  # on in every group
    assert truth.actor.any()
    # Off, the scene has the same actors and events, and only the lamps distract.
    plain = recall.ground_truth(dataclasses.replace(s, distractors=False), seed=0)
    assert [k for k, _ in plain.by_kind] == ["flicker"]
    assert [e.tokens.tolist() for e in plain.events] == [e.tokens.tolist() for e in truth.events]


def test_recall_smoke(model_cache, tmp_path):
    s = recall.RecallSettings.quick()
    report = recall.run(s, tmp_path)
    raw = _written(tmp_path, "recall")
    assert (tmp_path / "recall.png").stat().st_size > 1000
    for title in ("Event recall", "Event-seconds", "Recall of events", "Share of memory on distractors",
                  "Share of memory on quiet background"):
        t = _table(report, title)
        assert t.columns == ["pruner", "5%", "10%", "25%"]
        assert [r[0] for r in t.rows] == list(ALL_PRUNERS)
        assert all(0.0 <= _num(c) <= 1.0 for r in t.rows for c in r[1:] if c != "n/a")
    assert len(report.targets) == 2 * len(SEED_PRUNERS)
    per = _table(report, "Share of memory per distractor")
    assert per.columns == ["pruner", "flickering lamps", "blinking light", "swaying branch", "shimmering strip"]
    for key, runs in raw["raw"]["scores"].items():
        for r in runs:
            assert r["event_seconds"] <= r["recall"] + 1e-9  # an event with a held second is a held event
            assert r["distractor_share"] + r["background_share"] <= 1.0 + 1e-9
    dense = raw["raw"]["encode"][0]["groups"] * math.prod(raw["raw"]["encode"][0]["grid"])
    for key, runs in raw["raw"]["scores"].items():
        budget = float(key.split("@")[1])
        assert all(0 < r["held"] <= math.floor(budget * dense) for r in runs)


def test_prune_cost_smoke(tmp_path):
    report = prune_cost.run(prune_cost.CostSettings.quick(), tmp_path)
    _written(tmp_path, "prune_cost")
    plain, deepstack = report.tables
    assert "3 deepstack vectors per token" in deepstack.title and "deepstack" not in plain.title
    for t in report.tables:
        assert [r[0] for r in t.rows] == list(prune_cost.VARIANTS)
        assert all(_num(r[1]) >= _num(r[2]) * 0.5 and _num(r[1]) > 0 for r in t.rows)
    assert {x.subject.split()[0] for x in report.targets} == set(prune_cost.GOALS_MS)


def test_memory_growth_smoke(tmp_path):
    s = memory_growth.MemorySettings.quick()
    report = memory_growth.run(s, tmp_path)
    raw = _written(tmp_path, "memory_growth")
    assert (tmp_path / "memory_growth.png").exists()
    for label in s.pruners:
        r = raw["raw"][label]
        assert [g for g, _, _ in r["samples"]] == list(range(s.sample_every, s.groups + 1, s.sample_every))
        assert r["over_bound"] == 0 and r["held"] == r["bound"] and all(mb > 10 for _, mb, _ in r["samples"])
    assert len(report.targets) == len(s.pruners)


def test_ttft_smoke(model_cache, tmp_path):
    s = ttft.TTFTSettings.quick()
    report = ttft.run(s, tmp_path)
    _written(tmp_path, "ttft")
    assert len(report.tables) == 2 and len(report.targets) == 2
    for t in report.tables:
        assert [r[0] for r in t.rows] == ["dense", "50%", "25%", "10%"]
        tokens = [int(r[1]) for r in t.rows]
        assert tokens[0] > tokens[1] > tokens[2] > tokens[3] > 0
        assert all(0 < _num(r[4]) < 30 and _num(r[3]) <= _num(r[4]) for r in t.rows)


def test_ingest_smoke(model_cache, tmp_path):
    s = ingest.IngestSettings.quick()
    report = ingest.run(s, tmp_path)
    raw = _written(tmp_path, "ingest")
    (t,) = report.tables
    assert [r[0] for r in t.rows] == list(s.pruners)
    a = raw["raw"]["echoprune"]["analysis"]
    assert a["answers"] >= 1 and a["groups"] >= 2 and 0.3 < a["groups_per_s"] < 3
    assert a["dropped"] >= 0 and a["max_backlog"] >= 1
    assert a["paths"] == {"cached": a["answers"]} and a["cache_lag"]["lo"] >= 0  # the cache is on by default
    assert len(report.targets) == 3 * len(s.pruners)
    cache = raw["raw"]["echoprune"]["cache"]
    assert cache["appended_tokens"] > 0 and cache["background_ms"] > 0


def test_prompt_cache_smoke(model_cache, tmp_path):
    s = prompt_cache.PromptCacheSettings.quick()
    report = prompt_cache.run(s, tmp_path)
    raw = _written(tmp_path, "prompt_cache")
    sweep, slacks, big = report.tables
    assert [int(r[0]) for r in sweep.rows] == list(s.sizes)
    group = s.grid[0] * s.grid[1]
    for n, r in raw["raw"]["ttft"].items():
        assert (r["cached_path"], r["behind_path"], r["full_path"]) == ("cached", "cached", "full")
        assert r["behind_prefilled"] == r["cached_prefilled"] + group  # the question and the group it lacked
        assert r["full_prefilled"] == r["prompt_tokens"] > r["cached_prefilled"] and r["visual_tokens"] == int(n)
        assert len(r["full_s"]) == s.uncached_repeats[s.sizes.index(int(n))] and len(r["cached_s"]) == s.cached_repeats
    assert [(r[0], r[1].split()[0]) for r in slacks.rows] == (
        [(s.pruner, f"{x:g}") for x in s.slacks] + [(p, f"{s.default_slack:g}") for p in s.other_pruners])
    every = [float(r[3]) for r in slacks.rows[: len(s.slacks)]]
    assert every[0] == 1.0 and every == sorted(every)  # echoprune drops nothing at graduation: slack sets the period
    assert raw["raw"]["big_stream"]["cycles"] == s.big_cycles and len(big.rows) == 1
    assert len(report.targets) == 2


def test_prompt_cache_device_tiny_on_cpu_without_pyav():
    """GPU images lack PyAV: the device script must not import it, at any depth."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "bench.prompt_cache_device", "--size", "tiny",
                          "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and "av" not in imported
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ")]
    assert rows[0] == "| measure | visual tokens | prompt tokens | prefilled tokens | ms |"
    assert len(rows) == 1 + 5 * len(prompt_cache_device.SIZES["tiny"].sizes) + 3


def test_ingest_device_tiny_on_cpu_without_pyav():
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "bench.ingest_device", "--size", "tiny",
                          "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and "av" not in imported
    size = ingest_device.SIZES["tiny"]
    per_group = [line for line in run.stdout.splitlines() if line.startswith("| ") and "ms per group" not in line
                 and not line.startswith("|---")]
    memory = len(ingest_device.MEMORY_PRUNERS) + 2  # an add row per pruner and HieraVid's query ranking, twice
    syncs = 1 + 4  # its header; preparing on the device, two tower calls, the scene verdict
    assert len(per_group) == 2 + 2 * len(size.batches) + len(size.cameras) + 2 + 2 + memory + syncs + 3  # 6 tables
    assert "| pixel rows: torch on the device vs numpy on the host (the CPU tests find 0) | 0 |" in run.stdout
    assert "| prepare a 640x480 pair on the device | 0 | none |" in run.stdout
    assert "| 2 fps | 1 |" in run.stdout


def test_ingest_scale_quick(tmp_path):
    s = ingest_scale.ScaleSettings.quick()
    report = ingest_scale.run(s, tmp_path)
    raw = _written(tmp_path, "ingest_scale")
    live = _table(report, "Live cameras")
    assert [int(r[0]) for r in live.rows] == list(s.cameras)
    for n, row in zip(s.cameras, live.rows):
        landed, dropped = float(row[2]), int(row[3])
        assert dropped >= 0 and 0 < landed <= n * 1.2  # a few cameras on a quiet tiny model keep up
    assert set(raw["raw"]["saturation"]) == {"shared", "alone"}
    assert all(len(v) == s.repeats and all(x > 0 for x in v) for v in raw["raw"]["saturation"].values())
    assert len(report.targets) == 1


def test_summary_keeps_the_latest_run_of_each_benchmark(tmp_path):
    cost = prune_cost.run(prune_cost.CostSettings.quick(), tmp_path)
    path, met, total = run_all.write_summary(tmp_path)
    text = path.read_text()
    assert (met, total) == (sum(t.met for t in cost.targets), len(cost.targets))
    assert f"{sum(t.met for t in cost.targets)} of {len(cost.targets)} targets met" in text
    assert all(x.subject in text for x in cost.targets) and "(prune_cost.md)" in text and "(recall.md)" not in text
