"""Byte corpora, the train/validation split and random contiguous training windows.

Text is never decoded: every byte value is a token, so any file, including invalid UTF-8, is valid.
"""

from __future__ import annotations

import hashlib
import math
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_CORPUS = "pydoc_data.topics"
DEFAULT_VAL_FRACTION = 0.1


class CorpusError(ValueError):
    """A corpus that cannot be used: missing, empty or too short."""


@dataclass(frozen=True)
class Corpus:
    data: torch.Tensor  # (n_bytes,) uint8
    source: str  # file or directory path, or DEFAULT_CORPUS

    @property
    def num_bytes(self) -> int:
        return int(self.data.numel())

    def fingerprint(self) -> dict[str, object]:
        """Size and SHA-256 of the bytes, recorded in every checkpoint trained on this corpus."""
        digest = hashlib.sha256(self.data.numpy().tobytes()).hexdigest()
        return {"source": self.source, "bytes": self.num_bytes, "sha256": digest}


def default_corpus_bytes() -> bytes:
    """Return the documentation topics that CPython ships, joined in sorted topic order.

    The text differs between Python versions, so the fingerprint in a checkpoint records which one was used.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def read_corpus_bytes(path: str | Path) -> bytes:
    """Read a file, or every regular file under a directory in sorted path order, as raw bytes."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"corpus path not found: {path}")
    if path.is_file():
        return path.read_bytes()
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise CorpusError(f"corpus directory {path} contains no files")
    return b"".join(p.read_bytes() for p in files)


def minimum_corpus_bytes(context_length: int, val_fraction: float = DEFAULT_VAL_FRACTION) -> int:
    """Smallest corpus whose train and validation splits each hold one window of context_length + 1 bytes."""
    window = context_length + 1
    smaller_share = min(val_fraction, 1.0 - val_fraction)
    return max(2 * window, math.ceil(window / smaller_share))


def load_corpus(path: str | Path | None, context_length: int, val_fraction: float = DEFAULT_VAL_FRACTION) -> Corpus:
    """Load the corpus at `path` (None: the default corpus) and check it fits one window per split."""
    if not 0.0 < val_fraction < 1.0:
        raise CorpusError(f"validation fraction must be between 0 and 1, got {val_fraction}")
    if path is None or str(path) == DEFAULT_CORPUS:
        raw, source = default_corpus_bytes(), f"{DEFAULT_CORPUS} (Python {platform.python_version()})"
    else:
        raw, source = read_corpus_bytes(path), str(path)
    needed = minimum_corpus_bytes(context_length, val_fraction)
    if len(raw) < needed:
        raise CorpusError(
            f"corpus {source} has {len(raw)} bytes, but at least {needed} are needed for one window of "
            f"{context_length + 1} bytes in each of the train and validation splits"
        )
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return Corpus(data=data, source=source)


class ByteDataset:
    """Deterministic train/validation split of a corpus; the last `val_fraction` is validation."""

    def __init__(self, corpus: Corpus, context_length: int, val_fraction: float = DEFAULT_VAL_FRACTION) -> None:
        self.corpus = corpus
        self.context_length = context_length
        split = int(corpus.num_bytes * (1.0 - val_fraction))
        self.splits = {"train": corpus.data[:split], "val": corpus.data[split:]}

    def batch(
        self, split: str, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample `batch_size` random windows; return inputs and next-byte targets, each (b, t) int64."""
        data = self.splits[split]
        t = self.context_length
        starts = torch.randint(0, data.numel() - t, (batch_size,), generator=generator)
        offsets = torch.arange(t + 1)
        windows = data[starts.unsqueeze(1) + offsets].long()  # (b, t + 1)
        return windows[:, :-1].to(device), windows[:, 1:].to(device)

    def eval_batches(
        self, batch_size: int, num_batches: int, seed: int = 0, device: torch.device | str = "cpu"
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Return a fixed list of validation batches, the same for every model evaluated with this seed."""
        generator = torch.Generator().manual_seed(seed)
        return [self.batch("val", batch_size, generator, device) for _ in range(num_batches)]


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean cross-entropy (nats per byte) of `model` in eval mode over `batches`; restores the mode."""
    was_training = model.training
    model.eval()
    total = 0.0
    for inputs, targets in batches:
        total += float(model.loss(inputs, targets))
    model.train(was_training)
    return total / len(batches)
