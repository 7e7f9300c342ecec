"""Command-line scripts: smoke runs as subprocesses, exit codes, SIGTERM and resume."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, run_script, script_environment
from safetensors.torch import save_file

from growth.checkpoint import grow_checkpoint
from models.checkpoint import read_checkpoint_meta, train_state_path
from models.flops import training_flops_per_token

TINY_RUN = ("--steps", "10", "--batch-size", "4", "--eval-interval", "5", "--eval-batches", "2")


def load_script(name: str):
    """Import scripts/NAME.py as a module, so its main(argv) runs in this process."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_script():
    return load_script("train")


@pytest.fixture(scope="module")
def generate_script():
    return load_script("generate")


def read_metrics(checkpoint: Path) -> list[dict]:
    path = checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + ".metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_one_line_error(stderr: str, text: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert text in lines[0]


# --- train.py as a subprocess --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "tiny.safetensors"
    return out, run_script("train.py", *TINY_RUN, "--out", str(out))


def test_train_script_exit_zero(tiny_run):
    _, process = tiny_run
    assert process.returncode == 0, process.stderr


def test_train_script_writes_files(tiny_run):
    out, _ = tiny_run
    assert out.is_file()
    assert train_state_path(out).is_file()


def test_train_script_metrics(tiny_run):
    out, _ = tiny_run
    assert [record["step"] for record in read_metrics(out)] == [0, 5, 10]


def test_train_script_final_loss(tiny_run):
    out, process = tiny_run
    final = read_metrics(out)[-1]["val_loss"]
    assert f"final val loss {final:.4f} nats/byte" in process.stdout
    assert "bits/byte" in process.stdout


def test_train_script_checkpoint_meta(tiny_run):
    out, _ = tiny_run
    meta = read_checkpoint_meta(out)
    assert (meta.step, meta.config.d_model, meta.config.n_heads, meta.config.d_ff) == (10, 4, 2, 8)
    assert meta.corpus["bytes"] > 100_000


def test_train_script_sigterm_then_resume(tmp_path):
    out = tmp_path / "interrupted.safetensors"
    command = [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), "--steps", "200", "--batch-size", "2",
               "--eval-interval", "5", "--eval-batches", "1", "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=script_environment(), cwd=REPO_ROOT)
    metrics = out.with_name("interrupted.metrics.jsonl")
    deadline = time.monotonic() + 90
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):  # step 0 and step 5
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no metrics record after step 5 within 90 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert f"resume with: python scripts/train.py --resume {out}" in stdout
    assert train_state_path(out).is_file()
    stopped_at = read_checkpoint_meta(out).step
    assert 5 <= stopped_at < 200

    resumed = run_script("train.py", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert read_checkpoint_meta(out).step == 200
    assert read_metrics(out)[-1]["step"] == 200


def caught_signals(status: Path) -> int:
    """Return the SigCgt bit mask (bit n - 1 for signal n) from a /proc/PID/status file."""
    for line in status.read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no SigCgt line in {status}")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc to see installed handlers")
def test_train_script_sigint_during_setup(tmp_path):
    out = tmp_path / "early.safetensors"
    out.write_bytes(b"user data")  # --force may replace it only once training has started
    command = [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), "--steps", "400", "--eval-interval", "100",
               "--threads", "1", "--out", str(out), "--force"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=script_environment(), cwd=REPO_ROOT)
    # Python catches SIGINT from startup but SIGTERM only once main() installs the training handler,
    # which happens before the seconds of setup. SigCgt in /proc is the mask of caught signals.
    status = Path(f"/proc/{process.pid}/status")
    deadline = time.monotonic() + 60
    while not caught_signals(status) & (1 << (signal.SIGTERM - 1)):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "train.py installed no SIGTERM handler within 60 s"
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)

    assert process.returncode == 128 + signal.SIGINT, stderr
    if "before training started" in stdout:
        assert "nothing was trained or written" in stdout
        assert out.read_bytes() == b"user data"
        assert sorted(path.name for path in tmp_path.iterdir()) == ["early.safetensors"]
    else:  # the signal was handled only after the first step started, so the run was saved
        assert train_state_path(out).is_file()
        assert read_checkpoint_meta(out).step < 400


