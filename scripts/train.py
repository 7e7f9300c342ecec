"""Train a TinyTransformer on a byte corpus and save a safetensors checkpoint.

    python scripts/train.py                                  # seed model (d_model 4), default corpus
    python scripts/train.py --d-model 16 --data notes/ --out checkpoints/notes-d16.safetensors
    python scripts/train.py --resume checkpoints/tiny-d4.safetensors
    python scripts/train.py --init checkpoints/tiny-d16.safetensors --steps 1000   # keep training a grown model

Metrics are appended as JSON lines to NAME.metrics.jsonl beside the checkpoint NAME.safetensors, and
the optimizer and RNG state for --resume is written to NAME.train.safetensors. SIGINT or SIGTERM
stops training after the current step, saves both files and exits with status 128 + signal number.
A signal that arrives before the first step exits with the same status and writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from models.checkpoint import CheckpointMeta, load_checkpoint, read_checkpoint_meta, train_state_path
from models.config import ROTARY_TARGETS, ModelConfig
from models.data import DEFAULT_CORPUS, ByteDataset, Corpus, load_corpus
from models.device import DEVICE_CHOICES, resolve_device
from models.model import TinyTransformer
from models.train import Trainer, TrainConfig, stop_requested_by_signal

logger = logging.getLogger("train")

DEFAULTS = TrainConfig()

# Flags that set TrainConfig fields, with their help text. A resumed run keeps the settings it was
# started with, so these are rejected together with --resume. A run started with --init takes them.
TRAINING_FLAGS = {
    "steps": "optimizer steps",
    "batch_size": "windows of context_length bytes per step",
    "learning_rate": "peak AdamW learning rate after warmup",
    "warmup_steps": "steps of linear warmup from 0 to the peak learning rate",
    "min_lr_ratio": "final learning rate of the cosine decay, as a fraction of the peak",
    "weight_decay": "decoupled AdamW weight decay on matrices (not biases or LayerNorm gains)",
    "grad_clip": "maximum global gradient norm, 0 disables clipping",
    "eval_interval": "steps between validation evaluations and metrics records",
    "eval_batches": "validation batches per evaluation",
    "seed": "seed of the batch sampler, dropout and initialization",
}
# Flags that set ModelConfig fields, rejected together with --resume and --init, whose checkpoint fixes the model.
MODEL_FLAGS = ("d_model", "n_heads", "d_ff", "rotary_targets")


class UsageError(Exception):
    """Invalid input found after argument parsing; main prints it as one line and exits with 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a byte-level TinyTransformer and save a safetensors checkpoint.")
    training = parser.add_argument_group("training (from models.train.TrainConfig)")
    for name, help_text in TRAINING_FLAGS.items():
        default = getattr(DEFAULTS, name)
        # Defaults stay None so that --resume can tell which flags were given.
        training.add_argument(
            "--" + name.replace("_", "-"), type=type(default), default=None,
            help=f"{help_text} (default: {default})",
        )

    model = parser.add_argument_group("model")
    model.add_argument("--d-model", type=int, default=None, help="residual width in channels (default: 4)")
    model.add_argument("--n-heads", type=int, default=None, help="attention heads (default: d_model / 2, so head_dim is 2)")
    model.add_argument("--d-ff", type=int, default=None, help="feed-forward inner width (default: 2 * d_model)")
    model.add_argument(
        "--rotary-targets", choices=ROTARY_TARGETS, default=None,
        help="projections rotated by the rotary embedding (default: qkv)",
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--data", type=Path, default=None,
        help=f"corpus file, or directory of files read in sorted path order (default: {DEFAULT_CORPUS})",
    )
    run.add_argument(
        "--out", type=Path, default=None,
        help="checkpoint path (default: checkpoints/tiny-d{d_model}.safetensors, the --resume path, "
        "or NAME-cont.safetensors beside the --init checkpoint NAME.safetensors)",
    )
    run.add_argument("--force", action="store_true", help="overwrite an existing --out checkpoint")
    run.add_argument("--resume", type=Path, default=None, help="continue the run saved in this checkpoint and its .train.safetensors state")
    run.add_argument(
        "--init", type=Path, default=None,
        help="start a new run (fresh AdamW and schedule from the training flags) from the weights of this "
        "checkpoint, e.g. one written by scripts/grow.py; its step, token, FLOP and growth counts carry on",
    )
    run.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="device to train on (default: auto, which picks mps, then cuda, then cpu)")
    run.add_argument("--no-fast", action="store_true", help="use the reference attention and loss (slower, for checking)")
    run.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    return parser.parse_args(argv)


