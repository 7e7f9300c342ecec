"""Measure training-step throughput of the TinyTransformer against a plain eager PyTorch GPT.

    python scripts/bench_train.py [--threads 2] [--steps 10] [--widths 4,16,64] [--device cpu]

One step is forward, backward and a torch.optim.AdamW step in float32 on byte tokens with context 64.
For each width it times three contenders in the same process, one step of each in turn (A B C A B C)
so that load from other processes hits all of them alike, and prints medians:

- fast: TinyTransformer on its default path (channel-first activations, chunked attention, fused
  chunked loss),
- reference: TinyTransformer with set_fast(False) (scaled_dot_product_attention, F.cross_entropy),
- baseline: the nanoGPT-style model below, outside the toolkit, with the same widths and heads.

The roofline column divides a lower bound on step time by the measured step time of the fast path.
The bound is the larger of the counted FLOPs at the measured matmul rate and the minimum bytes at
the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

try:
    import models.model  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import nn

from growth.benchmark import benchmark_growth
from models.checkpoint import load_checkpoint
from models.config import ModelConfig
from models.device import DEVICE_CHOICES, resolve_device
from models.model import TinyTransformer

CONTEXT = 64
BYTES_PER_FLOAT = 4  # every contender trains in float32
# (d_model, batch): batch 256 everywhere, and batch 32 where a small batch still fits the defaults.
SMALL_BATCH_WIDTHS = (4, 16)
WARMUP_STEPS = 2


# --- Baseline: a plain eager GPT in the style of nanoGPT, not part of the toolkit. ---


class BaselineAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (y.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, h, t, e)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))


class BaselineBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = BaselineAttention(d_model, n_heads)
        self.ln_2 = nn.LayerNorm(d_model)
        self.c_fc = nn.Linear(d_model, d_ff)
        self.c_proj = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln_1(x)))
        return x + self.dropout(self.c_proj(F.relu(self.c_fc(self.ln_2(x)))))


class BaselineGPT(nn.Module):
    """Learned positional embedding, pre-LayerNorm blocks, final LayerNorm, untied output layer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.context_length, config.d_model)
        self.blocks = nn.ModuleList(
            BaselineBlock(config.d_model, config.n_heads, config.d_ff, config.dropout)
            for _ in range(config.n_layers)
        )
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


