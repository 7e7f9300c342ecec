"""Growing a model in the middle of training: weights, AdamW state and per-parameter multipliers.

After a k-fold tiling the grown model computes the same function, and its gradients relate to the
source's simply (checked in float64 by the tests):

- every grown parameter's gradient is its source gradient divided by k, because each copy of the
  hidden state feeds 1/k of every sum downstream. The output projection's weight and bias are the
  exception: their output, the logits, is not repeated, so their gradients are unchanged;
- Adam's update is unchanged by a gradient scale s when its first moment is scaled by s, its second
  moment by s^2 and its epsilon by s;
- a weight tiled into blocks of W/k moves the function as much as its source when its learning rate
  is divided by k, and its decoupled weight decay then needs a factor k to shrink it as much;
  repeated vectors (embedding columns, LayerNorm parameters, biases) keep both;
- the gradient norm summed over the copies differs from the source's by a known factor per
  parameter, so each parameter's share of the clipped norm is weighted to cancel it.

With `optimizer="grow"`, `width_aware=True` and `mode="tile"` (and dropout off), training the grown
model on the same batches follows the source model's loss curve step for step. `mirror` departs from
it on purpose, so that the copies can learn different features.
"""

from __future__ import annotations

import logging

import torch

from growth.expand import DEFAULT_NOISE, expand, is_tiled_matrix, repeat_parameter
from models.optim import build_adamw, default_multipliers, named_groups
from models.train import Trainer
from models.model import set_dropout

logger = logging.getLogger(__name__)

OPTIMIZER_MODES = ("reset", "grow")
OUTPUT_PARAMETERS = ("lm_head.weight", "lm_head.bias")  # gradients unchanged by tiling


def gradient_scale(name: str, factor: int) -> float:
    """Factor between a grown parameter's gradient and its source's after a `factor`-fold tiling."""
    return 1.0 if name in OUTPUT_PARAMETERS else 1.0 / factor


def grown_multipliers(
    name: str, old: dict[str, float], factor: int, copies: int, tiled_matrix: bool
) -> dict[str, float]:
    """Multipliers that keep the training dynamics of a parameter grown `factor`-fold.

    `copies` is how many copies of each source element the grown tensor holds (k^2 for a k x k tiled
    matrix, k for the output projection's column blocks and for repeated vectors, 1 for its bias).
    """
    scale = gradient_scale(name, factor)
    return {
        "lr_scale": old["lr_scale"] / factor if tiled_matrix else old["lr_scale"],
        "wd_scale": old["wd_scale"] * factor if tiled_matrix else old["wd_scale"],
        "eps_scale": old["eps_scale"] * scale,
        # sum over copies of |scale * g|^2 = copies * scale^2 * |g|^2, so weight by its inverse
        "norm_weight": old["norm_weight"] / (copies * scale**2),
    }


def grow_trainer(
    trainer: Trainer,
    d_model: int,
    mode: str = "mirror",
    noise: float | None = None,
    seed: int = 0,
    optimizer: str = "grow",
    width_aware: bool = True,
    rewarmup_steps: int = 0,
) -> dict:
    """Widen the trainer's model to `d_model` in place and carry on training from the same step.

    The data sampler, the schedule position, the RNG states and the step/token/FLOP counters carry
    over. `optimizer="reset"` starts a fresh AdamW; `"grow"` carries the AdamW moments, grown like
    the weights and rescaled by the gradient scale. `width_aware` sets the per-parameter learning
    rate, weight decay, epsilon and clipping multipliers described in the module docstring.
    `rewarmup_steps > 0` ramps the learning rate up again over that many steps.
    Returns the growth record appended to the trainer's growth history.
    """
    if optimizer not in OPTIMIZER_MODES:
        raise ValueError(f"optimizer mode must be one of {OPTIMIZER_MODES}, got {optimizer!r}")
    source = trainer.model
    factor = d_model // source.config.d_model
    loss_before = trainer.evaluate()

    noise = DEFAULT_NOISE if noise is None else noise
    grown = expand(source, d_model, mode=mode, noise=noise, seed=seed)
    if trainer.config.dropout is not None:
        set_dropout(grown, trainer.config.dropout)
    grown_parameters = dict(grown.named_parameters())

    old_multipliers = {name: group_values(group) for name, _, group in named_groups(trainer.optimizer)}
    multipliers = {}
    for name, parameter, _ in named_groups(trainer.optimizer):
        copies = grown_parameters[name].numel() // parameter.numel()
        tiled = is_tiled_matrix(name)
        if width_aware:
            multipliers[name] = grown_multipliers(name, old_multipliers[name], factor, copies, tiled)
        else:
            multipliers[name] = old_multipliers[name] if optimizer == "grow" else default_multipliers()

    new_optimizer = build_adamw(grown, trainer.config.adamw(), multipliers)
    if optimizer == "grow":
        for name, parameter, _ in named_groups(trainer.optimizer):
            state = trainer.optimizer.state.get(parameter)
            if not state:
                continue
            scale = gradient_scale(name, factor)
            new_optimizer.state[grown_parameters[name]] = {
                "step": state["step"].clone(),
                "exp_avg": repeat_parameter(name, state["exp_avg"], factor) * scale,
                "exp_avg_sq": repeat_parameter(name, state["exp_avg_sq"], factor) * scale**2,
            }

    trainer.model = grown
    trainer.optimizer = new_optimizer
    trainer.meta.config = grown.config
    if rewarmup_steps > 0:
        trainer.schedule.rewarmups.append((trainer.step, rewarmup_steps))
    loss_after = trainer.evaluate()

    record = {
        "from": source.config.d_model,
        "to": d_model,
        "mode": mode,
        "noise": noise,
        "seed": seed,
        "optimizer": optimizer,
        "width_aware": width_aware,
        "rewarmup_steps": rewarmup_steps,
        "step": trainer.meta.step,
        "tokens": trainer.meta.tokens,
        "flops": trainer.meta.flops,
        "loss_before": loss_before,
        "loss_after": loss_after,
    }
    trainer.meta.growth_history.append(record)
    logger.info(
        "grew d_model %d -> %d (%s): val loss %.6f -> %.6f",
        record["from"], d_model, mode, loss_before, loss_after,
    )
    return record


def group_values(group: dict) -> dict[str, float]:
    return {name: float(group[name]) for name in default_multipliers()}
