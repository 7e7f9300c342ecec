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


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Rotate the channel pairs of x along axis `dim` by the angles in cos and sin.

    With the default dim=-1, x is (..., t, head_dim) and the tables are (t, head_dim). With dim=-2,
    for channel-first x (..., head_dim, t), the tables are their transposes (head_dim, t).
    """
    first, second = x.chunk(2, dim=dim)
    rotated_half = torch.cat([-second, first], dim=dim)
    return x * cos + rotated_half * sin
