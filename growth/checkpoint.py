"""Grow a saved checkpoint, check the grown model's validation loss, and write it with its history."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from growth.expand import DEFAULT_NOISE, check_mode_and_noise, expand
from models.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint, read_checkpoint_meta, save_checkpoint
from models.config import ModelConfig
from models.data import DEFAULT_CORPUS, ByteDataset, Corpus, evaluate_loss, load_corpus
from models.device import resolve_device
from models.model import TinyTransformer
from models.train import EVAL_SEED, TrainConfig

log = logging.getLogger(__name__)

# The validation set that scripts/train.py evaluates on (with EVAL_SEED), so that grow.py reports the
# same loss for a checkpoint as its training log.
DEFAULT_EVAL_BATCHES = TrainConfig().eval_batches
DEFAULT_BATCH_SIZE = TrainConfig().batch_size


def check_output_path(src: str | Path, out: str | Path, overwrite: bool = False) -> None:
    """Raise ValueError unless `out` can receive a grown checkpoint of `src`.

    `out` must differ from `src`, its directory must exist, and it must not exist unless `overwrite`.
    """
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve() or (out.exists() and src.exists() and os.path.samefile(out, src)):
        raise ValueError(f"output path {out} is the input checkpoint; choose another output path")
    if not out.parent.is_dir():
        raise ValueError(f"output directory not found: {out.parent}; create it or choose another output path")
    if out.exists() and not overwrite:
        raise ValueError(f"output {out} already exists; pass --force to overwrite it")


def load_eval_corpus(meta: CheckpointMeta, data: str | Path | None) -> Corpus:
    """Load the corpus to evaluate a checkpoint on: `data` if given, else the default corpus it was trained on.

    Raises ValueError when `data` is None and the checkpoint was not trained on the default corpus.
    Logs a warning when the corpus' SHA-256 differs from the checkpoint's recorded fingerprint.
    """
    recorded = meta.corpus or {}
    if data is None:
        source = str(recorded.get("source", ""))
        if not source.startswith(DEFAULT_CORPUS):
            raise ValueError(
                f"the checkpoint was trained on corpus {source or '(not recorded)'!r}, not the default "
                f"{DEFAULT_CORPUS}; pass --data PATH to evaluate it"
            )
    corpus = load_corpus(data, meta.config.context_length)

    expected = recorded.get("sha256")
    if expected is not None and expected != corpus.fingerprint()["sha256"]:
        log.warning(
            "corpus %s differs from the one recorded in the checkpoint (%s, sha256 %s); "
            "the losses are not comparable with the training run's",
            corpus.source, recorded.get("source"), expected,
        )
    return corpus


def _describe(config: ModelConfig, model: TinyTransformer) -> dict[str, Any]:
    return {
        "d_model": config.d_model,
        "n_heads": config.n_heads,
        "d_ff": config.d_ff,
        "parameters": model.num_parameters(),
        "dropout": config.dropout,
    }


def grow_checkpoint(
    src: str | Path,
    out: str | Path,
    d_model: int,
    mode: str = "mirror",
    noise: float = DEFAULT_NOISE,
    seed: int = 0,
    data: str | Path | None = None,
    eval_batches: int = DEFAULT_EVAL_BATCHES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Widen the checkpoint at `src` to `d_model`, evaluate both models and write the result to `out`.

    Both models are evaluated in eval mode on the same validation batches. The grown checkpoint carries
    step, tokens, FLOPs, corpus and training settings, and its growth history gains one entry
    {from, to, mode, noise, seed, loss_before, loss_after}. It has no optimizer state file: Adam moments
    are grown by the caller that resumes training (see `repeat_parameter`). Every input is checked
    before anything is written, and the file is written atomically. Raises ValueError (CheckpointError,
    CorpusError) on bad input. Returns a summary with the sizes and losses of both models.
    """
    meta = read_checkpoint_meta(src)
    meta.config.widened(d_model)  # rejects a bad target before the model and corpus are loaded
    check_mode_and_noise(mode, noise)
    check_output_path(src, out, overwrite)
    if eval_batches <= 0 or batch_size <= 0:
        raise ValueError(f"eval_batches and batch_size must be positive, got {eval_batches} and {batch_size}")
    device = resolve_device(str(device))
    corpus = load_eval_corpus(meta, data)

    model, meta = load_checkpoint(src, device=device)
    grown = expand(model, d_model, mode=mode, noise=noise, seed=seed)

    dataset = ByteDataset(corpus, meta.config.context_length)
    batches = dataset.eval_batches(batch_size, eval_batches, seed=EVAL_SEED, device=device)
    loss_before = evaluate_loss(model, batches)
    loss_after = evaluate_loss(grown, batches)
    if not (math.isfinite(loss_before) and math.isfinite(loss_after)):
        raise CheckpointError(f"{src}: validation loss is not finite (before {loss_before}, after {loss_after})")

    applied_noise = noise if mode == "mirror" else 0.0
    entry = {
        "from": meta.config.d_model,
        "to": d_model,
        "mode": mode,
        "noise": applied_noise,
        "seed": seed,
        "loss_before": loss_before,
        "loss_after": loss_after,
    }
    grown_meta = CheckpointMeta(
        config=grown.config,
        step=meta.step,
        tokens=meta.tokens,
        flops=meta.flops,
        corpus=meta.corpus,
        growth_history=[*meta.growth_history, entry],
        training=meta.training,
    )
    save_checkpoint(out, grown, grown_meta)
    log.info("wrote %s: d_model %d -> %d, validation loss %.6f -> %.6f", out, meta.config.d_model, d_model,
             loss_before, loss_after)

    return {
        "source": _describe(meta.config, model),
        "grown": _describe(grown.config, grown),
        "mode": mode,
        "noise": applied_noise,
        "seed": seed,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "abs_difference": abs(loss_after - loss_before),
        "out": str(out),
    }
