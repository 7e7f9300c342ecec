"""Progressive-growth runner: a smoke run through the command line, resume, summaries and bad schedules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from growth.experiment import Arm, ExperimentConfig, ScheduleError, preset, seed_config
from growth.plots import FIGURES
from growth.summary import first_crossing
from models.flops import training_flops_per_token

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["--sizes", "4,8,16", "--steps", "4,4,8", "--modes", "mirror,tile", "--seeds", "0,1", "--optimizer", "grow",
         "--batch-size", "4", "--eval-interval", "4", "--eval-batches", "1", "--warmup-steps", "2"]
ARMS = ("mirror-4-8-16", "tile-4-8-16", "scratch-8", "scratch-16")


def run_progressive(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "progressive.py"), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    completed = run_progressive(*SMOKE, "--name", "smoke", "--runs-dir", str(runs))
    assert completed.returncode == 0, completed.stderr
    return runs / "smoke"


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_smoke_writes_every_output(smoke_run):
    assert (smoke_run / "config.json").is_file()
    assert (smoke_run / "summary.json").is_file()
    assert (smoke_run / "summary.md").is_file()
    for figure in FIGURES:
        assert (smoke_run / "figures" / figure).stat().st_size > 0, figure
    for arm in ARMS:
        for seed in (0, 1):
            directory = smoke_run / arm / f"seed{seed}"
            assert (directory / "metrics.jsonl").is_file()
            assert (directory / "result.json").is_file()
    assert (smoke_run / "mirror-4-8-16" / "seed0" / "d4.safetensors").is_file()
    assert (smoke_run / "mirror-4-8-16" / "seed0" / "d8.safetensors").is_file()
    assert (smoke_run / "mirror-4-8-16" / "seed0" / "d16.safetensors").is_file()


def test_smoke_expansion_jumps_are_tiny(smoke_run):
    for arm in ("mirror-4-8-16", "tile-4-8-16"):
        for seed in (0, 1):
            growths = [r for r in read_metrics(smoke_run / arm / f"seed{seed}" / "metrics.jsonl") if r["event"] == "growth"]
            assert [(g["from"], g["to"]) for g in growths] == [(4, 8), (8, 16)]
            for growth in growths:
                assert abs(growth["loss_after"] - growth["loss_before"]) < 1e-4


def test_smoke_flops_follow_the_formula(smoke_run):
    records = [r for r in read_metrics(smoke_run / "mirror-4-8-16" / "seed0" / "metrics.jsonl") if r["event"] == "eval"]
    flops = [r["flops"] for r in records]
    assert flops[0] == 0  # the small model's training counts from its first step
    assert all(later > earlier for earlier, later in zip(flops, flops[1:]))

    tokens_per_step = 4 * 64
    expected = sum(
        steps * tokens_per_step * training_flops_per_token(seed_config(width))
        for width, steps in ((4, 4), (8, 4), (16, 8))
    )
    assert flops[-1] == expected


def test_smoke_arms_see_same_tokens(smoke_run):
    results = {arm: json.loads((smoke_run / arm / "seed0" / "result.json").read_text()) for arm in ARMS}
    assert len({result["tokens"] for result in results.values()}) == 1


def test_smoke_grow_mode_moments_match_weights(smoke_run):
    state_path = smoke_run / "mirror-4-8-16" / "seed0" / "d16.train.safetensors"
    weights_path = smoke_run / "mirror-4-8-16" / "seed0" / "d16.safetensors"
    with safe_open(str(weights_path), "pt") as weights, safe_open(str(state_path), "pt") as state:
        for name in weights.keys():
            shape = weights.get_slice(name).get_shape()
            assert state.get_slice(f"optimizer.{name}.exp_avg").get_shape() == shape
            assert state.get_slice(f"optimizer.{name}.exp_avg_sq").get_shape() == shape


def test_summary_lists_every_arm(smoke_run):
    summary = json.loads((smoke_run / "summary.json").read_text())
    rows = {row["arm"]: row for row in summary["arms"]}
    assert set(rows) == set(ARMS)
    assert rows["mirror-4-8-16"]["compute_ratio_note"]
    assert rows["scratch-16"]["tokens_per_parameter"] > 0
    assert len(rows["tile-4-8-16"]["expansions"]) == 2


def test_rerun_skips_finished_arms(smoke_run):
    result = smoke_run / "scratch-8" / "seed1" / "result.json"
    unfinished = [smoke_run / "tile-4-8-16" / "seed1" / "result.json", smoke_run / "scratch-16" / "seed0" / "result.json"]
    finished_before = result.stat().st_mtime_ns
    for path in unfinished:
        path.unlink()  # as if the run had been interrupted during these arms

    completed = run_progressive(*SMOKE, "--name", "smoke", "--runs-dir", str(smoke_run.parent), "--workers", "2")

    assert completed.returncode == 0, completed.stderr
    assert "2 of 8 arm-seeds to train" in completed.stdout
    assert result.stat().st_mtime_ns == finished_before
    for path in unfinished:
        assert path.is_file()


def test_plot_script_compares_runs(smoke_run, tmp_path):
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "plot.py"), str(smoke_run), str(smoke_run), "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    for figure in FIGURES:
        assert (tmp_path / figure).is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sizes", "4,6", "--steps", "2,2"], "integer factors"),
        (["--sizes", "8,4", "--steps", "2,2"], "integer factors"),
        (["--sizes", "4,8,16", "--steps", "2,2"], "one per width"),
        (["--sizes", "4,x", "--steps", "2,2"], "comma-separated integers"),
        (["--sizes", "4,8", "--steps", "2,0"], "positive"),
        (["--sizes", "4,8", "--steps", "2,2", "--modes", "stretch"], "growth mode"),
        (["--sizes", "4,8", "--steps", "2,2", "--workers", "0"], "--workers"),
        (["--sizes", "4,8", "--steps", "2,2", "--threads", "-1"], "--threads"),
    ],
)
def test_bad_schedule_is_rejected_before_training(tmp_path, args, message):
    completed = run_progressive(*args, "--runs-dir", str(tmp_path))

    assert completed.returncode == 2
    assert message in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_different_experiment_in_same_directory_is_rejected(smoke_run):
    args = [a if a != "4,4,8" else "4,4,6" for a in SMOKE]
    completed = run_progressive(*args, "--name", "smoke", "--runs-dir", str(smoke_run.parent))

    assert completed.returncode == 2
    assert "contains a different experiment" in completed.stderr


def test_arms_must_share_total_steps():
    config = ExperimentConfig("x", [Arm("a", [4, 8], [2, 2]), Arm("b", [8], [5])])

    with pytest.raises(ScheduleError, match="same total steps"):
        config.validate()


@pytest.mark.parametrize("name", ["readme", "compute-limited"])
def test_presets_are_valid(name):
    preset(name).validate()


def test_first_crossing_interpolates():
    assert first_crossing([0, 10, 20], [3.0, 2.0, 1.0], 1.5) == 15.0
    assert first_crossing([0, 10, 20], [3.0, 2.0, 1.0], 0.5) is None
    assert first_crossing([0, 10], [1.0, 0.5], 2.0) == 0.0
