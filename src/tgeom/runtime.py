"""Device, dtype and batch size, chosen in one place and passed down to every analysis."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def default_device() -> torch.device:
    """This process' CUDA device when one is present (``LOCAL_RANK`` under torchrun, else the
    first), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed.

    ``device``: where forward passes and large products run. ``dtype``: the model's compute
    dtype (accumulators are always float64). ``batch_size``: windows per forward pass.
    """

    device: torch.device
    dtype: torch.dtype = torch.float32
    batch_size: int = 8

    @classmethod
    def auto(cls, batch_size: int | None = None) -> Runtime:
        device = default_device()
        if batch_size is None:
            batch_size = 32 if device.type == "cuda" else 8
        return cls(device=device, batch_size=batch_size)
