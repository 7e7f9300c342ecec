"""Training loop: learning, seeded reproducibility, exact resume, FLOP counting and devices."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_trainer, small_train_config

from models.checkpoint import CheckpointError, read_checkpoint_meta, train_state_path
from models.config import ModelConfig
from models.device import resolve_device
from models.flops import matmul_parameters, training_flops_per_token
from models.optim import adam_state_tensors
from models.train import Trainer, TrainConfig


def loss_curve(dataset, steps: int, seed: int = 0) -> list[float]:
    trainer = make_trainer(dataset, small_train_config(steps=steps, seed=seed))
    return [trainer.train_step() for _ in range(steps)]


# --- learning and reproducibility ----------------------------------------------------------------


def test_training_lowers_val_loss(dataset):
    trainer = make_trainer(dataset, small_train_config(steps=150, batch_size=16, learning_rate=3e-2, eval_interval=150))
    records = []
    trainer.run(on_record=records.append)
    assert records[0]["step"] == 0
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 1.0


def test_same_seed_same_curve(dataset):
    assert loss_curve(dataset, 5) == loss_curve(dataset, 5)


def test_different_seed_different_curve(dataset):
    assert loss_curve(dataset, 3, seed=0) != loss_curve(dataset, 3, seed=1)


def test_reference_path_same_curve(dataset):
    # One trainer after the other, because both draw dropout masks from the global generator.
    fast = make_trainer(dataset, small_train_config(steps=3))
    fast_curve = [fast.train_step() for _ in range(3)]
    reference = make_trainer(dataset, small_train_config(steps=3), fast=False)
    reference_curve = [reference.train_step() for _ in range(3)]
    assert fast_curve == pytest.approx(reference_curve, rel=1e-5)


def test_metrics_records(dataset, tmp_path):
    path = tmp_path / "metrics.jsonl"
    make_trainer(dataset, small_train_config(steps=12, eval_interval=5)).run(metrics_path=path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 5, 10, 12]
    assert records[0]["train_loss"] is None
    assert records[-1]["tokens"] == 12 * 8 * 64


def test_run_should_stop(dataset):
    trainer = make_trainer(dataset, small_train_config(steps=10))
    finished = trainer.run(should_stop=lambda: trainer.step >= 3)
    assert not finished
    assert trainer.step == 3


def test_run_until_step(dataset):
    trainer = make_trainer(dataset, small_train_config(steps=10))
    assert trainer.run(until_step=4)
    assert trainer.step == 4


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(steps=0), "steps"),
        (dict(batch_size=-1), "batch_size"),
        (dict(eval_interval=0), "eval_interval"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_train_config_invalid(overrides, field):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**overrides)


# --- resume --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resumed_and_uninterrupted(dataset, tmp_path_factory):
    """Train 2N steps in one go, and N steps + save + resume + N steps, from the same seed."""
    n = 6
    config = small_train_config(steps=2 * n, eval_interval=4)
    uninterrupted = make_trainer(dataset, config)
    uninterrupted.run()

    path = tmp_path_factory.mktemp("resume") / "half.safetensors"
    first_half = make_trainer(dataset, config)
    first_half.run(until_step=n)
    first_half.save(path)
    torch.manual_seed(1234)  # the resumed run must restore the RNG state, not inherit this one
    resumed = Trainer.resume(path, dataset)
    resumed.run()
    return uninterrupted, resumed


def test_resume_same_weights(resumed_and_uninterrupted):
    uninterrupted, resumed = resumed_and_uninterrupted
    for name, tensor in uninterrupted.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name


def test_resume_same_optimizer_state(resumed_and_uninterrupted):
    uninterrupted, resumed = resumed_and_uninterrupted
    expected = adam_state_tensors(uninterrupted.optimizer)
    actual = adam_state_tensors(resumed.optimizer)
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def test_resume_same_counters(resumed_and_uninterrupted):
    uninterrupted, resumed = resumed_and_uninterrupted
    assert resumed.step == uninterrupted.step
    assert (resumed.meta.step, resumed.meta.tokens, resumed.meta.flops) == (
        uninterrupted.meta.step, uninterrupted.meta.tokens, uninterrupted.meta.flops,
    )


def test_resume_same_eval_loss(resumed_and_uninterrupted):
    uninterrupted, resumed = resumed_and_uninterrupted
    assert resumed.evaluate() == uninterrupted.evaluate()


def test_resume_missing_state(trained_checkpoint, dataset, tmp_path):
    path = tmp_path / "alone.safetensors"
    path.write_bytes(trained_checkpoint.read_bytes())
    with pytest.raises(CheckpointError, match="training state not found"):
        Trainer.resume(path, dataset)


def test_save_writes_state_file(trained_checkpoint):
    assert train_state_path(trained_checkpoint).is_file()


def test_save_records_training_config(trained_checkpoint):
    assert read_checkpoint_meta(trained_checkpoint).training["batch_size"] == 8


# --- FLOPs ---------------------------------------------------------------------------------------


def test_flops_seed_formula():
    # Matmul weights are 2 layers * (3*16 + 16 + 2*32) + 4*256 = 1280, and attention adds 4*t*d per layer.
    assert matmul_parameters(ModelConfig()) == 1280
    assert training_flops_per_token(ModelConfig()) == 6 * 1280 + 3 * 2 * (4 * 64 * 4)


def test_flops_seed_value():
    assert training_flops_per_token(ModelConfig()) == 13_824


def test_flops_short_sequence():
    assert training_flops_per_token(ModelConfig(), seq_len=16) == 6 * 1280 + 3 * 2 * (4 * 16 * 4)


def test_flops_counted_per_step(dataset):
    trainer = make_trainer(dataset, small_train_config(steps=3))
    trainer.run()
    assert trainer.meta.flops == 3 * 13_824 * 8 * 64


def test_flops_accumulate_in_checkpoint(trained_checkpoint, dataset, tmp_path):
    trainer = Trainer.resume(trained_checkpoint, dataset)
    trainer.config.steps = trainer.schedule.total_steps = 25  # five more steps than were saved
    trainer.run()
    path = tmp_path / "longer.safetensors"
    trainer.save(path)
    meta = read_checkpoint_meta(path)
    assert read_checkpoint_meta(trained_checkpoint).flops == 20 * 13_824 * 8 * 64
    assert meta.flops == 25 * 13_824 * 8 * 64
    assert meta.tokens == 25 * 8 * 64


# --- devices -------------------------------------------------------------------------------------


def test_resolve_device_auto():
    assert isinstance(resolve_device("auto"), torch.device)


def test_resolve_device_cpu():
    assert resolve_device("cpu") == torch.device("cpu")


def test_resolve_device_unknown():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_resolve_device_cuda_unavailable():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is available")
def test_resolve_device_mps_unavailable():
    with pytest.raises(ValueError, match="MPS is not available"):
        resolve_device("mps")
