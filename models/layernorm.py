"""LayerNorm followed by a linear layer, for the fast training path at small d_model.

torch's native LayerNorm kernels take about 0.4 ms forward and 0.7 ms backward on (16384, 4) rows
with 2 threads (torch 2.13, AMD EPYC), 20 to 40 times a plain elementwise op on the same tensor.
`layer_norm_linear` normalizes with whole-tensor ops instead and folds the LayerNorm's elementwise
affine into the linear layer:

    linear(ln(x)) = (xhat * gamma + beta) @ W^T + c = xhat @ (W * gamma)^T + (W @ beta + c)

so the affine costs a (out, d) product instead of two passes over the (n, d) activations. It equals
`linear(layer_norm(x))` up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


class _Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps):
        # x (n, d) contiguous. Row means come from a matmul with a (d, 1) column of 1/d, which at
        # d = 4 runs about 3x faster than x.mean(-1) (torch 2.13, 2 threads).
        average = x.new_full((x.shape[1], 1), 1.0 / x.shape[1])  # (d, 1)
        centered = x - x @ average  # (n, d)
        variance = (centered * centered) @ average  # (n, 1), biased as in nn.LayerNorm
        rstd = variance.add_(eps).rsqrt_()  # (n, 1)
        normalized = centered.mul_(rstd)  # (n, d)
        ctx.save_for_backward(normalized, rstd, average)
        return normalized

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_normalized):
        # d xhat_i = rstd * (g_i - mean_j g_j - xhat_i * mean_j g_j xhat_j), g = grad_normalized.
        normalized, rstd, average = ctx.saved_tensors
        grad = grad_normalized.contiguous()  # (n, d)
        grad_x = grad - grad @ average
        grad_x.sub_(normalized * ((grad * normalized) @ average))
        return grad_x.mul_(rstd), None


def normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Return (x - mean) / sqrt(var + eps) over the last axis of x (..., d), with the biased variance."""
    shape = x.shape
    return _Normalize.apply(x.reshape(-1, shape[-1]).contiguous(), eps).view(shape)


def layer_norm_linear(x: torch.Tensor, norm: nn.LayerNorm, linear: nn.Linear) -> torch.Tensor:
    """Return linear(norm(x)) for x (..., d), with norm's affine folded into the linear weights.

    norm must be an nn.LayerNorm over the last axis with an elementwise affine, as in TinyTransformer.
    """
    weight = linear.weight * norm.weight  # (out, d): W * gamma scales column j by gamma_j
    bias = torch.addmv(linear.bias, linear.weight, norm.bias)  # (out,): W @ beta + c
    return F.linear(normalize(x, norm.eps), weight, bias)
