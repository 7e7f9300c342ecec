"""Function-preserving width growth of a TinyTransformer by an integer factor k.

The widened model computes the same function: for every input, its logits equal the source model's
logits up to floating-point rounding. The construction tiles every weight matrix into blocks, as in
HyperCloning (Samragh et al. 2024, "Scaling Smart: Accelerating Large Language Model Pre-Training with
Small Model Initialization", arXiv 2409.12903). Net2Net (Chen et al. 2016, arXiv 1511.05641) is the
earlier function-preserving widening that copies units and splits their outgoing weights.

Invariant. A hidden state h of width d becomes [h, h, ..., h] of width k*d (copy c in channels
c*d .. c*d + d - 1). Every layer maps k copies of its input to k copies of its output:

    token embedding (v, d) -> (v, k*d)      LayerNorm weight, bias (d,) -> (k*d,)
    +---+---+-----+---+                     [g, g, ..., g]   because LN([h, ..., h]) = [LN(h), ..., LN(h)]
    | E | E | ... | E |                     (same mean and variance over k*d channels as over d)
    +---+---+-----+---+

    linear map from the hidden state, W (o, i) -> (k*o, k*i), bias b (o,) -> [b, ..., b] (k*o,)
    +-----+-----+-----+      row of blocks r (output copy r) receives  sum_c (W/k) h = W h
    | W/k | W/k | W/k |      mirror mode adds N_{r,c} with sum_c N_{r,c} = 0 to each row of blocks:
    +-----+-----+-----+        k = 2:  [W/2 + N, W/2 - N]
    | W/k | W/k | W/k |        k > 2:  k - 1 random blocks, the last = -(their sum)
    +-----+-----+-----+      so every output copy still equals W h
    | W/k | W/k | W/k |
    +-----+-----+-----+
    Applies to Q, K and V (each d x d part of the fused qkv separately), the attention output
    projection, FFN up (d_ff grows to k*d_ff) and FFN down.

    output projection lm_head (v, d) -> (v, k*d): one row of blocks, bias unchanged
    +-----+-----+-----+-----+
    | W/k | W/k | ... | W/k |    (mirrored like any row of blocks)
    +-----+-----+-----+-----+

Attention. The fused qkv rows are laid out '(three h e)'. Tiling each of the q, k and v parts gives rows
'(three copy h e)', which is '(three h2 e)' with new head h2 = copy * n_heads + h: heads grow k-fold,
head_dim stays, and every new head is a copy of an old head. The rotary frequencies depend only on
head_dim, so they and the 1/sqrt(head_dim) scale are unchanged. Rotary on q, k and v then acts on each
copy as on the original, and the attention output is k copies of the original in '(h e)' layout.

Dropout is not a parameter: the grown config derives it from the new d_model.
"""

from __future__ import annotations

import logging
import math
import re
import torch
from einops import rearrange, repeat
from torch import Tensor

from models.model import TinyTransformer

log = logging.getLogger(__name__)

MODES = ("mirror", "tile")

# Standard deviation of each random mirror block, as a fraction of the RMS of one tiled block W/k.
# See `expand` for why 0.1.
DEFAULT_NOISE = 0.1

# state_dict name patterns -> (kind, number of stacked parts). Every parameter of TinyTransformer matches
# exactly one pattern. The kinds:
#   "tiled":     weight of a linear map from the hidden state, k x k grid of blocks W/k
#   "head":      lm_head weight, one row of k blocks W/k
#   "columns":   token embedding, columns repeated k times
#   "vector":    LayerNorm parameters and biases of tiled maps, repeated k times
#   "unchanged": lm_head bias (its output, the logits, does not grow)
_RULES: list[tuple[re.Pattern[str], str, int]] = [
    (re.compile(r"token_embedding\.weight"), "columns", 1),
    (re.compile(r"blocks\.\d+\.(attn_norm|ffn_norm)\.(weight|bias)"), "vector", 1),
    (re.compile(r"blocks\.\d+\.attn\.qkv\.weight"), "tiled", 3),
    (re.compile(r"blocks\.\d+\.attn\.qkv\.bias"), "vector", 3),
    (re.compile(r"blocks\.\d+\.(attn\.proj|ffn\.up|ffn\.down)\.weight"), "tiled", 1),
    (re.compile(r"blocks\.\d+\.(attn\.proj|ffn\.up|ffn\.down)\.bias"), "vector", 1),
    (re.compile(r"lm_head\.weight"), "head", 1),
    (re.compile(r"lm_head\.bias"), "unchanged", 1),
]


