"""Time growing a d_model 4 model to a large width and report the peak memory it adds.

    python scripts/bench_grow.py [--checkpoint checkpoints/tiny-d4.safetensors] [--to 1024] [--mode mirror]

Without a checkpoint it grows a freshly initialized seed model, which costs the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import growth.expand  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from growth.benchmark import benchmark_growth
from growth.expand import MODES
from models.checkpoint import CheckpointError, load_checkpoint
from models.config import ModelConfig
from models.device import DEVICE_CHOICES, resolve_device
from models.model import TinyTransformer

SHIPPED_CHECKPOINT = Path("checkpoints/tiny-d4.safetensors")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help=f"source checkpoint (default: {SHIPPED_CHECKPOINT} if present, else a new seed model)")
    parser.add_argument("--to", type=int, default=1024, metavar="D_MODEL", help="target d_model (default: 1024)")
    parser.add_argument("--mode", choices=MODES, default="mirror", help="growth mode (default: mirror)")
    parser.add_argument("--repeats", type=int, default=3, help="timed growths; the fastest is reported (default: 3)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="cpu",
                        help="where to grow (default: cpu; peak RSS counts host memory only)")
    args = parser.parse_args(argv)

    checkpoint = args.checkpoint or (SHIPPED_CHECKPOINT if SHIPPED_CHECKPOINT.is_file() else None)
    try:
        device = resolve_device(args.device)
        model = load_checkpoint(checkpoint)[0] if checkpoint else TinyTransformer(ModelConfig())
        model.to(device)
        result = benchmark_growth(model, args.to, mode=args.mode, repeats=args.repeats)
    except (CheckpointError, ValueError) as error:
        print(f"bench_grow.py: error: {error}", file=sys.stderr)
        return 2
    result["source"] = str(checkpoint) if checkpoint else "seed model at random init"
    result["torch_threads"] = torch.get_num_threads()

    if args.json:
        print(json.dumps(result))
        return 0
    mib = 2**20
    print(f"grow d_model {result['from']} -> {result['to']} ({args.mode}) from {result['source']}")
    print(f"  time: {result['seconds_min'] * 1e3:.0f} ms fastest of {args.repeats} "
          f"({result['seconds_first'] * 1e3:.0f} ms first), {result['torch_threads']} torch threads")
    print(f"  parameters: {result['source_parameters']:,} -> {result['grown_parameters']:,} "
          f"({result['grown_bytes'] / mib:.1f} MiB)")
    print(f"  peak RSS increase: {result['peak_rss_increase_bytes'] / mib:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
