"""TinyTransformer: a byte-level, pre-LayerNorm decoder with rotary embeddings on q, k and v.

Shapes in comments: b batch, t time (positions), d d_model, h heads, e head_dim, v vocab_size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.attention import chunked_causal_attention
from models.config import ModelConfig
from models.dropout import Dropout
from models.layernorm import layer_norm_linear
from models.losses import linear_cross_entropy
from models.rotary import apply_rotary, rotary_tables


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary embeddings on the configured projections.

    Two implementations compute the same function. `fast=True` runs `chunked_causal_attention`, which
    never stores the (b h, t, t) scores, because the fused CPU kernel of `scaled_dot_product_attention`
    is tuned for head dims of 64 and more and is slow at head_dim 2. `fast=False` calls
    `scaled_dot_product_attention`, the reference to check the fast path against.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.n_rotated = len(config.rotary_targets)  # q, k (and v) come first in the qkv layout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)  # rows: (three h e)
        self.proj = nn.Linear(config.d_model, config.d_model)

        cos, sin = rotary_tables(config.head_dim, config.context_length, config.rotary_base)
        self.register_buffer("cos", cos, persistent=False)  # (t, e), float64, cast per call
        self.register_buffer("sin", sin, persistent=False)
        causal = torch.ones(config.context_length, config.context_length, dtype=torch.bool).tril()
        mask = torch.zeros(causal.shape, dtype=torch.float64).masked_fill(~causal, float("-inf"))
        self.register_buffer("mask", mask, persistent=False)  # (t, t), 0 or -inf
        self.fast = True
        # (dtype, device) -> cos, sin and mask cast from the float64 buffers, so the fast path does
        # not cast them on every call.
        self._fast_tables: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, ...]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast:
            return self.proj(self._chunked_attention(self.qkv(x)))
        b, t, _ = x.shape
        qkv = rearrange(self.qkv(x), "b t (three h e) -> three b h t e", three=3, h=self.n_heads)
        cos = self.cos[:t].to(x.dtype)
        sin = self.sin[:t].to(x.dtype)
        rotated = apply_rotary(qkv[: self.n_rotated], cos, sin)
        if self.n_rotated < 3:
            rotated = torch.cat([rotated, qkv[self.n_rotated :]], dim=0)
        q, k, v = rotated.unbind(0)  # each (b, h, t, e)

        # dropout_p is pinned to 0: the fused call applies it whatever the module's mode, and
        # this architecture has no attention-probability dropout.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.0)
        y = rearrange(y, "b h t e -> b t (h e)")
        return self.proj(y)

    def _chunked_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """Return the attention output (b, t, d) before the output projection, on the fast path.

        qkv (b, t, 3 d) is the output of the qkv projection.
        """
        b, t, _ = qkv.shape
        # One copy into the channel-first layout that chunked_causal_attention multiplies fastest.
        qkv_t = rearrange(qkv, "b t (three h e) -> three (b h) e t", three=3, h=self.n_heads)
        cos, sin, mask = self._tables(qkv.dtype, qkv.device)
        # apply_rotary rotates along the last axis, so it gets the (t, e) transpose of each head.
        rotated = apply_rotary(qkv_t[: self.n_rotated].transpose(-1, -2), cos[:t], sin[:t])
        q_t, k_t = rotated.transpose(-1, -2)[:2]  # each ((b h), e, t)
        v_t = rotated.transpose(-1, -2)[2] if self.n_rotated == 3 else qkv_t[2]
        y_t = chunked_causal_attention(q_t, k_t, v_t, mask[:t, :t], 1.0 / math.sqrt(self.head_dim))
        return rearrange(y_t, "(b h) e t -> b t (h e)", b=b)

    def _tables(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Return cos, sin (context, e) and the mask (context, context) in dtype, cast once per dtype."""
        key = (dtype, device)
        if key not in self._fast_tables:
            self._fast_tables[key] = tuple(
                buffer.to(device=device, dtype=dtype) for buffer in (self.cos, self.sin, self.mask)
            )
        return self._fast_tables[key]


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.d_model, config.d_ff)
        self.down = nn.Linear(config.d_ff, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)))


class Block(nn.Module):
    """Pre-LayerNorm block: x + dropout(attn(ln(x))), then x + dropout(ffn(ln(x)))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ffn_norm = nn.LayerNorm(config.d_model)
        self.ffn = FeedForward(config)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn.fast:
            return self._fast_forward(x)
        x = x + self.dropout(self.attn(self.attn_norm(x)))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))

    def _fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute forward with each LayerNorm folded into the linear layer that follows it."""
        qkv = layer_norm_linear(x, self.attn_norm, self.attn.qkv)  # (b, t, 3 d)
        x = x + self.dropout(self.attn.proj(self.attn._chunked_attention(qkv)))
        hidden = F.relu(layer_norm_linear(x, self.ffn_norm, self.ffn.up))  # (b, t, d_ff)
        return x + self.dropout(self.ffn.down(hidden))


class TinyTransformer(nn.Module):
    """Token embedding → n_layers pre-norm blocks → linear output projection to byte logits.

    There is no positional embedding table: positions enter only through the rotary embeddings.
    An input longer than the context window keeps its last `context_length` tokens.
    """

    def __init__(self, config: ModelConfig, fast: bool = True) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.lm_head = nn.Linear(config.d_model, config.vocab_size)
        self.set_fast(fast)

    @property
    def fast(self) -> bool:
        return self._fast

    def set_fast(self, fast: bool) -> "TinyTransformer":
        """Choose the fast path (batched attention products, fused loss) or the reference path."""
        self._fast = bool(fast)
        for block in self.blocks:
            block.attn.fast = self._fast
        return self

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Return the final hidden states (b, t, d) for the last context_length tokens of idx (b, t)."""
        idx = idx[:, -self.config.context_length :]
        x = self.token_embedding(idx)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Return logits (b, min(t, context_length), v) for byte ids idx (b, t)."""
        return self.lm_head(self.hidden_states(idx))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-byte cross-entropy in nats, over the positions that fit in the context window."""
        targets = targets[:, -self.config.context_length :]
        x = self.hidden_states(idx)
        if self._fast:
            return linear_cross_entropy(
                x.reshape(-1, x.shape[-1]), self.lm_head.weight, self.lm_head.bias, targets.reshape(-1)
            )
        logits = self.lm_head(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def set_dropout(model: nn.Module, rate: float) -> None:
    """Override the dropout rate of every dropout layer (for experiments that need dropout off)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = rate
