"""AdamW with per-parameter multipliers, the learning-rate schedule and weighted gradient clipping.

Every parameter carries three multipliers, all 1 for a model trained from scratch: `lr_scale` for its
learning rate, `wd_scale` for its decoupled weight decay and `eps_scale` for Adam's epsilon, plus a
`norm_weight` for its share of the clipped gradient norm. Growth with width-aware learning rates sets
them so the grown model takes the same steps as its source would have (see growth.optimizer).
Parameters with equal multipliers share one AdamW param group, so the foreach kernels stay batched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

MULTIPLIERS = ("lr_scale", "wd_scale", "eps_scale", "norm_weight")


def default_multipliers() -> dict[str, float]:
    return {name: 1.0 for name in MULTIPLIERS}


def decays(parameter: torch.Tensor) -> bool:
    """Weight decay applies to matrices (embedding included) and not to biases or LayerNorm gains."""
    return parameter.dim() >= 2


@dataclass
class AdamWSettings:
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


def build_adamw(
    model: nn.Module,
    settings: AdamWSettings,
    multipliers: dict[str, dict[str, float]] | None = None,
) -> torch.optim.AdamW:
    """Create AdamW over `model` with one param group per distinct set of multipliers.

    Each group records its parameters' names in `group["names"]` and its multipliers by name, so the
    optimizer state can be saved by parameter name and grown with the model.
    """
    multipliers = multipliers or {}
    groups: dict[tuple, dict] = {}
    for name, parameter in model.named_parameters():
        scales = multipliers.get(name, default_multipliers())
        decay = decays(parameter)
        key = (decay,) + tuple(scales[m] for m in MULTIPLIERS)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                **scales,
                "weight_decay": settings.weight_decay * scales["wd_scale"] if decay else 0.0,
                "eps": settings.eps * scales["eps_scale"],
            }
        groups[key]["params"].append(parameter)
        groups[key]["names"].append(name)
    return torch.optim.AdamW(
        list(groups.values()), lr=0.0, betas=(settings.beta1, settings.beta2), eps=settings.eps
    )


def parameter_multipliers(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, float]]:
    """Return each parameter's multipliers, keyed by parameter name."""
    return {
        name: {m: float(group[m]) for m in MULTIPLIERS}
        for group in optimizer.param_groups
        for name in group["names"]
    }


def set_learning_rate(optimizer: torch.optim.Optimizer, base_lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group["lr_scale"]


def clip_grad_norm(optimizer: torch.optim.Optimizer, max_norm: float) -> float:
    """Scale gradients so their weighted norm is at most `max_norm`; return the norm before clipping.

    The norm is sqrt(sum over parameters of norm_weight * |grad|^2). With every weight 1 this is
    `torch.nn.utils.clip_grad_norm_`. After a k-fold tiling the weights make it equal the source
    model's gradient norm, so clipping triggers at the same steps for both.
    """
    squares = []
    for group in optimizer.param_groups:
        grads = [p.grad for p in group["params"] if p.grad is not None]
        if grads:
            norms = torch.stack(torch._foreach_norm(grads))
            squares.append(group["norm_weight"] * norms.square().sum())
    if not squares:
        return 0.0
    total = torch.stack(squares).sum().sqrt()
    if max_norm > 0:
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for group in optimizer.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, coefficient)
    return float(total)


@dataclass
class LRSchedule:
    """Linear warmup to `peak_lr`, then cosine decay to `min_lr_ratio * peak_lr` at `total_steps`.

    `rewarmups` lists (start_step, length) windows in which the rate is additionally ramped linearly
    from 1/length to 1, used to re-warm the learning rate after a growth step.
    """

    peak_lr: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.1
    rewarmups: list[tuple[int, int]] = field(default_factory=list)

    def __call__(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            lr = self.peak_lr * (step + 1) / self.warmup_steps
        else:
            decay_steps = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / decay_steps)
            cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
            lr = self.peak_lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)
        for start, length in self.rewarmups:
            if start <= step < start + length:
                lr *= (step - start + 1) / length
        return lr

    def to_dict(self) -> dict:
        return {
            "peak_lr": self.peak_lr,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "min_lr_ratio": self.min_lr_ratio,
            "rewarmups": [list(window) for window in self.rewarmups],
        }

    @classmethod
    def from_dict(cls, values: dict) -> "LRSchedule":
        values = dict(values)
        values["rewarmups"] = [tuple(window) for window in values.get("rewarmups", [])]
        return cls(**values)


def adam_state_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Flatten AdamW state into `optimizer.NAME.exp_avg` style tensors keyed by parameter name."""
    tensors = {}
    for group in optimizer.param_groups:
        for name, parameter in zip(group["names"], group["params"]):
            state = optimizer.state.get(parameter)
            if not state:
                continue
            tensors[f"optimizer.{name}.exp_avg"] = state["exp_avg"]
            tensors[f"optimizer.{name}.exp_avg_sq"] = state["exp_avg_sq"]
            tensors[f"optimizer.{name}.step"] = torch.as_tensor(state["step"]).reshape(1)  # safetensors needs a shape
    return tensors


def load_adam_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Restore state written by `adam_state_tensors` onto the optimizer's parameters."""
    for group in optimizer.param_groups:
        for name, parameter in zip(group["names"], group["params"]):
            prefix = f"optimizer.{name}."
            if prefix + "exp_avg" not in tensors:
                continue
            optimizer.state[parameter] = {
                "step": tensors[prefix + "step"].reshape(()).clone(),
                "exp_avg": tensors[prefix + "exp_avg"].to(parameter).clone(),
                "exp_avg_sq": tensors[prefix + "exp_avg_sq"].to(parameter).clone(),
            }


def named_groups(optimizer: torch.optim.Optimizer) -> Iterable[tuple[str, torch.Tensor, dict]]:
    for group in optimizer.param_groups:
        for name, parameter in zip(group["names"], group["params"]):
            yield name, parameter, group
