"""Device selection: `auto` picks MPS, then CUDA, then CPU."""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto") -> torch.device:
    """Return the torch device for `name`, raising ValueError if it was requested but is unavailable."""
    mps_available = torch.backends.mps.is_available()
    cuda_available = torch.cuda.is_available()
    if name == "auto":
        if mps_available:
            return torch.device("mps")
        if cuda_available:
            return torch.device("cuda")
        return torch.device("cpu")

    kind = name.split(":")[0]
    if kind not in DEVICE_CHOICES:
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if kind == "cuda" and not cuda_available:
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine; use --device cpu")
    if kind == "mps" and not mps_available:
        raise ValueError(f"device {name!r} requested but MPS is not available on this machine; use --device cpu")
    return torch.device(name)
