"""Training FLOPs counted from the config: 6 per matmul weight per token, the form of Kaplan et al.
2020 (arXiv 2001.08361), plus the attention products.

Forward FLOPs per token are 2 per weight of every matrix product: Q/K/V, attention output, both
feed-forward layers and the output projection, but not the embedding lookup, biases or norms. Each
layer adds 2·t·d for the attention scores q·k and 2·t·d for the weighted sum of values. Here t is
the sequence length, and masked positions are counted too. The backward pass costs twice the forward,
so a training token costs 6·N_matmul + 12·n_layers·t·d.
"""

from __future__ import annotations

from models.config import ModelConfig


def matmul_parameters(config: ModelConfig) -> int:
    """Number of weights that enter matrix products for every token."""
    d, f = config.d_model, config.d_ff
    per_layer = 3 * d * d + d * d + 2 * d * f  # qkv, attention output, ffn up and down
    return config.n_layers * per_layer + d * config.vocab_size


def training_flops_per_token(config: ModelConfig, seq_len: int | None = None) -> int:
    """Forward plus backward FLOPs for one token in a sequence of `seq_len` (default: the context)."""
    t = config.context_length if seq_len is None else min(seq_len, config.context_length)
    attention = 2 * t * config.d_model + 2 * t * config.d_model  # scores, then weighted values
    return 6 * matmul_parameters(config) + 3 * config.n_layers * attention

