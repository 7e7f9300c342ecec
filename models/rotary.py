"""Rotary position embeddings (Su et al. 2021, arXiv 2104.09864), half-split pairing.

Channel i of a head is paired with channel i + head_dim/2 and the pair is rotated by the angle
position * rotary_base ** (-2i / head_dim). A rotation by the query's position and one by the key's
position leave q·k depending only on their offset.
"""

from __future__ import annotations

import torch


def rotary_tables(head_dim: int, length: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return float64 cos and sin tables of shape (length, head_dim) for positions 0..length-1."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (head_dim/2,)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)  # (length, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (length, head_dim): one angle per pair, twice
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs of x (..., t, head_dim) by the angles in cos and sin (t, head_dim)."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)
    return x * cos + rotated_half * sin


class _RotateChannelFirst(torch.autograd.Function):
    """Rotation of channel-first pairs, with the products and sums apply_rotary uses.

    The results match apply_rotary bit for bit: (-s) * sin equals -(s * sin), and a + (-b) equals
    a - b, in IEEE arithmetic.
    """

    @staticmethod
    def forward(ctx, x_t, cos_t, sin_t):
        ctx.save_for_backward(cos_t, sin_t)
        return _rotate(x_t, cos_t, sin_t, inverse=False)

    @staticmethod
    def backward(ctx, grad_t):
        cos_t, sin_t = ctx.saved_tensors
        return _rotate(grad_t, cos_t, sin_t, inverse=True), None, None  # the transpose of a rotation


def _rotate(x_t: torch.Tensor, cos_t: torch.Tensor, sin_t: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Return x_t (..., head_dim, t) with each pair rotated by the table angles, or by their negatives."""
    half = x_t.shape[-2] // 2
    first, second = x_t[..., :half, :], x_t[..., half:, :]
    cos_half, sin_half = cos_t[:half], sin_t[:half]  # both halves of the tables hold the same angles
    out = torch.empty_like(x_t, memory_format=torch.contiguous_format)
    out_first, out_second = out[..., :half, :], out[..., half:, :]
    if inverse:
        torch.mul(first, cos_half, out=out_first).add_(second * sin_half)  # f cos + s sin
        torch.mul(second, cos_half, out=out_second).sub_(first * sin_half)  # s cos - f sin
    else:
        torch.mul(first, cos_half, out=out_first).sub_(second * sin_half)  # f cos - s sin
        torch.mul(second, cos_half, out=out_second).add_(first * sin_half)  # s cos + f sin
    return out


def rotate_channel_first(x_t: torch.Tensor, cos_t: torch.Tensor, sin_t: torch.Tensor) -> torch.Tensor:
    """Return apply_rotary for channel-first x_t (..., head_dim, t) and transposed tables (head_dim, t).

    Equal to apply_rotary(x_t.mT, cos_t.mT, sin_t.mT).mT bit for bit. It skips apply_rotary's
    concatenation along head_dim, which at head_dim 2 joins one-channel slices and is slow.
    """
    return _RotateChannelFirst.apply(x_t, cos_t, sin_t)
