"""Byte corpora: loading files and directories, errors, the split, batches and fingerprints."""

from __future__ import annotations

import hashlib

import pytest
import torch

from models.data import (
    DEFAULT_CORPUS,
    ByteDataset,
    CorpusError,
    evaluate_loss,
    load_corpus,
    minimum_corpus_bytes,
)
from models.config import ModelConfig
from models.model import TinyTransformer

CONTEXT = 8
MINIMUM = minimum_corpus_bytes(CONTEXT)  # 90: one 9-byte window in the 10% validation split
INVALID_UTF8 = bytes([0xFF, 0xFE, 0xC3, 0x28, 0x80]) * 40  # 200 bytes that do not decode as UTF-8


def test_minimum_corpus_bytes():
    assert MINIMUM == 90


def test_load_invalid_utf8_file(tmp_path):
    path = tmp_path / "corpus.bin"
    path.write_bytes(INVALID_UTF8)
    corpus = load_corpus(path, CONTEXT)
    assert bytes(corpus.data.tolist()) == INVALID_UTF8


def test_load_file_source(tmp_path):
    path = tmp_path / "corpus.bin"
    path.write_bytes(INVALID_UTF8)
    assert load_corpus(path, CONTEXT).source == str(path)


def test_load_directory_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_bytes(b"B" * 40)
    (tmp_path / "sub" / "c.txt").write_bytes(INVALID_UTF8[:40])
    (tmp_path / "a.txt").write_bytes(b"A" * 40)
    corpus = load_corpus(tmp_path, CONTEXT)
    assert bytes(corpus.data.tolist()) == b"A" * 40 + b"B" * 40 + INVALID_UTF8[:40]


def test_load_missing_path(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(CorpusError, match="not found") as error:
        load_corpus(missing, CONTEXT)
    assert str(missing) in str(error.value)


def test_load_empty_directory(tmp_path):
    with pytest.raises(CorpusError, match="contains no files") as error:
        load_corpus(tmp_path, CONTEXT)
    assert str(tmp_path) in str(error.value)


def test_load_too_short(tmp_path):
    path = tmp_path / "short.txt"
    path.write_bytes(b"x" * (MINIMUM - 1))
    with pytest.raises(CorpusError) as error:
        load_corpus(path, CONTEXT)
    message = str(error.value)
    assert str(path) in message
    assert f"at least {MINIMUM}" in message
    assert "\n" not in message


def test_load_exact_minimum(tmp_path):
    path = tmp_path / "exact.txt"
    path.write_bytes(b"x" * MINIMUM)
    assert load_corpus(path, CONTEXT).num_bytes == MINIMUM


def test_minimum_fits_one_window_per_split(tmp_path):
    path = tmp_path / "exact.txt"
    path.write_bytes(bytes(range(MINIMUM)))
    dataset = ByteDataset(load_corpus(path, CONTEXT), CONTEXT)
    inputs, targets = dataset.batch("val", 4, torch.Generator().manual_seed(0))
    assert inputs.shape == (4, CONTEXT)


def test_load_default_corpus(corpus):
    assert corpus.source.startswith(DEFAULT_CORPUS)


def test_default_corpus_size(corpus):
    assert corpus.num_bytes > 100_000


def test_split_sizes(dataset, corpus):
    assert dataset.splits["train"].numel() == int(corpus.num_bytes * 0.9)
    assert dataset.splits["train"].numel() + dataset.splits["val"].numel() == corpus.num_bytes


def test_split_val_is_tail(dataset, corpus):
    val = dataset.splits["val"]
    assert torch.equal(val, corpus.data[-val.numel() :])


def test_split_deterministic(corpus):
    first, second = ByteDataset(corpus, 64), ByteDataset(corpus, 64)
    assert torch.equal(first.splits["val"], second.splits["val"])


def test_batch_shapes(dataset):
    inputs, targets = dataset.batch("train", 3, torch.Generator().manual_seed(0))
    assert inputs.shape == (3, 64)
    assert targets.shape == (3, 64)
    assert inputs.dtype == torch.int64


def test_batch_targets_shifted(dataset):
    inputs, targets = dataset.batch("train", 3, torch.Generator().manual_seed(0))
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_batch_seeded(dataset):
    first = dataset.batch("train", 3, torch.Generator().manual_seed(5))
    second = dataset.batch("train", 3, torch.Generator().manual_seed(5))
    assert torch.equal(first[0], second[0])


def test_eval_batches_fixed(dataset):
    first, second = dataset.eval_batches(2, 3), dataset.eval_batches(2, 3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))


def test_fingerprint_sha256(tmp_path):
    path = tmp_path / "corpus.bin"
    path.write_bytes(INVALID_UTF8)
    fingerprint = load_corpus(path, CONTEXT).fingerprint()
    assert fingerprint["sha256"] == hashlib.sha256(INVALID_UTF8).hexdigest()
    assert fingerprint["bytes"] == len(INVALID_UTF8)


def test_fingerprint_changes_with_byte(tmp_path):
    path = tmp_path / "corpus.bin"
    path.write_bytes(INVALID_UTF8)
    before = load_corpus(path, CONTEXT).fingerprint()
    path.write_bytes(INVALID_UTF8[:-1] + b"!")
    assert load_corpus(path, CONTEXT).fingerprint()["sha256"] != before["sha256"]


def test_evaluate_loss_restores_mode(dataset):
    model = TinyTransformer(ModelConfig()).train()
    evaluate_loss(model, dataset.eval_batches(2, 1))
    assert model.training


def test_evaluate_loss_near_uniform(dataset):
    torch.manual_seed(0)
    loss = evaluate_loss(TinyTransformer(ModelConfig()), dataset.eval_batches(4, 2))
    assert 5.0 < loss < 7.0  # ln(256) = 5.55 nats for a uniform prediction
