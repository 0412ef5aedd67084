"""Where the maths runs: device choice and torch thread count."""

from __future__ import annotations

import torch

from raydistill.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """`auto` picks the first GPU when there is one; asking for a GPU that is not there is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name} asked for but no CUDA GPU is visible; set device=cpu or device=auto")
    return device


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