def _rule(name: str) -> tuple[str, int]:
    for pattern, kind, parts in _RULES:
        if pattern.fullmatch(name):
            return kind, parts
    raise ValueError(f"no growth rule for parameter {name!r}; expected a TinyTransformer state_dict name")


def is_tiled_matrix(name: str) -> bool:
    """Return whether parameter `name` grows into blocks divided by k (qkv, proj, up, down, lm_head weights).

    False for the token embedding, LayerNorm parameters and biases, which are grown by exact copies.
    """
    return _rule(name)[0] in ("tiled", "head")


def _check_factor(factor: int) -> None:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"growth factor must be a positive integer, got {factor!r}")


def check_mode_and_noise(mode: str, noise: float) -> None:
    """Raise ValueError for an unknown growth mode or a noise that is negative or not finite."""
    if mode not in MODES:
        raise ValueError(f"unknown growth mode {mode!r}; choose one of {', '.join(MODES)}")
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")


def _grown_shape(name: str, shape: torch.Size, factor: int) -> tuple[int, ...]:
    kind, _ = _rule(name)
    if kind == "unchanged":
        return tuple(shape)
    if kind == "vector":
        return (shape[0] * factor,)
    if kind == "tiled":
        return (shape[0] * factor, shape[1] * factor)
    return (shape[0], shape[1] * factor)  # "columns" and "head": only the input width grows


def _add_mirror_noise(
    blocks: Tensor, source: Tensor, noise: float, generator: torch.Generator
) -> None:
    """Add zero-sum noise in place to each row of blocks of `blocks` (p, ro, o, k, i).

    Blocks 0..k-2 of a row get independent Gaussian noise with standard deviation noise * RMS(W_p) / k,
    where W_p (o, i) is part p of the source matrix `source` (p, o, i), and block k-1 gets minus their sum.
    """
    parts, row_copies, o, factor, i = blocks.shape
    if factor == 1 or noise == 0:
        return
    by_block = rearrange(blocks, "p ro o k i -> p ro k o i")  # a view, so += writes into `blocks`

    # Drawn on the CPU generator so that a seed gives the same weights on every device.
    draws = torch.empty((parts, row_copies, factor - 1, o, i), dtype=blocks.dtype)
    for part in range(parts):
        rms = float(source[part].pow(2).mean().sqrt())
        draws[part].normal_(0.0, noise * rms / factor, generator=generator)
    draws = draws.to(blocks.device)  # NOTE: only the CPU path is covered by tests, CUDA and MPS never ran

    by_block[:, :, :-1] += draws
    by_block[:, :, -1] -= draws.sum(dim=2)  # (p, ro, o, i): each row of blocks now sums to zero noise


def _fill_grown(out: Tensor, name: str, tensor: Tensor, factor: int, divide: bool, noise: float, generator) -> None:
    """Write parameter `name` grown by `factor` into `out`, which has the grown shape.

    Tiled matrices get blocks W/factor if `divide`, else W, plus mirror noise if `noise` > 0.
    Every write goes through einops views of `out`, so nothing of the grown size is allocated here.
    """
    kind, parts = _rule(name)

    if kind == "unchanged":
        out.copy_(tensor)
        return
    if kind == "columns":
        rearrange(out, "v (k d) -> v k d", k=factor).copy_(repeat(tensor, "v d -> v k d", k=factor))
        return
    if kind == "vector":
        copies = rearrange(out, "(p k o) -> p k o", p=parts, k=factor)
        copies.copy_(repeat(tensor, "(p o) -> p k o", p=parts, k=factor))
        return

    # A linear map: parts p (3 for the fused qkv, else 1), row copies ro (k, or 1 for lm_head).
    row_copies = factor if kind == "tiled" else 1
    source = rearrange(tensor, "(p o) i -> p o i", p=parts)  # (p, o, i)
    blocks = rearrange(out, "(p ro o) (k i) -> p ro o k i", p=parts, ro=row_copies, k=factor)
    block = source / factor if divide else source  # divided on the small source, before the copy
    blocks.copy_(repeat(block, "p o i -> p ro o k i", ro=row_copies, k=factor))  # a broadcast view
    if noise > 0:
        _add_mirror_noise(blocks, source, noise, generator)


