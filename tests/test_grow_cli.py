"""Tests of scripts/grow.py: bad input in process, a few full runs through the command line."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO_ROOT, run_script

from growth.checkpoint import grow_checkpoint
from models.checkpoint import load_checkpoint, read_checkpoint_meta
from models.data import ByteDataset, load_corpus
from models.train import Trainer, TrainConfig

SHIPPED_CHECKPOINT = REPO_ROOT / "checkpoints" / "tiny-d4.safetensors"
FAST_EVAL = ["--eval-batches", "2", "--batch-size", "4"]


def load_grow_script():
    spec = importlib.util.spec_from_file_location("grow_script", REPO_ROOT / "scripts" / "grow.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


grow_script = load_grow_script()


@pytest.fixture
def source(tmp_path: Path, trained_checkpoint: Path) -> Path:
    """A d_model 4 checkpoint copied into tmp_path: the shipped one if present, else a trained one."""
    original = SHIPPED_CHECKPOINT if SHIPPED_CHECKPOINT.is_file() else trained_checkpoint
    copy = tmp_path / "tiny-d4.safetensors"
    shutil.copyfile(original, copy)
    return copy


def files_under(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def run_rejected(argv: list[str], directory: Path, capsys) -> str:
    """Run grow.py in process and check exit status 2, one stderr line and no change under `directory`."""
    before = files_under(directory)
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(grow_script.main(argv))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert files_under(directory) == before
    return lines[0]


@pytest.mark.parametrize(
    ("to", "message"),
    [
        ("4", "must be an integer multiple of the current d_model=4 larger than it"),
        ("2", "must be an integer multiple"),
        ("6", "allowed: 8, 12, 16"),
        ("0", "must be a positive integer"),
        ("-8", "must be a positive integer"),
        ("8.5", "invalid int value: '8.5'"),
    ],
)
def test_cli_rejects_bad_target(source, tmp_path, monkeypatch, capsys, to, message):
    monkeypatch.chdir(tmp_path)
    line = run_rejected([str(source), "--to", to, "--plot", *FAST_EVAL], tmp_path, capsys)
    assert message in line


def test_cli_rejects_missing_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = run_rejected([str(tmp_path / "absent-d4.safetensors"), "--to", "8"], tmp_path, capsys)
    assert "checkpoint not found" in line


def test_cli_rejects_corrupt_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    corrupt = tmp_path / "corrupt-d4.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    line = run_rejected([str(corrupt), "--to", "8"], tmp_path, capsys)
    assert "not a readable safetensors file" in line


def test_cli_rejects_truncated_checkpoint(source, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    source.write_bytes(source.read_bytes()[:-100])
    line = run_rejected([str(source), "--to", "8"], tmp_path, capsys)
    assert str(source) in line


def test_cli_rejects_missing_output_directory(source, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "missing" / "grown.safetensors"
    line = run_rejected([str(source), "--to", "8", "--out", str(out)], tmp_path, capsys)
    assert "output directory not found" in line


def test_cli_rejects_existing_output(source, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-d8.safetensors").write_bytes(b"keep")
    line = run_rejected([str(source), "--to", "8"], tmp_path, capsys)
    assert "already exists; pass --force" in line


def test_cli_rejects_output_equal_to_input(source, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = run_rejected([str(source), "--to", "8", "--out", str(source), "--force"], tmp_path, capsys)
    assert "is the input checkpoint" in line


def test_cli_rejects_bad_options(source, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cases = [
        (["--mode", "copy"], "invalid choice: 'copy'"),
        (["--noise", "-0.5"], "noise must be a finite number >= 0"),
        (["--data", str(tmp_path / "absent.txt")], "corpus path not found"),
        (["--plot", str(tmp_path / "missing" / "growth.png")], "plot directory not found"),
        (["--eval-batches", "0"], "must be positive"),
    ]
    for options, message in cases:
        line = run_rejected([str(source), "--to", "8", *options], tmp_path, capsys)
        assert message in line, options


def test_cli_rejected_through_command_line(source, tmp_path):
    before = files_under(tmp_path)
    result = run_script("grow.py", str(source), "--to", "6")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "grow.py: error: target d_model=6 must be an integer multiple of the current d_model=4 larger "
        "than it (allowed: 8, 12, 16, ...)"
    ]
    assert files_under(tmp_path) == before


def test_cli_writes_default_output_and_table(source, tmp_path):
    result = run_script("grow.py", str(source), "--to", "16", "--mode", "tile", *FAST_EVAL)
    assert result.returncode == 0, result.stderr

    out = tmp_path / "tiny-d16.safetensors"
    model, meta = load_checkpoint(out)
    assert model.config.d_model == 16
    assert meta.growth_history[-1]["mode"] == "tile"
    assert str(out) in result.stdout
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["d_model", "heads", "d_ff", "parameters", "dropout", "val", "loss"]
    assert lines[1].split()[:4] == ["source", "4", "2", "8"]
    assert lines[2].split()[:4] == ["grown", "16", "8", "32"]
    assert any(line.startswith("|difference|") for line in lines)


def test_cli_json_and_plot(source, tmp_path):
    out = tmp_path / "wide.safetensors"
    figure = tmp_path / "growth.png"
    result = run_script("grow.py", str(source), "--to", "12", "--out", str(out), "--json",
                        "--plot", str(figure), "--seed", "3", *FAST_EVAL)
    assert result.returncode == 0, result.stderr

    summary = json.loads(result.stdout)
    assert summary["grown"]["d_model"] == 12
    assert summary["source"]["d_model"] == 4
    assert summary["seed"] == 3
    assert summary["abs_difference"] < 1e-5
    assert summary["out"] == str(out)
    assert summary["plot"] == str(figure)
    assert figure.read_bytes()[:4] == b"\x89PNG"
    assert read_checkpoint_meta(out).growth_history[-1]["seed"] == 3


def test_cli_default_plot_path_and_force(source, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "tiny-d8.safetensors"
    out.write_bytes(b"old")
    assert grow_script.main([str(source), "--to", "8", "--force", "--plot", *FAST_EVAL]) == 0
    assert read_checkpoint_meta(out).config.d_model == 8
    assert (tmp_path / "figures" / "tiny-d8-growth.png").is_file()
    assert "figures/tiny-d8-growth.png" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "expected"),
    [("tiny-d4.safetensors", "tiny-d16.safetensors"), ("run/d4.safetensors", "run/d16.safetensors"),
     ("seed.safetensors", "seed-d16.safetensors"), ("model-d4-final.safetensors", "model-d4-final-d16.safetensors")],
)
def test_default_output_path(name, expected):
    assert grow_script.default_output_path(Path(name), 16) == Path(expected)


def test_default_eval_matches_training(source, tmp_path):
    # grow.py's default validation set must be the one training reports, so both print the same loss.
    summary = grow_checkpoint(source, tmp_path / "tiny-d8.safetensors", 8, mode="tile")

    model, meta = load_checkpoint(source)
    dataset = ByteDataset(load_corpus(None, meta.config.context_length), meta.config.context_length)
    trainer = Trainer(model, dataset, TrainConfig(), meta)
    assert summary["loss_before"] == trainer.evaluate()