# --- Measurements. ---


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def median_seconds(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Return the median wall time in seconds of `repeats` calls of `run`, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_matmul_flops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Return the float32 matmul rate in FLOP/s of a (size x size) @ (size x size) torch.mm."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    seconds = median_seconds(lambda: torch.mm(a, b), device, repeats)
    return 2 * size**3 / seconds


def measure_copy_bandwidth(device: torch.device, mebibytes: int = 256, repeats: int = 5) -> float:
    """Return the copy bandwidth in bytes/s (read plus write) of a float32 tensor copy."""
    source = torch.empty(mebibytes * 2**20 // BYTES_PER_FLOAT, device=device).normal_()
    target = torch.empty_like(source)
    seconds = median_seconds(lambda: target.copy_(source), device, repeats)
    return 2 * source.numel() * BYTES_PER_FLOAT / seconds


def matmul_parameters(config: ModelConfig) -> int:
    """Count the weights used in matrix products: qkv, proj, ffn up and down, and the output layer."""
    d, d_ff, v = config.d_model, config.d_ff, config.vocab_size
    per_layer = 3 * d * d + d * d + 2 * d * d_ff
    return config.n_layers * per_layer + d * v


def flops_per_token(config: ModelConfig) -> float:
    """Return the FLOPs of one training token: 6 per matmul weight plus the attention products.

    Forward, each layer computes scores q.k and the weighted sum of v over all t positions (the
    masked half included, as dense kernels do), 2 t d FLOPs each. Backward costs twice the forward.
    """
    attention = config.n_layers * 3 * (2 + 2) * CONTEXT * config.d_model
    return 6 * matmul_parameters(config) + attention


def min_bytes_per_token(config: ModelConfig, batch: int) -> float:
    """Estimate the least memory traffic per token of one training step, in bytes.

    Counted are the token ids and targets (int64) and the matmul inputs that backward needs, each
    written once and read once. Those are the layer-norm output, q, k, v, attention output and the
    feed-forward input and hidden activations, 6 d + d_ff floats per layer. AdamW adds 7 floats per
    parameter (read parameter, gradient and both moments, write parameter and moments), spread over
    the step's tokens. Everything else is assumed to stay in cache, so real steps move more.
    """
    d, d_ff = config.d_model, config.d_ff
    saved_activations = config.n_layers * (6 * d + d_ff) * BYTES_PER_FLOAT * 2
    parameters = sum(p.numel() for p in TinyTransformer(config).parameters())
    optimizer = 7 * parameters * BYTES_PER_FLOAT / (batch * CONTEXT)
    return 2 * 8 + saved_activations + optimizer


def make_step(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> Callable[[], None]:
    """Return a function that runs one forward, backward and AdamW step of `model` on the batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.loss(idx, targets).backward()
        optimizer.step()

    return step


def time_contenders(steps: dict[str, Callable[[], None]], device: torch.device, rounds: int) -> dict[str, float]:
    """Return the median seconds per step of each contender, timing them in turn, round by round."""
    for step in steps.values():
        for _ in range(WARMUP_STEPS):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def config_for_width(d_model: int) -> ModelConfig:
    """Return the seed config grown to d_model, so heads keep head_dim 2 as in grown models."""
    seed = ModelConfig(context_length=CONTEXT)
    return seed if d_model == seed.d_model else seed.widened(d_model)


# --- Report sections. ---


def print_machine(device: torch.device) -> dict[str, float]:
    """Print and return the measured matmul rate (FLOP/s) and copy bandwidth (bytes/s)."""
    rates = {"flops": measure_matmul_flops(device), "bandwidth": measure_copy_bandwidth(device)}
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads")
    print(f"matmul {rates['flops'] / 1e9:.1f} GFLOP/s (2048^3 torch.mm), "
          f"copy {rates['bandwidth'] / 1e9:.1f} GB/s (256 MiB copy, read + write)")
    return rates


SHIPPED_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-d4.safetensors"
GROWTH_TARGET = 1024


def print_training(args: argparse.Namespace, device: torch.device, rates: dict[str, float]) -> None:
    """Print the throughput table: one row per (width, batch), medians of args.steps rounds."""
    print(f"\ntraining step, float32, context {CONTEXT}, medians of {args.steps} interleaved rounds")
    print(f"{'d_model':>7} {'heads':>5} {'batch':>5} {'fast tok/s':>11} {'ref tok/s':>10} "
          f"{'base tok/s':>11} {'fast/base':>9} {'FLOP/tok':>9} {'B/tok':>6} {'roofline':>8}")
    for d_model in args.widths:
        for batch in (256, 32) if d_model in SMALL_BATCH_WIDTHS else (256,):
            config = config_for_width(d_model)
            generator = torch.Generator().manual_seed(0)
            idx = torch.randint(0, config.vocab_size, (batch, CONTEXT), generator=generator).to(device)
            targets = torch.randint(0, config.vocab_size, (batch, CONTEXT), generator=generator).to(device)
            torch.manual_seed(0)
            steps = {
                "fast": make_step(TinyTransformer(config).to(device), idx, targets),
                "reference": make_step(TinyTransformer(config, fast=False).to(device), idx, targets),
                "baseline": make_step(BaselineGPT(config).to(device), idx, targets),
            }
            seconds = time_contenders(steps, device, args.steps)
            tokens = batch * CONTEXT
            flops, min_bytes = flops_per_token(config), min_bytes_per_token(config, batch)
            bound = tokens * max(flops / rates["flops"], min_bytes / rates["bandwidth"])  # seconds
            print(f"{d_model:>7} {config.n_heads:>5} {batch:>5} {tokens / seconds['fast']:>11,.0f} "
                  f"{tokens / seconds['reference']:>10,.0f} {tokens / seconds['baseline']:>11,.0f} "
                  f"{seconds['baseline'] / seconds['fast']:>8.2f}x {flops:>9,.0f} {min_bytes:>6,.0f} "
                  f"{bound / seconds['fast']:>8.1%}")


def print_growth() -> None:
    """Print the time and added peak memory of growing the shipped checkpoint to d_model 1024."""
    source = SHIPPED_CHECKPOINT if SHIPPED_CHECKPOINT.is_file() else None
    model = load_checkpoint(source)[0] if source else TinyTransformer(ModelConfig())
    result = benchmark_growth(model, GROWTH_TARGET, mode="mirror", repeats=3)
    print(f"growth, mirror, {source or 'seed model at random init'} -> d_model {GROWTH_TARGET} on cpu: "
          f"{result['seconds_min'] * 1e3:.0f} ms (fastest of 3), "
          f"{result['grown_parameters']:,} parameters ({result['grown_bytes'] / 2**20:.1f} MiB), "
          f"peak RSS +{result['peak_rss_increase_bytes'] / 2**20:.1f} MiB")


# Printed in order after the machine rates. Each section is a function of (args, device, machine rates).
SECTIONS: list[Callable[[argparse.Namespace, torch.device, dict[str, float]], None]] = [print_training]


def parse_widths(text: str) -> list[int]:
    widths = [int(part) for part in text.split(",")]
    seed = ModelConfig().d_model
    invalid = [width for width in widths if width <= 0 or width % seed != 0]
    if invalid:
        raise argparse.ArgumentTypeError(f"widths must be positive multiples of {seed}, got {invalid}")
    return widths


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's default for this machine)")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds per contender (default: 10)")
    parser.add_argument("--widths", type=parse_widths, default=[4, 16, 64],
                        help="comma-separated d_model values, multiples of 4 (default: 4,16,64)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                        help="where to run; auto picks mps, then cuda, then cpu (default: auto)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads <= 0:
        parser.error(f"--threads must be positive, got {args.threads}")
    if args.steps <= 0:
        parser.error(f"--steps must be positive, got {args.steps}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        print(f"bench_train.py: error: {error}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print_growth()  # first, while the peak RSS is low enough to show what growing adds
    rates = print_machine(device)
    for section in SECTIONS:
        section(args, device, rates)
    return 0


if __name__ == "__main__":
    sys.exit(main())
