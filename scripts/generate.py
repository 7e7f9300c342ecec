"""Sample text from a TinyTransformer checkpoint.

    python scripts/generate.py checkpoints/tiny-d4.safetensors --prompt "def " --max-new-tokens 200

The prompt is the command-line argument's original bytes (os.fsencode, so bytes that are not valid
in the locale's encoding are kept), and the output bytes are decoded as UTF-8 with invalid sequences
shown as U+FFFD, so any sample prints. --raw writes the bytes undecoded instead. The same checkpoint,
arguments and --seed give the same output.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from models.checkpoint import load_checkpoint
from models.device import DEVICE_CHOICES, resolve_device
from models.generate import check_sampling_arguments, generate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Sample bytes from a TinyTransformer checkpoint.")
    parser.add_argument("checkpoint", help="path of a .safetensors checkpoint written by scripts/train.py")
    parser.add_argument("--prompt", default="", help="text to continue (default: empty, which starts from a newline byte)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="bytes to generate (default: 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature, where 0 takes the most likely byte (greedy) (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely bytes, 1 to 256 (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default: 0)")
    parser.add_argument("--raw", action="store_true", help="write the prompt and sample bytes to stdout unchanged, with no UTF-8 decoding and no trailing newline")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="device to run the model on (default: auto, which picks mps, then cuda, then cpu)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(errors="replace")  # U+FFFD cannot be encoded on an ASCII-only terminal
    try:
        check_sampling_arguments(args.max_new_tokens, args.temperature, args.top_k)
        device = resolve_device(args.device)
        model, _ = load_checkpoint(args.checkpoint, device=device)
    except ValueError as error:  # CheckpointError is a ValueError
        print(f"generate.py: error: {error}", file=sys.stderr)
        return 2

    # argv bytes that are invalid in the locale's encoding arrive as surrogate escapes, which
    # os.fsencode turns back into the original bytes.
    prompt = os.fsencode(args.prompt)
    generator = torch.Generator().manual_seed(args.seed)
    sample = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, generator)
    if args.raw:
        sys.stdout.flush()
        sys.stdout.buffer.write(prompt + sample)
        sys.stdout.buffer.flush()
        return 0
    # Decode prompt and sample together, so a character split across the boundary stays whole.
    print((prompt + sample).decode("utf-8", errors="replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