def metrics_path_for(checkpoint: Path) -> Path:
    """NAME.metrics.jsonl beside the checkpoint NAME.safetensors."""
    return checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + ".metrics.jsonl")


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    d_model = 4 if args.d_model is None else args.d_model
    n_heads = max(d_model // 2, 1) if args.n_heads is None else args.n_heads
    d_ff = 2 * d_model if args.d_ff is None else args.d_ff
    rotary_targets = "qkv" if args.rotary_targets is None else args.rotary_targets
    return ModelConfig(d_model=d_model, n_heads=n_heads, d_ff=d_ff, rotary_targets=rotary_targets)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {name: getattr(args, name) for name in TRAINING_FLAGS if getattr(args, name) is not None}
    return dataclasses.replace(DEFAULTS, **values)


def check_corpus_matches(corpus: Corpus, recorded: dict | None, checkpoint: Path) -> None:
    """Raise UsageError unless the corpus has the size and SHA-256 recorded in the checkpoint.

    The source path is not compared, so a moved corpus with the same bytes still resumes.
    """
    if recorded is None:
        raise UsageError(f"{checkpoint} records no training corpus, so it cannot be resumed")
    current = corpus.fingerprint()
    if current["bytes"] != recorded.get("bytes") or current["sha256"] != recorded.get("sha256"):
        raise UsageError(
            f"corpus mismatch: {checkpoint} was trained on {recorded.get('source')} "
            f"({recorded.get('bytes')} bytes, sha256 {str(recorded.get('sha256'))[:12]}), but the corpus "
            f"given is {current['source']} ({current['bytes']} bytes, sha256 {current['sha256'][:12]}); "
            "pass the same --data"
        )


def prepare_new_run(args: argparse.Namespace, device: torch.device) -> tuple[Trainer, Path]:
    config = model_config_from_args(args)
    train_config = train_config_from_args(args)
    out = args.out or Path("checkpoints") / f"tiny-d{config.d_model}.safetensors"
    if out.exists() and not args.force:
        raise UsageError(f"{out} already exists; pass --force to overwrite it or choose another --out")

    corpus = load_corpus(args.data, config.context_length)
    dataset = ByteDataset(corpus, config.context_length)
    torch.manual_seed(train_config.seed)  # initialization; Trainer reseeds for dropout
    model = TinyTransformer(config, fast=not args.no_fast).to(device)
    meta = CheckpointMeta(config=config, corpus=corpus.fingerprint())
    trainer = Trainer(model, dataset, train_config, meta)

    return trainer, out


def init_output_path(init: Path) -> Path:
    """NAME-cont.safetensors beside the --init checkpoint NAME.safetensors."""
    return init.with_name(init.name.removesuffix(".safetensors") + "-cont.safetensors")


def prepare_init_run(args: argparse.Namespace, device: torch.device) -> tuple[Trainer, Path]:
    """Start a new run from the weights of the --init checkpoint, continuing its cumulative counts."""
    conflicting = [name for name in MODEL_FLAGS if getattr(args, name) is not None]
    if conflicting:
        flags = ", ".join("--" + name.replace("_", "-") for name in conflicting)
        raise UsageError(f"{flags} cannot be combined with --init: the model is the one in {args.init}")

    train_config = train_config_from_args(args)
    model, meta = load_checkpoint(args.init, device=device, fast=not args.no_fast)
    out = args.out or init_output_path(args.init)
    if out.resolve() == args.init.resolve():
        raise UsageError(f"--out {out} is the --init checkpoint; choose another --out so that {args.init} is kept")
    if out.exists() and not args.force:
        raise UsageError(f"{out} already exists; pass --force to overwrite it or choose another --out")

    corpus = load_corpus(args.data, meta.config.context_length)
    recorded = meta.corpus or {}
    current = corpus.fingerprint()
    if current["sha256"] != recorded.get("sha256"):
        logger.warning(
            "corpus %s (sha256 %s) differs from %s (sha256 %s) that %s was trained on; "
            "its losses will not be comparable with the earlier ones",
            current["source"], current["sha256"][:12], recorded.get("source"),
            str(recorded.get("sha256"))[:12], args.init,
        )
    meta.corpus = current  # the corpus that --resume of this run must be given
    dataset = ByteDataset(corpus, meta.config.context_length)
    # The Trainer counts its own steps from 0 for the new schedule, and adds them to meta's counts.
    trainer = Trainer(model, dataset, train_config, meta)
    return trainer, out


def prepare_resumed_run(args: argparse.Namespace, device: torch.device) -> tuple[Trainer, Path]:
    conflicting = [name for name in (*TRAINING_FLAGS, *MODEL_FLAGS) if getattr(args, name) is not None]
    if conflicting:
        flags = ", ".join("--" + name.replace("_", "-") for name in conflicting)
        raise UsageError(f"{flags} cannot be combined with --resume: a resumed run keeps the settings it was started with")

    meta = read_checkpoint_meta(args.resume)
    state_file = train_state_path(args.resume)
    if not state_file.is_file():
        raise UsageError(f"training state not found: {state_file} (needed to resume {args.resume})")
    out = args.out or args.resume
    if out != args.resume and out.exists() and not args.force:
        raise UsageError(f"{out} already exists; pass --force to overwrite it or choose another --out")

    corpus = load_corpus(args.data, meta.config.context_length)
    check_corpus_matches(corpus, meta.corpus, args.resume)
    dataset = ByteDataset(corpus, meta.config.context_length)
    trainer = Trainer.resume(args.resume, dataset, device=device, fast=not args.no_fast)
    return trainer, out


def start_metrics_file(out: Path, resumed_from: Path | None) -> None:
    """Create the directory of `out` and start its metrics file.

    A run resumed into another file continues with a copy of the resumed run's metrics, so the whole
    curve stays in one file. A new run starts a fresh file, which also clears it on a forced overwrite.
    """
    if resumed_from is not None and out == resumed_from:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    source = metrics_path_for(resumed_from) if resumed_from is not None else None
    if source is not None and source.is_file():
        shutil.copyfile(source, metrics_path_for(out))
    else:
        metrics_path_for(out).unlink(missing_ok=True)


def resume_command(out: Path, data: Path | None) -> str:
    command = f"python scripts/train.py --resume {out}"
    return command if data is None else f"{command} --data {data}"


def train(trainer: Trainer, out: Path, data: Path | None, caught_signal: Callable[[], int | None]) -> int:
    """Run the training loop with a progress bar; return the exit status.

    The loop stops early, saving the checkpoint and its state, once `caught_signal` returns a signal.
    """
    metrics_path = metrics_path_for(out)
    started = time.perf_counter()
    start_step = trainer.step
    bar = tqdm(  # disable=None: no bar when stderr is not a terminal, where the INFO logs show progress
        total=trainer.config.steps, initial=trainer.step, unit="step", dynamic_ncols=True, disable=None
    )

    def on_step(trainer: Trainer, loss: float) -> None:
        seconds = time.perf_counter() - started
        tokens_per_second = (trainer.step - start_step) * trainer.tokens_per_step / max(seconds, 1e-9)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_second:,.0f}", refresh=False)
        bar.update(1)

    with logging_redirect_tqdm():
        finished = trainer.run(
            metrics_path=metrics_path, on_step=on_step, should_stop=lambda: caught_signal() is not None
        )
        bar.close()
        trainer.save(out)  # inside the handler, so a second signal cannot interrupt the write

    if not finished:
        name = signal.Signals(caught_signal()).name
        print(
            f"stopped by {name} at step {trainer.step}/{trainer.config.steps}; saved {out} and "
            f"{train_state_path(out)}; resume with: {resume_command(out, data)}"
        )
        return 128 + caught_signal()

    val_loss = trainer.evaluate()
    print(
        f"final val loss {val_loss:.4f} nats/byte ({val_loss / math.log(2):.4f} bits/byte) at step "
        f"{trainer.meta.step}; saved {out}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        if args.threads <= 0:
            print(f"train.py: error: --threads must be positive, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)

    # The handler is installed before the setup, which takes seconds (corpus hashing, the first import
    # of torch._dynamo by torch.optim), so that a signal sent then is not lost. It stays installed
    # until the checkpoint is saved.
    with stop_requested_by_signal() as caught_signal:
        try:
            device = resolve_device(args.device)
            if args.resume is not None and args.init is not None:
                raise UsageError("--init cannot be combined with --resume: --resume continues a run, --init starts a new one")
            if args.resume is not None:
                trainer, out = prepare_resumed_run(args, device)
            elif args.init is not None:
                trainer, out = prepare_init_run(args, device)
            else:
                trainer, out = prepare_new_run(args, device)
        # CorpusError and CheckpointError are ValueErrors, and so are invalid ModelConfig and TrainConfig values.
        except (UsageError, ValueError, OSError) as error:
            print(f"train.py: error: {error}", file=sys.stderr)
            return 2

        if caught_signal() is not None:
            name = signal.Signals(caught_signal()).name
            print(f"stopped by {name} before training started; nothing was trained or written")
            return 128 + caught_signal()

        start_metrics_file(out, args.resume)
        logger.info(
            "training %s (%d parameters) on %s for %d steps on %s; checkpoint %s",
            trainer.model.config.to_json(), trainer.model.num_parameters(), trainer.dataset.corpus.source,
            trainer.config.steps, trainer.device, out,
        )
        return train(trainer, out, args.data, caught_signal)


if __name__ == "__main__":
    sys.exit(main())
