"""TinyTransformer: sizes, causality, rotary embeddings, dropout, truncation and sampling."""

from __future__ import annotations

import pytest
import torch

from models.config import ModelConfig
from models.generate import generate
from models.model import CausalSelfAttention, TinyTransformer, set_dropout
from models.rotary import apply_rotary, rotary_tables

PATHS = pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])


def random_bytes(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def make_model(config: ModelConfig | None = None, fast: bool = True, seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(config or ModelConfig(), fast=fast).eval()


# --- sizes ---------------------------------------------------------------------------------------


def test_parameter_count_seed():
    assert make_model().num_parameters() == 2648


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_count_breakdown():
    model = make_model()
    assert parameter_count(model.token_embedding) == 256 * 4
    for block in model.blocks:
        # LayerNorms 2 * (4 + 4), qkv 4 * 12 + 12, proj 4 * 4 + 4, ffn up 4 * 8 + 8, down 8 * 4 + 4.
        assert parameter_count(block) == 172
    assert parameter_count(model.lm_head) == 4 * 256 + 256
    assert len(model.blocks) == 2


def test_logits_shape():
    logits = make_model()(random_bytes(3, 10))
    assert logits.shape == (3, 10, 256)


def test_loss_is_scalar_nats():
    model = make_model()
    with torch.no_grad():
        loss = model.loss(random_bytes(2, 16), random_bytes(2, 16, seed=1))
    assert loss.shape == ()
    assert 4.0 < loss.item() < 8.0  # near ln(256) = 5.55 at initialization


# --- causality and the two paths -----------------------------------------------------------------


@PATHS
def test_causality_future_byte(fast):
    model = make_model(fast=fast)
    idx = random_bytes(1, 32)
    changed = idx.clone()
    changed[0, 20] = (changed[0, 20] + 1) % 256

    before, after = model(idx), model(changed)
    assert torch.equal(before[:, :20], after[:, :20])
    assert not torch.allclose(before[:, 20:], after[:, 20:])


def test_fast_matches_reference_logits():
    model = make_model()
    idx = random_bytes(4, 64)
    fast = model(idx)
    reference = model.set_fast(False)(idx)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)


def test_fast_matches_reference_loss():
    model = make_model()
    idx, targets = random_bytes(4, 64), random_bytes(4, 64, seed=1)
    fast = model.loss(idx, targets)
    reference = model.set_fast(False).loss(idx, targets)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)


def test_fast_matches_reference_gradients():
    idx, targets = random_bytes(4, 64), random_bytes(4, 64, seed=1)
    gradients = {}
    for fast in (True, False):
        model = make_model(fast=fast).train()
        set_dropout(model, 0.0)
        model.loss(idx, targets).backward()
        gradients[fast] = {name: p.grad for name, p in model.named_parameters()}
    for name, grad in gradients[True].items():
        torch.testing.assert_close(grad, gradients[False][name], rtol=1e-4, atol=1e-6, msg=name)


