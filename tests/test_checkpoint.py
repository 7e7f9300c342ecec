"""Safetensors checkpoints: bit-exact round trips, clear errors for bad files and atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import models.checkpoint
from models.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    atomic_save_tensors,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
    train_state_path,
)
from models.config import ModelConfig
from models.model import TinyTransformer


@pytest.fixture
def model() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer(ModelConfig())


@pytest.fixture
def meta(model) -> CheckpointMeta:
    return CheckpointMeta(
        config=model.config,
        step=123,
        tokens=456_789,
        flops=10**17 + 7,  # above 2**53, so a float64 round trip would lose the 7
        corpus={"source": "corpus.txt", "bytes": 1000, "sha256": "ab" * 32},
        growth_history=[{"from_d_model": 2, "to_d_model": 4, "step": 50}],
        training={"learning_rate": 0.01},
    )


@pytest.fixture
def saved(tmp_path, model, meta):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, meta)
    return path


def metadata_with(meta: CheckpointMeta, **changes: str) -> dict[str, str]:
    return {**meta.to_strings(), **changes}


def test_round_trip_weights(saved, model):
    loaded, _ = load_checkpoint(saved)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_round_trip_meta(saved, meta):
    _, loaded = load_checkpoint(saved)
    assert loaded == meta


def test_round_trip_flops_exact(saved, meta):
    assert read_checkpoint_meta(saved).flops == 10**17 + 7


def test_round_trip_logits(saved, model):
    loaded, _ = load_checkpoint(saved)
    idx = torch.randint(0, 256, (2, 16))
    assert torch.equal(loaded.eval()(idx), model.eval()(idx))


def test_round_trip_float64(tmp_path, model, meta):
    path = tmp_path / "double.safetensors"
    save_checkpoint(path, model.double(), meta)
    loaded, _ = load_checkpoint(path)
    assert loaded.lm_head.weight.dtype == torch.float64


def test_load_fast_flag(saved):
    loaded, _ = load_checkpoint(saved, fast=False)
    assert not loaded.fast


def test_train_state_path():
    assert train_state_path("runs/tiny-d4.safetensors").name == "tiny-d4.train.safetensors"


def test_save_config_mismatch(tmp_path, model, meta):
    meta.config = ModelConfig(d_model=8, n_heads=4, d_ff=16)
    with pytest.raises(CheckpointError, match="does not match"):
        save_checkpoint(tmp_path / "model.safetensors", model, meta)


# --- bad checkpoints -----------------------------------------------------------------------------


def test_load_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_load_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_load_not_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are notes, not tensors\n")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(path)


def test_load_truncated(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(saved)


def test_load_truncated_by_one_byte(saved):
    saved.write_bytes(saved.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(saved)


def test_load_wrong_format_version(tmp_path, model, meta):
    path = tmp_path / "future.safetensors"
    save_file(model.state_dict(), path, metadata=metadata_with(meta, format_version="99"))
    with pytest.raises(CheckpointError, match="unsupported checkpoint format version '99'"):
        load_checkpoint(path)


def test_load_missing_format_version(tmp_path, model):
    path = tmp_path / "plain.safetensors"
    save_file(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="not a tiny-growth checkpoint: .* no format_version"):
        load_checkpoint(path)


def test_load_invalid_config_json(tmp_path, model, meta):
    path = tmp_path / "bad.safetensors"
    save_file(model.state_dict(), path, metadata=metadata_with(meta, config="{not json"))
    with pytest.raises(CheckpointError, match="invalid checkpoint metadata"):
        load_checkpoint(path)


def test_load_invalid_config_value(tmp_path, model, meta):
    config = json.dumps({**meta.config.to_dict(), "n_heads": 3})
    path = tmp_path / "bad.safetensors"
    save_file(model.state_dict(), path, metadata=metadata_with(meta, config=config))
    with pytest.raises(CheckpointError, match="invalid checkpoint metadata"):
        load_checkpoint(path)


def test_load_shape_mismatch(tmp_path, meta):
    torch.manual_seed(0)
    wide = TinyTransformer(ModelConfig(d_model=8, n_heads=4, d_ff=16))
    path = tmp_path / "mismatch.safetensors"
    save_file(wide.state_dict(), path, metadata=meta.to_strings())  # d=8 tensors, d=4 config
    with pytest.raises(CheckpointError, match=r"tensor \S+ has shape \(8,\), but the config needs \(4,\)"):
        load_checkpoint(path)


def test_load_missing_tensor(tmp_path, model, meta):
    tensors = model.state_dict()
    del tensors["lm_head.bias"]
    path = tmp_path / "missing-tensor.safetensors"
    save_file(tensors, path, metadata=meta.to_strings())
    with pytest.raises(CheckpointError, match=r"missing: \['lm_head.bias'\]"):
        load_checkpoint(path)


def test_load_unexpected_tensor(tmp_path, model, meta):
    tensors = {**model.state_dict(), "extra": torch.zeros(1)}
    path = tmp_path / "extra.safetensors"
    save_file(tensors, path, metadata=meta.to_strings())
    with pytest.raises(CheckpointError, match=r"unexpected: \['extra'\]"):
        load_checkpoint(path)


def test_load_mixed_dtypes(tmp_path, model, meta):
    tensors = dict(model.state_dict())
    tensors["lm_head.bias"] = tensors["lm_head.bias"].double()
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, path, metadata=meta.to_strings())
    with pytest.raises(CheckpointError, match="mixed dtypes"):
        load_checkpoint(path)


def test_errors_are_value_errors(tmp_path):
    with pytest.raises(ValueError):
        load_checkpoint(tmp_path / "missing.safetensors")


# --- atomic writes -------------------------------------------------------------------------------


def fail_after_partial_write(tensors, filename, metadata=None):
    with open(filename, "wb") as handle:
        handle.write(b"partial")
    raise OSError("disk full")


def test_atomic_write_failure_keeps_old(saved, model, meta, monkeypatch):
    before = saved.read_bytes()
    monkeypatch.setattr(models.checkpoint, "save_file", fail_after_partial_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(saved, model, meta)
    assert saved.read_bytes() == before


def test_atomic_write_failure_no_temporary(saved, model, meta, monkeypatch):
    monkeypatch.setattr(models.checkpoint, "save_file", fail_after_partial_write)
    with pytest.raises(OSError):
        save_checkpoint(saved, model, meta)
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]


def test_atomic_write_failure_new_path(tmp_path, model, meta, monkeypatch):
    monkeypatch.setattr(models.checkpoint, "save_file", fail_after_partial_write)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "new.safetensors", model, meta)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="output directory not found"):
        atomic_save_tensors({"x": torch.zeros(1)}, tmp_path / "missing" / "x.safetensors", {})
