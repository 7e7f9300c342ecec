"""Model configuration: the seed architecture's sizes and the rules derived from them."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

ROTARY_TARGETS = ("qkv", "qk")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of a TinyTransformer. The defaults are the seed model (d_model 4, about 2.6K parameters)."""

    vocab_size: int = 256  # one token per byte value
    d_model: int = 4
    n_layers: int = 2
    n_heads: int = 2
    d_ff: int = 8  # inner width of the feed-forward network
    context_length: int = 64  # longer inputs keep their last context_length tokens
    rotary_base: float = 10000.0
    rotary_targets: str = "qkv"  # "qkv": queries, keys and values are rotated; "qk": the usual variant

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "context_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if not self.rotary_base > 0:
            raise ValueError(f"ModelConfig.rotary_base must be positive, got {self.rotary_base!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"ModelConfig.head_dim={self.head_dim} (d_model / n_heads) must be even "
                "because rotary embeddings rotate pairs of channels"
            )
        if self.rotary_targets not in ROTARY_TARGETS:
            raise ValueError(
                f"ModelConfig.rotary_targets must be one of {ROTARY_TARGETS}, got {self.rotary_targets!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def dropout(self) -> float:
        """Dropout rate before each residual add, derived from the width and never set by hand."""
        return min(0.1, 0.5 * self.d_model / 256)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        return cls(**values)

    def widened(self, d_model: int) -> "ModelConfig":
        """Return the config of this model grown to `d_model` by an integer factor.

        Heads and the feed-forward width grow by the same factor, so the head dimension, and with it
        the rotary frequencies and the attention scale, are unchanged.
        """
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model <= 0:
            raise ValueError(f"target d_model must be a positive integer, got {d_model!r}")
        if d_model <= self.d_model or d_model % self.d_model != 0:
            raise ValueError(
                f"target d_model={d_model} must be an integer multiple of the current "
                f"d_model={self.d_model} larger than it (allowed: {self.d_model * 2}, "
                f"{self.d_model * 3}, {self.d_model * 4}, ...)"
            )
        factor = d_model // self.d_model
        return dataclasses.replace(
            self, d_model=d_model, n_heads=self.n_heads * factor, d_ff=self.d_ff * factor
        )