# --- rotary embeddings ---------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 1, 5, 17])
def test_rotary_dot_depends_on_offset(offset):
    head_dim = 8
    cos, sin = rotary_tables(head_dim, 64, 10000.0)
    q, k = torch.randn(2, head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def rotated_dot(i: int, j: int) -> torch.Tensor:
        q_i = apply_rotary(q, cos[i], sin[i])
        k_j = apply_rotary(k, cos[j], sin[j])
        return q_i @ k_j

    reference = rotated_dot(offset, 0)
    for shift in (1, 10, 40):
        torch.testing.assert_close(rotated_dot(offset + shift, shift), reference)


def test_rotary_position_zero_identity():
    cos, sin = rotary_tables(4, 8, 10000.0)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert torch.equal(apply_rotary(x, cos[0], sin[0]), x)


def test_rotary_preserves_norm():
    cos, sin = rotary_tables(4, 8, 10000.0)
    x = torch.randn(8, 4, dtype=torch.float64)
    torch.testing.assert_close(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def uniform_attention(rotary_targets: str, fast: bool) -> CausalSelfAttention:
    """Attention whose q and k are zero, so every position attends uniformly to its prefix."""
    config = ModelConfig(rotary_targets=rotary_targets)
    attention = CausalSelfAttention(config)
    attention.fast = fast
    d = config.d_model
    with torch.no_grad():
        attention.qkv.weight.zero_()
        attention.qkv.bias.zero_()
        attention.qkv.weight[2 * d :] = torch.eye(d)  # v = x
        attention.proj.weight.copy_(torch.eye(d))  # output = attention result
        attention.proj.bias.zero_()
    return attention


@PATHS
def test_rotary_rotates_values(fast):
    # With uniform attention and the same v at every position, output t is the mean of v rotated
    # by positions 0..t. Without value rotation every output would equal v.
    attention = uniform_attention("qkv", fast)
    t, e = 6, 2
    x = torch.tensor([1.0, 0.5, -0.25, 2.0]).expand(1, t, 4)
    cos, sin = rotary_tables(e, t, 10000.0)

    v = x[0, 0].reshape(2, e)  # (h, e)
    rotated = apply_rotary(v.double().unsqueeze(1), cos, sin)  # (h, t, e): v at each position
    prefix_mean = rotated.cumsum(1) / torch.arange(1, t + 1, dtype=torch.float64).reshape(1, t, 1)
    expected = prefix_mean.transpose(0, 1).reshape(1, t, 4).float()  # (b, t, h e)

    with torch.no_grad():
        torch.testing.assert_close(attention(x), expected)


@PATHS
def test_rotary_qk_keeps_values(fast):
    attention = uniform_attention("qk", fast)
    x = torch.tensor([1.0, 0.5, -0.25, 2.0]).expand(1, 6, 4)
    with torch.no_grad():
        torch.testing.assert_close(attention(x), x)


def test_rotary_targets_change_outputs():
    qkv = make_model(ModelConfig(rotary_targets="qkv"))
    qk = make_model(ModelConfig(rotary_targets="qk"))
    qk.load_state_dict(qkv.state_dict())
    idx = random_bytes(1, 16)
    assert not torch.allclose(qkv(idx), qk(idx))


# --- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "d_model, rate", [(4, 0.0078125), (8, 0.015625), (16, 0.03125), (64, 0.1), (256, 0.1)]
)
def test_dropout_rate_by_width(d_model, rate):
    assert ModelConfig(d_model=d_model, n_heads=d_model // 2, d_ff=2 * d_model).dropout == rate


def test_dropout_rate_in_model():
    rates = {m.p for m in make_model().modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.0078125}


def test_head_dim_seed():
    assert ModelConfig().head_dim == 2


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(d_model=6, n_heads=4), "d_model"),
        (dict(d_model=6, n_heads=2), "head_dim"),
        (dict(d_model=0), "d_model"),
        (dict(n_layers=0), "n_layers"),
        (dict(n_heads=-2), "n_heads"),
        (dict(d_ff=0), "d_ff"),
        (dict(context_length=0), "context_length"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(rotary_base=0.0), "rotary_base"),
        (dict(rotary_targets="kv"), "rotary_targets"),
        (dict(d_model=4.0), "d_model"),
    ],
)
def test_config_invalid_names_field(overrides, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        ModelConfig(**overrides)


def test_config_json_round_trip():
    config = ModelConfig(d_model=8, n_heads=4, d_ff=16, rotary_targets="qk")
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_config_unknown_field():
    with pytest.raises(ValueError, match="width"):
        ModelConfig.from_dict({**ModelConfig().to_dict(), "width": 4})


def test_config_widened_keeps_head_dim():
    widened = ModelConfig().widened(12)
    assert (widened.d_model, widened.n_heads, widened.d_ff, widened.head_dim) == (12, 6, 24, 2)


# --- modes and dropout ---------------------------------------------------------------------------


@PATHS
def test_eval_deterministic(fast):
    model = make_model(fast=fast)
    set_dropout(model, 0.5)
    idx = random_bytes(2, 32)
    assert torch.equal(model(idx), model(idx))


@PATHS
def test_eval_loss_deterministic(fast):
    model = make_model(fast=fast)
    set_dropout(model, 0.5)
    idx, targets = random_bytes(2, 32), random_bytes(2, 32, seed=1)
    assert torch.equal(model.loss(idx, targets), model.loss(idx, targets))


@PATHS
def test_train_dropout_varies(fast):
    model = make_model(fast=fast).train()
    set_dropout(model, 0.5)
    idx = random_bytes(2, 32)
    assert not torch.equal(model(idx), model(idx))


def test_set_dropout_zero_train_deterministic():
    model = make_model().train()
    set_dropout(model, 0.0)
    idx = random_bytes(2, 32)
    assert torch.equal(model(idx), model(idx))


# --- context window ------------------------------------------------------------------------------


@PATHS
def test_truncation_keeps_last_context(fast):
    model = make_model(fast=fast)
    idx = random_bytes(2, 100)
    logits = model(idx)
    assert logits.shape == (2, 64, 256)
    assert torch.equal(logits, model(idx[:, -64:]))


def test_truncation_loss_uses_last_targets():
    model = make_model()
    idx, targets = random_bytes(2, 100), random_bytes(2, 100, seed=1)
    assert torch.equal(model.loss(idx, targets), model.loss(idx[:, -64:], targets[:, -64:]))


# --- sampling ------------------------------------------------------------------------------------


def test_generate_length():
    assert len(generate(make_model(), b"abc", 10)) == 10


def test_generate_zero_tokens():
    assert generate(make_model(), b"abc", 0) == b""


def test_generate_seeded_repeats():
    model = make_model()
    first = generate(model, b"x", 30, generator=torch.Generator().manual_seed(1))
    second = generate(model, b"x", 30, generator=torch.Generator().manual_seed(1))
    assert first == second


def test_generate_seeds_differ():
    model = make_model()
    first = generate(model, b"x", 30, generator=torch.Generator().manual_seed(1))
    second = generate(model, b"x", 30, generator=torch.Generator().manual_seed(2))
    assert first != second


def test_generate_greedy_is_argmax():
    model = make_model()
    sample = generate(model, b"hello", 3, temperature=0.0)
    context = list(b"hello")
    for byte in sample:
        assert byte == int(model(torch.tensor([context]))[0, -1].argmax())
        context.append(byte)


def test_generate_top_k_one_is_greedy():
    model = make_model()
    greedy = generate(model, b"hello", 20, temperature=0.0)
    sampled = generate(model, b"hello", 20, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert sampled == greedy


def test_generate_empty_prompt_starts_newline():
    model = make_model()
    assert generate(model, b"", 5, temperature=0.0) == generate(model, b"\n", 5, temperature=0.0)


def test_generate_past_context_window():
    model = make_model()
    assert len(generate(model, bytes(range(100)), 80, temperature=0.0)) == 80


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=257), "top_k"),
    ],
)
def test_generate_invalid_arguments(arguments, message):
    values = dict(max_new_tokens=5, temperature=1.0, top_k=None) | arguments
    with pytest.raises(ValueError, match=message):
        generate(make_model(), b"a", **values)


def test_generate_restores_train_mode():
    model = make_model().train()
    generate(model, b"a", 2)
    assert model.training

