"""Dropout by geometric gaps: the same distribution as nn.Dropout, checked statistically on fixed seeds."""

from __future__ import annotations

import math

import pytest
import torch

from models.dropout import GAP_SAMPLING_MAX_RATE, Dropout, dropped_positions, geometric_gaps

TRIALS = 4000


def drop_frequencies(numel: int, rate: float) -> torch.Tensor:
    """Return (TRIALS, numel) 0/1 drop indicators from dropped_positions, seeded."""
    torch.manual_seed(0)
    drops = torch.zeros(TRIALS, numel)
    for trial in range(TRIALS):
        drops[trial, dropped_positions(numel, rate)] = 1.0
    return drops


@pytest.mark.parametrize("rate", [0.0078, 0.1])
def test_drop_rate_per_position(rate):
    drops = drop_frequencies(200, rate)
    # Each position's frequency is a mean of TRIALS Bernoulli draws, so it lies within 5 standard
    # deviations of rate unless the sampler is biased.
    tolerance = 5 * math.sqrt(rate * (1 - rate) / TRIALS)

    assert drops.mean(0).sub(rate).abs().max() < tolerance


def test_drops_independent_of_neighbours():
    rate = 0.1
    drops = drop_frequencies(200, rate)
    both = (drops[:, 1:] * drops[:, :-1]).mean()  # adjacent pairs dropped together, ideally rate ** 2
    tolerance = 5 * math.sqrt(rate**2 / (TRIALS * 199))

    assert abs(both.item() - rate**2) < tolerance


def test_drop_count_variance_is_binomial():
    rate, numel = 0.05, 400
    counts = drop_frequencies(numel, rate).sum(1)
    expected = numel * rate * (1 - rate)

    assert counts.var().item() == pytest.approx(expected, rel=0.1)


def test_positions_sorted_unique_in_range():
    torch.manual_seed(1)
    positions = dropped_positions(10_000, 0.2)

    assert positions.dtype == torch.int64
    assert bool((positions[1:] > positions[:-1]).all())
    assert int(positions.min()) >= 0
    assert int(positions.max()) < 10_000


def test_positions_of_empty_tensor():
    assert dropped_positions(0, 0.1).numel() == 0


def test_dropout_scales_kept_and_zeroes_dropped():
    torch.manual_seed(2)
    layer = Dropout(0.05)
    x = torch.randn(64, 32, requires_grad=True)

    y = layer(x)
    y.backward(torch.ones_like(y))

    is_kept = y != 0
    torch.testing.assert_close(y[is_kept], x[is_kept] / 0.95)
    torch.testing.assert_close(x.grad[is_kept], torch.full_like(x.grad[is_kept], 1 / 0.95))
    assert bool((x.grad[~is_kept] == 0).all())
    assert 0 < (~is_kept).sum().item() < x.numel()


def test_dropout_eval_and_zero_rate_are_identity():
    x = torch.randn(8, 4)

    assert Dropout(0.0)(x) is x
    assert Dropout(0.05).eval()(x) is x


def test_dropout_high_rate_uses_dense_mask():
    rate = max(GAP_SAMPLING_MAX_RATE, 0.5)
    x = torch.ones(1000, 10)
    torch.manual_seed(3)
    expected = torch.nn.Dropout(rate)(x)
    torch.manual_seed(3)

    assert torch.equal(Dropout(rate)(x), expected)


@pytest.mark.parametrize("rate", [0.05, 0.5])  # gap sampling and the dense mask
def test_channel_first_drops_same_elements(rate):
    layer = Dropout(rate)
    x = torch.randn(300, 4)  # (tokens, d)
    x_t = x.t().contiguous()  # (d, tokens), the fast path's layout
    torch.manual_seed(4)
    expected = layer(x)
    torch.manual_seed(4)

    assert torch.equal(layer.forward_channel_first(x_t), expected.t())


def test_channel_first_gradient_zeroes_dropped():
    torch.manual_seed(5)
    x_t = torch.randn(4, 300, requires_grad=True)

    y_t = Dropout(0.05).forward_channel_first(x_t)
    y_t.backward(torch.ones_like(y_t))

    assert torch.equal(x_t.grad == 0, y_t == 0)


def test_geometric_gaps_tail():
    rate = 0.2
    torch.manual_seed(6)
    gaps = geometric_gaps(200_000, rate)

    assert gaps.min().item() == 1.0
    assert bool((gaps == gaps.floor()).all())
    for k in (1, 3, 10):  # P(gap > k) = (1 - rate) ** k
        assert (gaps > k).double().mean().item() == pytest.approx((1 - rate) ** k, abs=0.005)
