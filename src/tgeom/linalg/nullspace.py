"""Numerical rank and left null spaces, in float64 (used by [BRU] identifiability, SPEC 5)."""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_RTOL = 1e-10


def singular_values(T: Tensor) -> Tensor:
    return torch.linalg.svdvals(T.double())


def numerical_rank(T: Tensor, rtol: float | None = None) -> Tensor | int:
    """Rank of ``T [..., n, m]``: singular values above ``rtol * s_max`` (default 1e-10; the
    inputs are float32 products computed in float64, so their exact rank sits far above
    float64 rounding and far below this threshold)."""
    s = singular_values(T)
    tol = (DEFAULT_RTOL if rtol is None else rtol) * s[..., :1].clamp_min(torch.finfo(s.dtype).tiny)
    rank = (s > tol).sum(-1)
    return int(rank) if rank.ndim == 0 else rank


def left_null_space(T: Tensor, rtol: float | None = None) -> Tensor:
    """Orthonormal basis ``N [n, n - rank]`` (float64) of ``{v : v^T T = 0}`` for ``T [n, m]``."""
    U, s, _ = torch.linalg.svd(T.double(), full_matrices=True)
    tol = (DEFAULT_RTOL if rtol is None else rtol) * (s[:1].max() if s.numel() else 0.0)
    rank = int((s > tol).sum()) if s.numel() else 0
    return U[:, rank:]


def null_space_projectors(T: Tensor, rtol: float | None = None) -> tuple[Tensor, Tensor]:
    """Batched ``N N^T [..., n, n]`` (projector on the left null space of each ``T [..., n, m]``)
    and the ranks ``[...]``, float64."""
    U, s, _ = torch.linalg.svd(T.double(), full_matrices=True)
    tol = (DEFAULT_RTOL if rtol is None else rtol) * s[..., :1]
    rank = (s > tol).sum(-1)  # [...]
    n = T.shape[-2]
    keep = torch.arange(n, device=T.device) >= rank[..., None]  # columns of U beyond the rank
    N = U * keep[..., None, :].to(U.dtype)
    return N @ N.transpose(-1, -2), rank