def test_train_script_no_traceback_on_bad_corpus(tmp_path):
    process = run_script("train.py", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x.safetensors"))
    assert process.returncode == 2
    assert_one_line_error(process.stderr, "corpus path not found")


# --- train.py argument errors, in process --------------------------------------------------------


def test_train_refuses_existing_out(train_script, tmp_path, capsys):
    out = tmp_path / "existing.safetensors"
    out.write_bytes(b"old")
    assert train_script.main([*TINY_RUN, "--out", str(out)]) == 2
    assert_one_line_error(capsys.readouterr().err, "pass --force")
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.safetensors"]


def test_train_force_overwrites(train_script, tmp_path):
    out = tmp_path / "forced.safetensors"
    out.write_bytes(b"old")
    out.with_name("forced.metrics.jsonl").write_text('{"step": 999}\n')
    assert train_script.main([*TINY_RUN, "--out", str(out), "--force"]) == 0
    assert read_checkpoint_meta(out).step == 10
    assert read_metrics(out)[0]["step"] == 0


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--d-model", "6", "--n-heads", "4"], "ModelConfig.d_model=6 is not divisible by n_heads=4"),
        (["--d-model", "6", "--n-heads", "2"], "ModelConfig.head_dim=3"),
        (["--d-ff", "0"], "ModelConfig.d_ff must be a positive integer"),
        (["--steps", "0"], "TrainConfig.steps must be a positive integer"),
        (["--learning-rate", "-1"], "TrainConfig.learning_rate must be positive"),
        (["--threads", "0"], "--threads must be positive"),
    ],
)
def test_train_invalid_config(train_script, tmp_path, capsys, arguments, message):
    out = tmp_path / "x.safetensors"
    assert train_script.main([*arguments, "--out", str(out)]) == 2
    assert_one_line_error(capsys.readouterr().err, message)
    assert not out.exists()


