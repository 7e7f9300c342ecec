"""Safetensors checkpoints with readable metadata, written atomically and validated on load.

A checkpoint is one `.safetensors` file of weights whose string metadata contains the format version,
the config as JSON, the step, tokens seen, cumulative training FLOPs, the corpus fingerprint and the
growth history. The optimizer and RNG state for resuming lives in a second safetensors file beside it
(`NAME.train.safetensors`). Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models.config import ModelConfig
from models.model import TinyTransformer

FORMAT_VERSION = 1
TRAIN_STATE_SUFFIX = ".train.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, truncated or does not match its config."""


@dataclass
class CheckpointMeta:
    """Metadata stored beside the weights."""

    config: ModelConfig
    step: int = 0
    tokens: int = 0  # training tokens seen, across every growth stage
    flops: int = 0  # cumulative training FLOPs, see models.flops
    corpus: dict[str, Any] | None = None  # fingerprint of the training corpus
    growth_history: list[dict[str, Any]] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)  # hyperparameters of the last run

    def to_strings(self) -> dict[str, str]:
        return {
            "format_version": str(FORMAT_VERSION),
            "config": self.config.to_json(),
            "step": str(self.step),
            "tokens": str(self.tokens),
            "flops": str(self.flops),
            "corpus": json.dumps(self.corpus),
            "growth_history": json.dumps(self.growth_history),
            "training": json.dumps(self.training, sort_keys=True),
        }

    @classmethod
    def from_strings(cls, values: dict[str, str], path: Path) -> "CheckpointMeta":
        version = values.get("format_version")
        # A training-state file also has format_version 1, so it is recognized by its name and its
        # missing config before the version check.
        if path.name.endswith(TRAIN_STATE_SUFFIX) and "config" not in values:
            weights = path.with_name(path.name.removesuffix(TRAIN_STATE_SUFFIX) + ".safetensors")
            raise CheckpointError(
                f"{path} is a training-state file (optimizer and RNG state), not a checkpoint; "
                f"pass the weights file {weights} instead"
            )
        if version is None:
            raise CheckpointError(
                f"{path} is not a tiny-growth checkpoint: its safetensors metadata has no format_version; "
                "pass a checkpoint written by scripts/train.py or scripts/grow.py"
            )
        if version != str(FORMAT_VERSION):
            raise CheckpointError(
                f"{path}: unsupported checkpoint format version {version!r} (expected {FORMAT_VERSION})"
            )
        try:
            config = ModelConfig.from_dict(json.loads(values["config"]))
            return cls(
                config=config,
                step=int(values["step"]),
                tokens=int(values["tokens"]),
                flops=int(values["flops"]),
                corpus=json.loads(values["corpus"]),
                growth_history=json.loads(values["growth_history"]),
                training=json.loads(values.get("training", "{}")),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: invalid checkpoint metadata: {error}") from error


def train_state_path(path: str | Path) -> Path:
    """Path of the optimizer and RNG state file that belongs to checkpoint `path`."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + TRAIN_STATE_SUFFIX)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file to a temporary name in the same directory, then rename it into place."""
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"output directory not found: {path.parent}")
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp creates 0600; use the usual file mode
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the metadata of a safetensors file, with one clear error for bad files."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass the checkpoint's .safetensors file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error
    return tensors, metadata


def save_checkpoint(path: str | Path, model: TinyTransformer, meta: CheckpointMeta) -> None:
    if meta.config != model.config:
        raise CheckpointError(f"metadata config {meta.config} does not match the model's {model.config}")
    atomic_save_tensors(model.state_dict(), path, meta.to_strings())


def read_checkpoint_meta(path: str | Path) -> CheckpointMeta:
    """Read and validate only the metadata of a checkpoint."""
    _, metadata = read_tensors(path)
    return CheckpointMeta.from_strings(metadata, Path(path))


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu", fast: bool = True
) -> tuple[TinyTransformer, CheckpointMeta]:
    """Load a checkpoint into a new TinyTransformer after checking every tensor's name and shape."""
    path = Path(path)
    tensors, metadata = read_tensors(path)
    meta = CheckpointMeta.from_strings(metadata, path)
    model = TinyTransformer(meta.config, fast=fast)
    expected = model.state_dict()

    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensors do not match the config (missing: {missing or 'none'}, "
            f"unexpected: {unexpected or 'none'})"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)}, but the config "
                f"needs {tuple(expected[name].shape)}"
            )
    dtypes = {tensor.dtype for tensor in tensors.values()}
    if len(dtypes) != 1:
        raise CheckpointError(f"{path}: tensors have mixed dtypes {sorted(map(str, dtypes))}")
    model.to(dtypes.pop())  # keep the stored precision, so a float64 checkpoint stays float64
    model.load_state_dict(tensors)
    return model.to(device), meta
