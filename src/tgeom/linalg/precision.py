"""Where a bfloat16 / float16 model's tensors meet linear algebra: computed in float32 or better.

A model loaded in a low precision runs its forward passes in it; what reads its weights or
activations (vocabulary scores, rankings, sums) widens them first, a few thousand rows at a time
where a whole-matrix copy would cost as much as the weights themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOW_PRECISION = (torch.bfloat16, torch.float16)
CHUNK_ROWS = 4096


def widened(t: Tensor) -> Tensor:
    """``t`` in float32 when it is bfloat16 / float16, else ``t`` itself."""
    return t.float() if t.dtype in LOW_PRECISION else t


def wide_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any of ``tensors`` is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def scores_against(x: Tensor, E: Tensor, chunk_rows: int = CHUNK_ROWS) -> Tensor:
    """``x @ E.T`` (``x [n, d]``, ``E [V, d]``) -> ``[n, V]`` on ``E``'s device, in float32 or
    better (:func:`wide_dtype`); a low-precision ``E`` is widened ``chunk_rows`` rows at a time."""
    dtype = wide_dtype(x, E)
    x = x.to(E.device, dtype)
    if E.dtype == dtype:
        return x @ E.T
    return torch.cat([x @ part.to(dtype).T for part in E.split(chunk_rows)], dim=-1)
