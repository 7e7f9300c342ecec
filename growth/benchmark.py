"""Time and memory of one `expand` call, for benchmark scripts."""

from __future__ import annotations

import gc
import resource
import sys
import time
from typing import Any

import torch

from growth.expand import DEFAULT_NOISE, expand
from models.model import TinyTransformer


def _max_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def benchmark_growth(
    model: TinyTransformer, d_model: int, mode: str = "mirror", noise: float = DEFAULT_NOISE, repeats: int = 3
) -> dict[str, Any]:
    """Grow `model` to `d_model` `repeats` times and return the fastest time and the peak memory increase.

    `peak_rss_increase_bytes` is how far the process' peak RSS rose during the calls. It reads 0 when an
    earlier allocation in the process already set a higher peak, so run this early in a fresh process.
    `grown_bytes` is the size of the grown parameters, the least any growth must allocate.
    """
    if repeats <= 0:
        raise ValueError(f"repeats must be positive, got {repeats}")
    gc.collect()
    rss_before = _max_rss_bytes()

    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        grown = expand(model, d_model, mode=mode, noise=noise)
        if grown.lm_head.weight.is_cuda:
            torch.cuda.synchronize()  # kernels run asynchronously; time their completion
        seconds.append(time.perf_counter() - start)
        grown_parameters = grown.num_parameters()
        grown_bytes = sum(p.numel() * p.element_size() for p in grown.parameters())
        del grown

    return {
        "from": model.config.d_model,
        "to": d_model,
        "mode": mode,
        "seconds_min": min(seconds),
        "seconds_first": seconds[0],
        "source_parameters": model.num_parameters(),
        "grown_parameters": grown_parameters,
        "grown_bytes": grown_bytes,
        "peak_rss_increase_bytes": _max_rss_bytes() - rss_before,
    }
