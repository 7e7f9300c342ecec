"""Widen a checkpoint to a larger d_model so that it computes the same function, and report its loss.

    python scripts/grow.py checkpoints/tiny-d4.safetensors --to 16 [--mode tile] [--json] [--plot]

Exit status 2, with one line on stderr and nothing written, for bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

try:
    import growth.expand  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from growth.checkpoint import DEFAULT_BATCH_SIZE, DEFAULT_EVAL_BATCHES, grow_checkpoint
from growth.expand import DEFAULT_NOISE, MODES
from growth.history_plot import plot_growth_history
from models.device import DEVICE_CHOICES

FIGURES_DIR = Path("figures")


class OneLineArgumentParser(argparse.ArgumentParser):
    """ArgumentParser that reports a usage error as one line on stderr, without the usage text."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def default_output_path(src: Path, d_model: int) -> Path:
    """Return the output beside `src`: a trailing d<N> in the stem becomes d<d_model>, else -d<d_model> is added."""
    if re.search(r"d\d+$", src.stem):
        stem = re.sub(r"d\d+$", f"d{d_model}", src.stem)
    else:
        stem = f"{src.stem}-d{d_model}"
    return src.with_name(stem + src.suffix)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(
        prog="grow.py",
        description="Widen a TinyTransformer checkpoint by an integer factor so that it computes the same "
        "function, evaluate both models on the same validation batches and write the grown checkpoint.",
    )

    parser.add_argument("checkpoint", type=Path, help="source checkpoint (.safetensors)")
    parser.add_argument("--to", type=int, required=True, metavar="D_MODEL",
                        help="target d_model, an integer multiple (2x, 3x, ...) of the current d_model")
    parser.add_argument("--out", type=Path, help="output checkpoint path (default: beside the input, with the "
                        "trailing d<N> of the name replaced by the target, e.g. tiny-d4 -> tiny-d16)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output (never the input)")

    parser.add_argument("--mode", choices=MODES, default="mirror",
                        help="mirror: copies get zero-sum noise so they can diverge in training; "
                        "tile: exact copies (default: mirror)")
    parser.add_argument("--noise", type=float, default=DEFAULT_NOISE,
                        help="mirror noise standard deviation, as a fraction of the RMS of one tiled block W/k "
                        f"(default: {DEFAULT_NOISE})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mirror noise (default: 0)")

    parser.add_argument("--data", type=Path, help="evaluation corpus file or directory (default: the "
                        "checkpoint's corpus if it is the built-in pydoc_data.topics)")
    parser.add_argument("--eval-batches", type=int, default=DEFAULT_EVAL_BATCHES,
                        help=f"number of validation batches (default: {DEFAULT_EVAL_BATCHES})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"sequences per validation batch, each context_length bytes (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                        help="device to grow and evaluate on (default: auto)")

    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--plot", nargs="?", const="", type=str, metavar="PATH",
                        help="save the growth-history figure as PNG (default PATH: figures/<output stem>-growth.png)")
    return parser.parse_args(argv)


def format_table(summary: dict) -> str:
    columns = ("d_model", "n_heads", "d_ff", "parameters", "dropout")
    header = f"{'':8} {'d_model':>8} {'heads':>6} {'d_ff':>6} {'parameters':>11} {'dropout':>8} {'val loss':>10}"
    lines = [header]
    for row, loss_key in (("source", "loss_before"), ("grown", "loss_after")):
        sizes = summary[row]
        d_model, heads, d_ff, parameters, dropout = (sizes[column] for column in columns)
        lines.append(
            f"{row:8} {d_model:>8} {heads:>6} {d_ff:>6} {parameters:>11,} {dropout:>8.4f} {summary[loss_key]:>10.6f}"
        )
    lines.append("")
    lines.append(f"loss before   {summary['loss_before']:.6f} nats/byte")
    lines.append(f"loss after    {summary['loss_after']:.6f} nats/byte")
    lines.append(f"|difference|  {summary['abs_difference']:.3e} nats/byte")
    lines.append(f"wrote {summary['out']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = args.out if args.out is not None else default_output_path(args.checkpoint, args.to)
    if args.plot is None:
        plot_path = None
    else:
        plot_path = Path(args.plot) if args.plot else FIGURES_DIR / f"{out.stem}-growth.png"

    try:
        if plot_path is not None and args.plot and not plot_path.parent.is_dir():
            raise ValueError(f"plot directory not found: {plot_path.parent}; create it or choose another path")
        summary = grow_checkpoint(
            args.checkpoint, out, args.to, mode=args.mode, noise=args.noise, seed=args.seed, data=args.data,
            eval_batches=args.eval_batches, batch_size=args.batch_size, device=args.device, overwrite=args.force,
        )
    except ValueError as error:  # includes CheckpointError and CorpusError
        print(f"grow.py: error: {error}", file=sys.stderr)
        return 2

    if plot_path is not None:
        plot_path.parent.mkdir(parents=True, exist_ok=True)  # only the default figures/ can be missing here
        summary["plot"] = str(plot_growth_history(out, plot_path))

    if args.json:
        print(json.dumps(summary))
    else:
        print(format_table(summary))
        if plot_path is not None:
            print(f"wrote {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
