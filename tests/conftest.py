"""Shared fixtures: the default corpus, the seed config and helpers to run the scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.checkpoint import CheckpointMeta
from models.config import ModelConfig
from models.data import ByteDataset, load_corpus
from models.model import TinyTransformer
from models.train import Trainer, TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]

# Ops at d_model 4 are tiny, so one thread loses little and keeps timings stable on a shared CPU.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def seed_config() -> ModelConfig:
    return ModelConfig()


@pytest.fixture(scope="session")
def corpus():
    return load_corpus(None, ModelConfig().context_length)


@pytest.fixture(scope="session")
def dataset(corpus) -> ByteDataset:
    return ByteDataset(corpus, ModelConfig().context_length)


def small_train_config(**overrides) -> TrainConfig:
    """A few cheap steps: small batches, frequent records, two evaluation batches."""
    values = dict(steps=20, batch_size=8, warmup_steps=5, eval_interval=5, eval_batches=2)
    values.update(overrides)
    return TrainConfig(**values)


def make_trainer(dataset: ByteDataset, config: TrainConfig, model_config: ModelConfig | None = None, fast: bool = True) -> Trainer:
    """Build a fresh trainer whose initialization depends only on config.seed."""
    model_config = model_config or ModelConfig()
    torch.manual_seed(config.seed)
    model = TinyTransformer(model_config, fast=fast)
    return Trainer(model, dataset, config, CheckpointMeta(model_config, corpus=dataset.corpus.fingerprint()))


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, dataset) -> Path:
    """A seed-model checkpoint (with training state) after 20 small steps on the default corpus."""
    path = tmp_path_factory.mktemp("trained") / "tiny.safetensors"
    trainer = make_trainer(dataset, small_train_config())
    trainer.run()
    trainer.save(path)
    return path


def run_script(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run scripts/SCRIPT with one CPU thread and return the finished process with text output."""
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / script), *args],
        capture_output=True, text=True, timeout=timeout, env=script_environment(), cwd=REPO_ROOT,
    )


def script_environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