def test_train_too_short_corpus(train_script, tmp_path, capsys):
    corpus = tmp_path / "short.txt"
    corpus.write_bytes(b"x" * 100)
    assert train_script.main(["--data", str(corpus), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert_one_line_error(capsys.readouterr().err, f"corpus {corpus} has 100 bytes, but at least 650")


def test_train_empty_corpus_directory(train_script, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train_script.main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert_one_line_error(capsys.readouterr().err, "contains no files")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_train_unavailable_device(train_script, tmp_path, capsys):
    assert train_script.main(["--device", "cuda", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert_one_line_error(capsys.readouterr().err, "CUDA is not available")


def test_train_resume_missing(train_script, tmp_path, capsys):
    assert train_script.main(["--resume", str(tmp_path / "missing.safetensors")]) == 2
    assert_one_line_error(capsys.readouterr().err, "checkpoint not found")


def test_train_resume_not_safetensors(train_script, tmp_path, capsys):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x00" * 64)
    assert train_script.main(["--resume", str(path)]) == 2
    assert_one_line_error(capsys.readouterr().err, "not a readable safetensors file")


def test_train_resume_foreign_safetensors(train_script, tmp_path, capsys):
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))  # no metadata, as many other tools write
    assert train_script.main(["--resume", str(path)]) == 2
    assert_one_line_error(capsys.readouterr().err, "is not a tiny-growth checkpoint: its safetensors metadata has no format_version")


def test_train_resume_state_file(train_script, trained_checkpoint, capsys):
    state = train_state_path(trained_checkpoint)
    assert train_script.main(["--resume", str(state)]) == 2
    assert_one_line_error(
        capsys.readouterr().err, f"{state} is a training-state file (optimizer and RNG state), not a checkpoint; "
        f"pass the weights file {trained_checkpoint} instead",
    )


def test_train_resume_without_state(train_script, trained_checkpoint, tmp_path, capsys):
    path = tmp_path / "alone.safetensors"
    path.write_bytes(trained_checkpoint.read_bytes())
    assert train_script.main(["--resume", str(path)]) == 2
    assert_one_line_error(capsys.readouterr().err, "training state not found")


def test_train_resume_other_corpus(train_script, trained_checkpoint, tmp_path, capsys):
    corpus = tmp_path / "other.txt"
    corpus.write_bytes(b"other text " * 100)
    assert train_script.main(["--resume", str(trained_checkpoint), "--data", str(corpus)]) == 2
    assert_one_line_error(capsys.readouterr().err, "corpus mismatch")


def test_train_resume_rejects_training_flags(train_script, trained_checkpoint, capsys):
    assert train_script.main(["--resume", str(trained_checkpoint), "--steps", "50", "--d-model", "8"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--steps, --d-model cannot be combined with --resume")


def test_train_resume_to_new_out(train_script, trained_checkpoint, tmp_path):
    out = tmp_path / "copy.safetensors"
    assert train_script.main(["--resume", str(trained_checkpoint), "--out", str(out)]) == 0
    assert read_checkpoint_meta(out).step == read_checkpoint_meta(trained_checkpoint).step


# --- train.py --init ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grown_checkpoint(trained_checkpoint, tmp_path_factory) -> Path:
    """The trained seed checkpoint widened to d_model 8 by growth.checkpoint, as scripts/grow.py does."""
    path = tmp_path_factory.mktemp("grown") / "tiny-d8.safetensors"
    grow_checkpoint(trained_checkpoint, path, 8, mode="tile", eval_batches=2, batch_size=4)
    return path


@pytest.fixture(scope="module")
def init_run(train_script, grown_checkpoint):
    """A 10-step --init run from the grown checkpoint, written to the default output path."""
    assert train_script.main(["--init", str(grown_checkpoint), *TINY_RUN]) == 0
    return grown_checkpoint.with_name("tiny-d8-cont.safetensors")


def test_train_init_keeps_model(init_run):
    assert read_checkpoint_meta(init_run).config.d_model == 8


def test_train_init_accumulates_counts(init_run, grown_checkpoint):
    before = read_checkpoint_meta(grown_checkpoint)
    after = read_checkpoint_meta(init_run)
    tokens_per_step = 4 * 64  # --batch-size 4 windows of context_length 64
    assert after.step == before.step + 10
    assert after.tokens == before.tokens + 10 * tokens_per_step
    assert after.flops == before.flops + 10 * training_flops_per_token(after.config) * tokens_per_step


def test_train_init_keeps_growth_history(init_run, grown_checkpoint):
    history = read_checkpoint_meta(grown_checkpoint).growth_history
    assert len(history) == 1
    assert read_checkpoint_meta(init_run).growth_history == history


def test_train_init_fresh_metrics(init_run, grown_checkpoint):
    start = read_checkpoint_meta(grown_checkpoint).step
    assert [record["step"] for record in read_metrics(init_run)] == [start + 5, start + 10]


def test_train_init_fresh_schedule(init_run):
    assert read_checkpoint_meta(init_run).training["steps"] == 10


def test_train_init_resumable(train_script, init_run, tmp_path):
    out = tmp_path / "resumed.safetensors"
    assert train_script.main(["--resume", str(init_run), "--out", str(out)]) == 0
    assert read_checkpoint_meta(out).step == read_checkpoint_meta(init_run).step


def test_train_init_other_corpus_warns(train_script, grown_checkpoint, tmp_path, caplog):
    corpus = tmp_path / "other.txt"
    corpus.write_bytes(b"other text " * 100)
    out = tmp_path / "other.safetensors"
    assert train_script.main(["--init", str(grown_checkpoint), *TINY_RUN, "--data", str(corpus), "--out", str(out)]) == 0
    assert "differs from" in caplog.text
    assert read_checkpoint_meta(out).corpus["bytes"] == 1100


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--d-model", "16"], "--d-model cannot be combined with --init"),
        (["--n-heads", "2", "--rotary-targets", "qk"], "--n-heads, --rotary-targets cannot be combined with --init"),
        (["--resume", "x.safetensors"], "--init cannot be combined with --resume"),
    ],
)
def test_train_init_rejects_flags(train_script, grown_checkpoint, tmp_path, capsys, arguments, message):
    out = tmp_path / "x.safetensors"
    assert train_script.main(["--init", str(grown_checkpoint), *arguments, "--out", str(out)]) == 2
    assert_one_line_error(capsys.readouterr().err, message)
    assert not out.exists()


def test_train_init_rejects_out_equal_init(train_script, grown_checkpoint, capsys):
    before = grown_checkpoint.read_bytes()
    assert train_script.main(["--init", str(grown_checkpoint), *TINY_RUN, "--out", str(grown_checkpoint), "--force"]) == 2
    assert_one_line_error(capsys.readouterr().err, "is the --init checkpoint")
    assert grown_checkpoint.read_bytes() == before


# --- generate.py ---------------------------------------------------------------------------------


def test_generate_script_smoke(trained_checkpoint):
    process = run_script("generate.py", str(trained_checkpoint), "--prompt", "héllo", "--max-new-tokens", "20")
    assert process.returncode == 0, process.stderr
    assert process.stdout.startswith("héllo")


def run_generate_bytes(checkpoint: Path, *args: bytes | str) -> subprocess.CompletedProcess:
    """Run generate.py with byte arguments, which need not be valid UTF-8, and capture bytes."""
    command = [sys.executable, str(REPO_ROOT / "scripts" / "generate.py"), str(checkpoint), *args]
    return subprocess.run(command, capture_output=True, timeout=120, env=script_environment(), cwd=REPO_ROOT)


def test_generate_non_utf8_prompt(trained_checkpoint):
    process = run_generate_bytes(trained_checkpoint, "--prompt", b"\xff\xfeabc", "--max-new-tokens", "5")
    assert process.returncode == 0, process.stderr
    assert process.stdout.startswith("\ufffd\ufffdabc".encode("utf-8"))


def test_generate_raw_bytes(trained_checkpoint):
    process = run_generate_bytes(trained_checkpoint, "--prompt", b"\xff\xfeabc", "--max-new-tokens", "5", "--raw")
    assert process.returncode == 0, process.stderr
    assert process.stdout.startswith(b"\xff\xfeabc")
    assert len(process.stdout) == len(b"\xff\xfeabc") + 5


def test_generate_same_seed_same_text(generate_script, trained_checkpoint, capsys):
    arguments = [str(trained_checkpoint), "--max-new-tokens", "40", "--seed", "7", "--temperature", "1.5"]
    generate_script.main(arguments)
    first = capsys.readouterr().out
    generate_script.main(arguments)
    assert capsys.readouterr().out == first


def test_generate_other_seed_other_text(generate_script, trained_checkpoint, capsys):
    arguments = [str(trained_checkpoint), "--max-new-tokens", "40", "--temperature", "1.5"]
    generate_script.main([*arguments, "--seed", "1"])
    first = capsys.readouterr().out
    generate_script.main([*arguments, "--seed", "2"])
    assert capsys.readouterr().out != first


def test_generate_empty_prompt(generate_script, trained_checkpoint, capsys):
    assert generate_script.main([str(trained_checkpoint), "--prompt", "", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out != ""


def test_generate_replaces_invalid_utf8(generate_script, trained_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(generate_script, "generate", lambda *args: b"\xff\xfe ok")
    assert generate_script.main([str(trained_checkpoint), "--prompt", "x"]) == 0
    assert capsys.readouterr().out == "x\ufffd\ufffd ok\n"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--max-new-tokens", "-1"], "max_new_tokens must be >= 0"),
        (["--temperature", "-0.1"], "temperature must be >= 0"),
        (["--top-k", "0"], "top_k must be between 1 and 256"),
        (["--top-k", "257"], "top_k must be between 1 and 256"),
    ],
)
def test_generate_invalid_arguments(generate_script, trained_checkpoint, capsys, arguments, message):
    assert generate_script.main([str(trained_checkpoint), *arguments]) == 2
    assert_one_line_error(capsys.readouterr().err, message)


def test_generate_state_file(generate_script, trained_checkpoint, capsys):
    assert generate_script.main([str(train_state_path(trained_checkpoint))]) == 2
    assert_one_line_error(capsys.readouterr().err, f"pass the weights file {trained_checkpoint} instead")


def test_generate_missing_checkpoint(generate_script, tmp_path, capsys):
    assert generate_script.main([str(tmp_path / "missing.safetensors")]) == 2
    assert_one_line_error(capsys.readouterr().err, "checkpoint not found")
