"""TinyTransformer: a byte-level, pre-LayerNorm decoder with rotary embeddings on q, k and v.

Shapes in comments: b batch, t time (positions), d d_model, h heads, e head_dim, v vocab_size.

The fast path (the default) keeps activations channel-first, as (d, b t) with one column per token:
at small d_model the CPU matrix products of the linear layers run several times faster that way
than on (b t, d) rows. The reference path (`set_fast(False)`) is the plain row-major version.
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
from models.layernorm import layer_norm_linear, linear_channel_first
from models.losses import linear_cross_entropy
from models.rotary import apply_rotary, rotary_tables, rotate_channel_first


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary embeddings on the configured projections.

    Two implementations compute the same function. `fast=True` runs `chunked_causal_attention`, which
    never materializes the scores of the whole batch at once, because the fused CPU kernel of
    `scaled_dot_product_attention` is tuned for head dims of 64 and more and is slow at head_dim 2.
    `fast=False` calls `scaled_dot_product_attention`, the reference to check the fast path against.
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
        # Probability buffers that backward has finished with, reused by the next training forward
        # so that each step does not map and fault in fresh pages for them.
        self._probs_workspace: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the attention output (b, t, d) for x (b, t, d), the normalized block input."""
        if self.fast:
            b = x.shape[0]
            qkv_t = linear_channel_first(self.qkv, rearrange(x, "b t d -> d (b t)"))  # (3 d, b t)
            y_t = linear_channel_first(self.proj, self._chunked_attention(qkv_t, b))  # (d, b t)
            return rearrange(y_t, "d (b t) -> b t d", b=b)
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

    def _chunked_attention(self, qkv_t: torch.Tensor, b: int) -> torch.Tensor:
        """Return the attention output (d, b t) before the output projection, on the fast path.

        qkv_t (3 d, b t) is the channel-first output of the qkv projection for a batch of b sequences.
        """
        t = qkv_t.shape[1] // b
        # One copy into the per-head layout that chunked_causal_attention multiplies fastest.
        qkv_t = rearrange(qkv_t, "(three h e) (b t) -> three (b h) e t", three=3, h=self.n_heads, b=b)
        cos_t, sin_t, mask = self._tables(qkv_t.dtype, qkv_t.device)
        cos_t, sin_t = cos_t[:, :t], sin_t[:, :t]
        # unbind, unlike slicing, has a backward that stacks the gradients without zero-filling.
        if self.n_rotated == 3:
            q_t, k_t, v_t = rotate_channel_first(qkv_t, cos_t, sin_t).unbind(0)  # each ((b h), e, t)
        else:
            q_t, k_t, v_t = qkv_t.unbind(0)
            q_t, k_t = rotate_channel_first(q_t, cos_t, sin_t), rotate_channel_first(k_t, cos_t, sin_t)
        y_t = chunked_causal_attention(
            q_t, k_t, v_t, mask[:t, :t], 1.0 / math.sqrt(self.head_dim), workspace=self._probs_workspace
        )
        return rearrange(y_t, "(b h) e t -> (h e) (b t)", b=b)

    def _tables(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Return cos and sin transposed to (e, context) and the mask (context, context) in dtype.

        Each (dtype, device) is cast once and cached.
        """
        key = (dtype, device)
        if key not in self._fast_tables:
            self._fast_tables[key] = tuple(
                buffer.to(device=device, dtype=dtype).contiguous()
                for buffer in (self.cos.t(), self.sin.t(), self.mask)
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
        """Return the block output (b, t, d) for x (b, t, d)."""
        if self.attn.fast:
            b = x.shape[0]
            x_t = self.forward_channel_first(rearrange(x, "b t d -> d (b t)"), b)
            return rearrange(x_t, "d (b t) -> b t d", b=b)
        x = x + self.dropout(self.attn(self.attn_norm(x)))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))

    def forward_channel_first(self, x_t: torch.Tensor, b: int) -> torch.Tensor:
        """Return the block output (d, b t) for channel-first input x_t (d, b t) of b sequences.

        This is the fast path's forward: each LayerNorm is folded into the linear layer after it.
        """
        qkv_t = layer_norm_linear(x_t, self.attn_norm, self.attn.qkv)  # (3 d, b t)
        attended_t = linear_channel_first(self.attn.proj, self.attn._chunked_attention(qkv_t, b))
        x_t = x_t + self.dropout.forward_channel_first(attended_t)
        hidden_t = F.relu(layer_norm_linear(x_t, self.ffn_norm, self.ffn.up))  # (d_ff, b t)
        return x_t + self.dropout.forward_channel_first(linear_channel_first(self.ffn.down, hidden_t))


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
        """Choose the fast path (channel-first activations, chunked attention, fused loss) or not.

        The reference path (fast=False) is the plain row-major model, for checking the fast one.
        """
        self._fast = bool(fast)
        for block in self.blocks:
            block.attn.fast = self._fast
        return self

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Return the final hidden states (b, t, d) for the last context_length tokens of idx (b, t).

        On the fast path the result is a view of channel-first (d, b t) activations.
        """
        idx = idx[:, -self.config.context_length :]
        if not self._fast:
            x = self.token_embedding(idx)
            for block in self.blocks:
                x = block(x)
            return x

        b = idx.shape[0]
        # A column gather from the (d, v) transposed table: its backward is a column index_add, about
        # 8x faster than the embedding backward at d_model 4 (torch 2.13, 1 thread).
        x_t = self.token_embedding.weight.t().index_select(1, idx.reshape(-1))  # (d, b t)
        for block in self.blocks:
            x_t = block.forward_channel_first(x_t, b)
        return rearrange(x_t.t(), "(b t) d -> b t d", b=b)  # a view, no copy

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
