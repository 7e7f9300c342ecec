"""The training loop: AdamW steps on random windows, periodic evaluation, metrics and resumable state.

Same seed, same data and the CPU give the same loss curve bit for bit. The batch sampler has its own
seeded generator and dropout draws from the global torch generator, seeded at the start. Both
generators' states are saved with the optimizer, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from models.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    atomic_save_tensors,
    load_checkpoint,
    read_tensors,
    save_checkpoint,
    train_state_path,
)
from models.data import ByteDataset, evaluate_loss
from models.flops import training_flops_per_token
from models.model import TinyTransformer, set_dropout
from models.optim import (
    AdamWSettings,
    LRSchedule,
    adam_state_tensors,
    build_adamw,
    clip_grad_norm,
    load_adam_state,
    parameter_multipliers,
    set_learning_rate,
)

logger = logging.getLogger(__name__)

EVAL_SEED = 0  # every model on a corpus is evaluated on the same validation windows
TRAIN_STATE_VERSION = 1


@dataclass
class TrainConfig:
    """Hyperparameters of one training run; the defaults suit the d=4 seed model on a CPU."""

    steps: int = 4000
    batch_size: int = 64
    learning_rate: float = 3e-2  # peak; for d=4 at 4000 steps, 3e-2 beat 1e-2, 6e-2 and 1e-1 on val loss
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # the cosine decays to this fraction of the peak
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # maximum gradient norm; 0 disables clipping
    eval_interval: int = 250  # steps between validation evaluations
    eval_batches: int = 20
    seed: int = 0
    dropout: float | None = None  # None: the rate the config derives from d_model

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_interval", "eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainConfig.learning_rate must be positive, got {self.learning_rate}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TrainConfig.dropout must be in [0, 1), got {self.dropout}")

    def adamw(self) -> AdamWSettings:
        return AdamWSettings(self.weight_decay, self.beta1, self.beta2, self.eps)

    def schedule(self) -> LRSchedule:
        return LRSchedule(self.learning_rate, self.warmup_steps, self.steps, self.min_lr_ratio)


class Trainer:
    """Owns a model, its AdamW state, the schedule, the RNG states and the metrics of one run.

    `meta` counts steps, tokens and FLOPs cumulatively across every stage the model has been through.
    `step` counts this run's optimizer steps and indexes the learning-rate schedule.
    """

    def __init__(
        self,
        model: TinyTransformer,
        dataset: ByteDataset,
        config: TrainConfig,
        meta: CheckpointMeta,
        schedule: LRSchedule | None = None,
        multipliers: dict[str, dict[str, float]] | None = None,
    ) -> None:
        self.model = model
        self.dataset = dataset
        self.config = config
        self.meta = meta
        self.schedule = schedule or config.schedule()
        self.device = next(model.parameters()).device
        self.step = 0
        self.loss_sum = 0.0  # train losses since the last metrics record
        self.loss_count = 0
        self.elapsed = 0.0  # seconds spent in training steps and evaluations

        if config.dropout is not None:
            set_dropout(model, config.dropout)
        torch.manual_seed(config.seed)  # dropout masks
        self.data_generator = torch.Generator().manual_seed(config.seed)
        self.optimizer = build_adamw(model, config.adamw(), multipliers)
        self.eval_set = dataset.eval_batches(config.batch_size, config.eval_batches, EVAL_SEED, self.device)

    @property
    def tokens_per_step(self) -> int:
        return self.config.batch_size * self.dataset.context_length

    def flops_per_step(self) -> int:
        return training_flops_per_token(self.model.config, self.dataset.context_length) * self.tokens_per_step

    def train_step(self) -> float:
        """Run one optimizer step on a fresh batch and return its training loss (nats per byte)."""
        self.model.train()
        set_learning_rate(self.optimizer, self.schedule(self.step))
        inputs, targets = self.dataset.batch("train", self.config.batch_size, self.data_generator, self.device)

        loss = self.model.loss(inputs, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm(self.optimizer, self.config.grad_clip)
        self.optimizer.step()

        self.step += 1
        self.meta.step += 1
        self.meta.tokens += self.tokens_per_step
        self.meta.flops += self.flops_per_step()
        value = float(loss.detach())
        self.loss_sum += value
        self.loss_count += 1
        return value

    def evaluate(self) -> float:
        return evaluate_loss(self.model, self.eval_set)

    def record(self) -> dict:
        """Evaluate and return one metrics record; resets the running train-loss mean."""
        started = time.perf_counter()
        val_loss = self.evaluate()
        self.elapsed += time.perf_counter() - started
        record = {
            "step": self.meta.step,
            "tokens": self.meta.tokens,
            "flops": self.meta.flops,
            "d_model": self.model.config.d_model,
            "train_loss": self.loss_sum / self.loss_count if self.loss_count else None,
            "val_loss": val_loss,
            "lr": self.schedule(max(self.step - 1, 0)),
            "elapsed_s": round(self.elapsed, 3),
        }
        self.loss_sum, self.loss_count = 0.0, 0
        return record

    def run(
        self,
        until_step: int | None = None,
        metrics_path: str | Path | None = None,
        on_step: Callable[["Trainer", float], None] | None = None,
        on_record: Callable[["Trainer", dict], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> bool:
        """Train until `until_step` (default: the configured steps); return False if stopped early.

        A metrics record (see `record`) is appended as one JSON line to `metrics_path` every
        `eval_interval` steps and at the last step. A fresh model is also evaluated before step 0.
        """
        until_step = self.config.steps if until_step is None else until_step
        if self.step == 0 and self.meta.step == 0:
            self._emit(self.record(), metrics_path, on_record)
        while self.step < until_step:
            if should_stop is not None and should_stop():
                return False
            started = time.perf_counter()
            loss = self.train_step()
            self.elapsed += time.perf_counter() - started
            if on_step is not None:
                on_step(self, loss)
            if self.step % self.config.eval_interval == 0 or self.step == until_step:
                self._emit(self.record(), metrics_path, on_record)
        return True

    @staticmethod
    def _emit(record: dict, metrics_path, on_record) -> None:
        logger.info("step %d: val loss %.4f", record["step"], record["val_loss"])
        if metrics_path is not None:
            with open(metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        if on_record is not None:
            on_record(record)

    # --- checkpoints -----------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the weights checkpoint and, beside it, the optimizer, schedule and RNG state."""
        self.meta.training = dataclasses.asdict(self.config)
        save_checkpoint(path, self.model, self.meta)
        state = {
            "step": self.step,
            "loss_sum": self.loss_sum,
            "loss_count": self.loss_count,
            "elapsed": self.elapsed,
            "train_config": dataclasses.asdict(self.config),
            "schedule": self.schedule.to_dict(),
            "multipliers": parameter_multipliers(self.optimizer),
        }
        tensors = adam_state_tensors(self.optimizer)
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.data"] = self.data_generator.get_state()
        metadata = {"format_version": str(TRAIN_STATE_VERSION), "trainer": json.dumps(state)}
        atomic_save_tensors(tensors, train_state_path(path), metadata)

    @classmethod
    def resume(cls, path: str | Path, dataset: ByteDataset, device: torch.device | str = "cpu", fast: bool = True) -> "Trainer":
        """Rebuild a trainer from a checkpoint and its training state, ready to continue bit for bit."""
        model, meta = load_checkpoint(path, device=device, fast=fast)
        state_file = train_state_path(path)
        if not state_file.is_file():
            raise CheckpointError(f"training state not found: {state_file} (needed to resume {path})")
        tensors, metadata = read_tensors(state_file)
        if metadata.get("format_version") != str(TRAIN_STATE_VERSION):
            raise CheckpointError(f"{state_file}: unsupported training state version {metadata.get('format_version')!r}")
        state = json.loads(metadata["trainer"])

        config = TrainConfig(**state["train_config"])
        trainer = cls(model, dataset, config, meta, LRSchedule.from_dict(state["schedule"]), state["multipliers"])
        load_adam_state(trainer.optimizer, tensors)
        torch.set_rng_state(tensors["rng.torch"])
        trainer.data_generator.set_state(tensors["rng.data"])
        trainer.step = state["step"]
        trainer.loss_sum = state["loss_sum"]
        trainer.loss_count = state["loss_count"]
        trainer.elapsed = state["elapsed"]
        return trainer


@contextmanager
def stop_requested_by_signal() -> Iterator[Callable[[], int | None]]:
    """Catch SIGINT and SIGTERM; yield a function returning the signal caught, if any.

    The training loop polls it between steps, so an interrupted run ends on a whole step and can save
    a checkpoint before the process exits. scripts/train.py also polls it once before the first step.
    """
    caught: list[int] = []

    def handler(signum, frame):
        caught.append(signum)
        logger.warning("received %s; stopping before the next training step", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: caught[0] if caught else None
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
