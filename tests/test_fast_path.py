"""The fast training path (chunked attention, fused chunked loss) against the reference path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import ModelConfig, TinyTransformer
from models import attention
from models.attention import chunked_causal_attention
from models.layernorm import layer_norm_linear, normalize
from models.losses import linear_cross_entropy
from models.rotary import apply_rotary, rotary_tables, rotate_channel_first

# (dtype, absolute tolerance) for logits, loss and gradients of the two paths.
TOLERANCES = [(torch.float64, 1e-10), (torch.float32, 1e-5)]

# (d_model, rotary_targets): the seed width, and width 16 with 8 heads of dim 2 as grown models have.
CONFIGS = [(4, "qkv"), (4, "qk"), (16, "qkv"), (16, "qk")]


def make_config(d_model: int, rotary_targets: str) -> ModelConfig:
    config = ModelConfig(rotary_targets=rotary_targets, context_length=16)
    return config.widened(d_model) if d_model != config.d_model else config


def make_model(config: ModelConfig, dtype: torch.dtype, fast: bool) -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer(config, fast=fast).to(dtype).eval()


def run_path(model: TinyTransformer, idx: torch.Tensor, targets: torch.Tensor):
    """Return logits, loss and the parameter gradients of one forward and backward pass."""
    model.zero_grad(set_to_none=True)
    logits = model(idx)
    loss = model.loss(idx, targets)
    loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


@pytest.mark.parametrize("dtype, atol", TOLERANCES)
@pytest.mark.parametrize("d_model, rotary_targets", CONFIGS)
@pytest.mark.parametrize("length", [5, 16, 23])  # shorter than, equal to and longer than the context
def test_fast_matches_reference(dtype, atol, d_model, rotary_targets, length):
    config = make_config(d_model, rotary_targets)
    fast = make_model(config, dtype, fast=True)
    reference = make_model(config, dtype, fast=False)
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, config.vocab_size, (3, length), generator=generator)
    targets = torch.randint(0, config.vocab_size, (3, length), generator=generator)

    fast_logits, fast_loss, fast_grads = run_path(fast, idx, targets)
    ref_logits, ref_loss, ref_grads = run_path(reference, idx, targets)

    assert fast_logits.shape == (3, min(length, config.context_length), config.vocab_size)
    torch.testing.assert_close(fast_logits, ref_logits, atol=atol, rtol=0)
    torch.testing.assert_close(fast_loss, ref_loss, atol=atol, rtol=0)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=atol, rtol=0, msg=f"gradient of {name}")


@pytest.fixture(params=["saved", "recomputed"])
def probs_kept(request, monkeypatch):
    """Run an attention test twice: probabilities kept for backward, and recomputed in backward."""
    if request.param == "recomputed":
        monkeypatch.setattr(attention, "SAVED_PROBS_BYTES", 0)
    return request.param


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 64])  # 7 leaves a short last chunk of 20 rows
def test_attention_chunks_uneven(chunk_rows, probs_kept):
    generator = torch.Generator().manual_seed(2)
    n, e, t = 20, 2, 9
    q_t, k_t, v_t = (torch.randn(n, e, t, dtype=torch.float64, generator=generator) for _ in range(3))
    for tensor in (q_t, k_t, v_t):
        tensor.requires_grad_(True)
    mask = torch.zeros(t, t, dtype=torch.float64).masked_fill(
        ~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")
    )
    grad_y_t = torch.randn(n, e, t, dtype=torch.float64, generator=generator)

    y_t = chunked_causal_attention(q_t, k_t, v_t, mask, 0.5, chunk_rows)
    chunked_grads = torch.autograd.grad(y_t, (q_t, k_t, v_t), grad_y_t)
    expected_t = F.scaled_dot_product_attention(
        q_t.mT, k_t.mT, v_t.mT, is_causal=True, scale=0.5
    ).mT
    expected_grads = torch.autograd.grad(expected_t, (q_t, k_t, v_t), grad_y_t)

    torch.testing.assert_close(y_t, expected_t, atol=1e-12, rtol=0)
    for name, chunked, expected in zip("qkv", chunked_grads, expected_grads):
        torch.testing.assert_close(chunked, expected, atol=1e-12, rtol=0, msg=f"gradient of {name}")


@pytest.mark.parametrize("chunk_rows", [1, 4, 100])  # 4 leaves a short last chunk of 11 rows
def test_loss_chunks_uneven(chunk_rows):
    generator = torch.Generator().manual_seed(3)
    n, d, v = 11, 3, 7
    x = torch.randn(n, d, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(v, d, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.tensor([0, 6, 6, 2, 3, 3, 3, 1, 0, 5, 6])  # repeated targets hit index_add

    loss = linear_cross_entropy(x, weight, bias, targets, chunk_rows)
    grads = torch.autograd.grad(2.5 * loss, (x, weight, bias))
    expected = F.cross_entropy(F.linear(x, weight, bias), targets)
    expected_grads = torch.autograd.grad(2.5 * expected, (x, weight, bias))

    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=0)
    for name, grad, expected_grad in zip(("x", "weight", "bias"), grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=0, msg=f"gradient of {name}")


def test_attention_gradcheck(probs_kept):
    generator = torch.Generator().manual_seed(4)
    n, e, t = 3, 2, 5
    inputs = [
        torch.randn(n, e, t, dtype=torch.float64, generator=generator, requires_grad=True)
        for _ in range(3)
    ]
    mask = torch.zeros(t, t, dtype=torch.float64).masked_fill(
        ~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")
    )

    def attention(q_t, k_t, v_t):
        return chunked_causal_attention(q_t, k_t, v_t, mask, 1 / math.sqrt(e), chunk_rows=2)

    assert torch.autograd.gradcheck(attention, inputs)


def test_loss_gradcheck():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(5, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(4, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.tensor([1, 0, 3, 3, 2])

    def loss(x, weight, bias):
        return linear_cross_entropy(x, weight, bias, targets, chunk_rows=2)

    assert torch.autograd.gradcheck(loss, (x, weight, bias))


def test_loss_without_grad_skips_gradients():
    x = torch.randn(6, 4)
    weight = torch.randn(9, 4)
    bias = torch.randn(9)
    targets = torch.randint(0, 9, (6,))

    with torch.no_grad():
        loss = linear_cross_entropy(x, weight, bias, targets, chunk_rows=4)

    expected = F.cross_entropy(F.linear(x, weight, bias), targets)
    torch.testing.assert_close(loss, expected)
    assert loss.grad_fn is None


@pytest.mark.parametrize("d_model", [4, 16])
def test_adamw_curves_match(d_model):
    config = make_config(d_model, "qkv")
    generator = torch.Generator().manual_seed(6)
    batches = [
        torch.randint(0, config.vocab_size, (4, config.context_length + 1), generator=generator)
        for _ in range(5)
    ]
    curves = {}
    for fast in (True, False):
        torch.manual_seed(0)
        model = TinyTransformer(config, fast=fast)  # training mode, so dropout is on
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        curve = []
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = model.loss(batch[:, :-1], batch[:, 1:])
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
        curves[fast] = curve

    assert curves[True] == pytest.approx(curves[False], abs=1e-5)


def test_loss_underflowed_target_probability():
    # The target logit is 300 below the others, so its float32 softmax probability rounds to 0.
    x = torch.tensor([[1.0], [1.0]])
    weight = torch.tensor([[-150.0], [150.0], [0.0]])
    bias = torch.zeros(3)
    targets = torch.tensor([0, 1])

    loss = linear_cross_entropy(x, weight, bias, targets, chunk_rows=1)

    expected = F.cross_entropy(F.linear(x, weight, bias), targets)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected)


def test_normalize_gradcheck():
    generator = torch.Generator().manual_seed(7)
    x_t = torch.randn(4, 6, dtype=torch.float64, generator=generator, requires_grad=True)  # (d, n)

    assert torch.autograd.gradcheck(lambda x_t: normalize(x_t, 1e-5), (x_t,))


@pytest.mark.parametrize("d_model", [4, 16, 64])
def test_layer_norm_linear_matches_modules(d_model):
    torch.manual_seed(8)
    norm = torch.nn.LayerNorm(d_model).double()
    linear = torch.nn.Linear(d_model, 3 * d_model).double()
    with torch.no_grad():  # a non-trivial affine, so folding it into the linear layer is tested
        norm.weight.normal_()
        norm.bias.normal_()
    x_t = torch.randn(d_model, 10, dtype=torch.float64, requires_grad=True)  # channel-first (d, n)
    grad_y_t = torch.randn(3 * d_model, 10, dtype=torch.float64)
    inputs = (x_t, norm.weight, norm.bias, linear.weight, linear.bias)

    folded_t = layer_norm_linear(x_t, norm, linear)
    folded_grads = torch.autograd.grad(folded_t, inputs, grad_y_t)
    expected_t = linear(norm(x_t.t())).t()
    expected_grads = torch.autograd.grad(expected_t, inputs, grad_y_t)

    torch.testing.assert_close(folded_t, expected_t, atol=1e-12, rtol=0)
    names = ("x", "norm.weight", "norm.bias", "linear.weight", "linear.bias")
    for name, grad, expected_grad in zip(names, folded_grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=0, msg=f"gradient of {name}")


def test_probs_buffer_reused_between_steps():
    config = make_config(4, "qkv")
    model = TinyTransformer(config)
    batch = torch.randint(0, config.vocab_size, (3, config.context_length + 1))
    workspace = model.blocks[0].attn._probs_workspace

    model.loss(batch[:, :-1], batch[:, 1:]).backward()
    first = workspace[0].data_ptr()
    model.loss(batch[:, :-1], batch[:, 1:]).backward()

    assert len(workspace) == 1
    assert workspace[0].data_ptr() == first


def test_two_forwards_before_backward():
    config = make_config(4, "qkv")
    generator = torch.Generator().manual_seed(9)
    first, second = (
        torch.randint(0, config.vocab_size, (3, config.context_length + 1), generator=generator)
        for _ in range(2)
    )
    model = make_model(config, torch.float64, fast=True)
    model.loss(first[:, :-1], first[:, 1:]).backward()  # leaves a buffer in each workspace
    model.zero_grad(set_to_none=True)
    reference = make_model(config, torch.float64, fast=False)

    for path in (model, reference):
        loss = path.loss(first[:, :-1], first[:, 1:]) + path.loss(second[:, :-1], second[:, 1:])
        loss.backward()

    for (name, param), ref_param in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, ref_param.grad, atol=1e-10, rtol=0, msg=f"gradient of {name}")


@pytest.mark.parametrize("head_dim", [2, 4])
def test_channel_first_rotation_matches_bitwise(head_dim):
    generator = torch.Generator().manual_seed(10)
    cos, sin = (table.float() for table in rotary_tables(head_dim, 16, 10_000.0))  # (t, e)
    x = torch.randn(3, 5, 16, head_dim, generator=generator, requires_grad=True)  # (..., t, e)
    x_t = x.detach().mT.contiguous().requires_grad_(True)  # (..., e, t)
    grad = torch.randn(3, 5, 16, head_dim, generator=generator)

    expected = apply_rotary(x, cos, sin)
    expected.backward(grad)
    rotated_t = rotate_channel_first(x_t, cos.mT.contiguous(), sin.mT.contiguous())
    rotated_t.backward(grad.mT)

    assert torch.equal(rotated_t, expected.mT)
    assert torch.equal(x_t.grad, x.grad.mT)