def _grow(name: str, tensor: Tensor, factor: int, divide: bool, noise: float, generator) -> Tensor:
    _check_factor(factor)
    out = tensor.new_empty(_grown_shape(name, tensor.shape, factor))
    _fill_grown(out, name, tensor, factor, divide, noise, generator)
    return out


def expand_parameter(
    name: str, tensor: Tensor, factor: int, mode: str, noise: float, generator: torch.Generator
) -> Tensor:
    """Grow one parameter, named as in TinyTransformer.state_dict(), by `factor` under `mode`.

    `generator` is a CPU torch.Generator, used only in mirror mode and only for tiled matrices.
    Raises ValueError for an unknown name, mode or factor.
    """
    check_mode_and_noise(mode, noise)
    return _grow(name, tensor, factor, divide=True, noise=noise if mode == "mirror" else 0.0, generator=generator)


def repeat_parameter(name: str, tensor: Tensor, factor: int) -> Tensor:
    """Grow one parameter into the same block layout as `expand_parameter`, with every block an exact copy.

    Tiled matrices are not divided by `factor` and get no noise. This grows per-parameter optimizer
    state such as Adam moments, whose entries must line up with the grown weights.
    """
    return _grow(name, tensor, factor, divide=False, noise=0.0, generator=None)


@torch.no_grad()
def expand(
    model: TinyTransformer, d_model: int, mode: str = "mirror", noise: float = DEFAULT_NOISE, seed: int = 0
) -> TinyTransformer:
    """Return a new TinyTransformer of width `d_model` that computes the same function as `model`.

    The new model has config `model.config.widened(d_model)` and the source's dtype, device, fast flag and
    train/eval mode. `mode="tile"` makes every copy exact, so training from it keeps the copies identical
    (the gradients are symmetric too). `mode="mirror"` adds zero-sum noise to each row of blocks of every
    tiled matrix, which leaves the function unchanged but lets the copies diverge during training.

    `noise` is the standard deviation of each random block as a fraction of the RMS of a tiled block W/k.
    Because it is relative to the block, the weight's squared norm grows by about 2 * noise**2 * (k-1)/k
    for any k, which is 2% at the default 0.1. So weight decay and learning rates tuned on the source
    still see the same weight scale. At 0.1 the copies differ from the first optimizer step. In the
    tests on random and briefly trained weights, the float32 logit error stays below 1e-5 for k up to 8.
    Raises ValueError for a target width that is not a larger integer multiple, an unknown mode, or
    a negative noise.
    """
    check_mode_and_noise(mode, noise)
    config = model.config.widened(d_model)  # validates the target
    factor = d_model // model.config.d_model
    generator = torch.Generator().manual_seed(seed)

    source = model.state_dict()
    parameter = next(model.parameters())
    grown = TinyTransformer(config, fast=model.fast).to(device=parameter.device, dtype=parameter.dtype)
    targets = grown.state_dict()
    if set(targets) != set(source):
        raise ValueError(f"parameters of the grown model {sorted(targets)} do not match the source {sorted(source)}")

    # One pass in state_dict order, which is fixed, so a seed fixes the noise of every tensor. Each grown
    # parameter is written straight into the new model's storage, so the only temporary of the grown size
    # is the noise of one tensor.
    applied_noise = noise if mode == "mirror" else 0.0
    for name, tensor in source.items():
        _fill_grown(targets[name], name, tensor, factor, True, applied_noise, generator)

    grown.train(model.training)
    log.info(
        "grew d_model %d -> %d (factor %d, mode %s, noise %g, seed %d): %d -> %d parameters, dropout %g -> %g",
        model.config.d_model, d_model, factor, mode, noise, seed,
        model.num_parameters(), grown.num_parameters(), model.config.dropout, config.dropout,
    )
    return grown
