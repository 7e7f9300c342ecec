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
