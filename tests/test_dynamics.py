"""Training-dynamics-preserving growth: grown AdamW state and width-aware multipliers, in float64."""

from __future__ import annotations

import pytest
import torch

from growth.dynamics import grow_trainer, gradient_scale
from growth.expand import expand, repeat_parameter
from models.checkpoint import CheckpointMeta
from models.config import ModelConfig
from models.data import ByteDataset, load_corpus
from models.model import TinyTransformer
from models.train import Trainer, TrainConfig

CONTEXT = 16  # short windows keep these float64 runs fast


@pytest.fixture(scope="module")
def dataset() -> ByteDataset:
    return ByteDataset(load_corpus(None, CONTEXT), CONTEXT)


def make_trainer(dataset: ByteDataset, tmp_path, grad_clip: float, warm_steps: int = 5) -> str:
    """Train a float64 d=4 model for a few steps with dropout off and save it; return the path."""
    torch.manual_seed(0)
    config = ModelConfig(context_length=CONTEXT)
    model = TinyTransformer(config).double()
    train_config = TrainConfig(
        steps=200, batch_size=8, warmup_steps=10, eval_interval=1000, eval_batches=1,
        grad_clip=grad_clip, dropout=0.0,
    )
    trainer = Trainer(model, dataset, train_config, CheckpointMeta(config))
    trainer.run(until_step=warm_steps)
    path = tmp_path / f"source-clip{grad_clip}.safetensors"
    trainer.save(path)
    return path


def losses_after(trainer: Trainer, steps: int) -> torch.Tensor:
    return torch.tensor([trainer.train_step() for _ in range(steps)], dtype=torch.float64)


def test_tiled_gradients_scale_by_one_over_k(dataset):
    torch.manual_seed(1)
    source = TinyTransformer(ModelConfig(context_length=CONTEXT)).double()
    grown = expand(source, 12, mode="tile")
    source.eval()  # no dropout, so both models see the same function
    grown.eval()
    inputs, targets = dataset.batch("train", 4, torch.Generator().manual_seed(0))

    source.loss(inputs, targets).backward()
    grown.loss(inputs, targets).backward()

    grown_grads = dict(grown.named_parameters())
    for name, parameter in source.named_parameters():
        expected = repeat_parameter(name, parameter.grad, 3) * gradient_scale(name, 3)
        torch.testing.assert_close(grown_grads[name].grad, expected, rtol=1e-9, atol=1e-12, msg=name)


def test_output_projection_gradient_unchanged():
    assert gradient_scale("lm_head.weight", 4) == 1.0
    assert gradient_scale("lm_head.bias", 4) == 1.0
    assert gradient_scale("blocks.0.attn.qkv.weight", 4) == 0.25
    assert gradient_scale("token_embedding.weight", 4) == 0.25


@pytest.mark.parametrize("d_model, grad_clip", [(8, 0.0), (16, 0.05)])
def test_grow_optimizer_follows_source_curve(dataset, tmp_path, grad_clip, d_model):
    path = make_trainer(dataset, tmp_path, grad_clip)
    source = Trainer.resume(path, dataset)
    grown = Trainer.resume(path, dataset)
    grow_trainer(grown, d_model, mode="tile", optimizer="grow", width_aware=True)

    reference = losses_after(source, 40)
    followed = losses_after(grown, 40)

    assert (followed - reference).abs().max() < 1e-9


def test_chained_growth_follows_source_curve(dataset, tmp_path):
    path = make_trainer(dataset, tmp_path, grad_clip=0.05)
    source = Trainer.resume(path, dataset)
    grown = Trainer.resume(path, dataset)
    grow_trainer(grown, 8, mode="tile")
    reference = losses_after(source, 10)
    first = losses_after(grown, 10)
    grow_trainer(grown, 16, mode="tile")
    reference_after = losses_after(source, 20)
    second = losses_after(grown, 20)

    assert (first - reference).abs().max() < 1e-9
    assert (second - reference_after).abs().max() < 1e-9


@pytest.mark.parametrize(
    "optimizer, width_aware", [("reset", False), ("reset", True), ("grow", False)]
)
def test_other_recipes_depart_from_source_curve(dataset, tmp_path, optimizer, width_aware):
    path = make_trainer(dataset, tmp_path, grad_clip=0.0)
    source = Trainer.resume(path, dataset)
    grown = Trainer.resume(path, dataset)
    grow_trainer(grown, 8, mode="tile", optimizer=optimizer, width_aware=width_aware)

    difference = (losses_after(grown, 10) - losses_after(source, 10)).abs().max()

    assert difference > 1e-6


def test_mirror_departs_from_source_curve(dataset, tmp_path):
    path = make_trainer(dataset, tmp_path, grad_clip=0.0)
    source = Trainer.resume(path, dataset)
    grown = Trainer.resume(path, dataset)
    record = grow_trainer(grown, 8, mode="mirror")

    difference = (losses_after(grown, 10) - losses_after(source, 10)).abs().max()

    assert abs(record["loss_after"] - record["loss_before"]) < 1e-10
    assert difference > 1e-9


def test_grown_moments_match_grown_weights(dataset, tmp_path):
    path = make_trainer(dataset, tmp_path, grad_clip=0.0)
    trainer = Trainer.resume(path, dataset)
    grow_trainer(trainer, 16, mode="mirror", optimizer="grow")

    for parameter in trainer.model.parameters():
        state = trainer.optimizer.state[parameter]
        assert state["exp_avg"].shape == parameter.shape
        assert state["exp_avg_sq"].shape == parameter.shape
        assert state["step"].item() == 5


def test_growth_record_and_counters(dataset, tmp_path):
    path = make_trainer(dataset, tmp_path, grad_clip=0.0)
    trainer = Trainer.resume(path, dataset)
    before = (trainer.meta.step, trainer.meta.tokens, trainer.meta.flops)
    record = grow_trainer(trainer, 8, mode="tile", seed=3)

    assert (trainer.meta.step, trainer.meta.tokens, trainer.meta.flops) == before
    assert trainer.meta.config.d_model == 8
    assert trainer.meta.growth_history == [record]
    assert record["from"] == 4
    assert record["to"] == 8
    assert record["seed"] == 3
    assert abs(record["loss_after"] - record["loss_before"]) < 1e-10
