"""Byte-level sampling from a TinyTransformer: greedy, temperature and top-k."""

from __future__ import annotations

import torch

from models.model import TinyTransformer

START_BYTE = ord("\n")  # context for an empty prompt, because the model needs at least one token


def check_sampling_arguments(max_new_tokens: int, temperature: float, top_k: int | None, vocab_size: int = 256) -> None:
    """Raise ValueError naming the first invalid sampling argument."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be between 1 and {vocab_size}, got {top_k}")


@torch.no_grad()
def generate(
    model: TinyTransformer,
    prompt: bytes,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> bytes:
    """Sample `max_new_tokens` bytes that continue `prompt` and return them (without the prompt).

    Each step feeds the last context_length bytes. Temperature 0 takes the most likely byte, and
    `top_k` keeps the k most likely bytes before sampling. Sampling runs on the CPU with `generator`,
    so a seeded generator gives the same bytes for the same logits on any device.
    """
    check_sampling_arguments(max_new_tokens, temperature, top_k, model.config.vocab_size)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    context = list(prompt) or [START_BYTE]
    new_bytes = []

    for _ in range(max_new_tokens):
        window = torch.tensor([context[-model.config.context_length :]], device=device)  # (1, t)
        logits = model(window)[0, -1].float().cpu()  # (v,) for the next byte
        if temperature == 0:
            next_byte = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None:
                kth_largest = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth_largest, float("-inf"))
            probs = logits.softmax(dim=-1)
            next_byte = int(torch.multinomial(probs, 1, generator=generator))
        context.append(next_byte)
        new_bytes.append(next_byte)

    model.train(was_training)
    return bytes(new_bytes)
