"""Numerical rank and left null spaces, in float64 (used by [BRU] identifiability, SPEC 5).

The rank counts singular values above ``rtol * s_max``. The default relative tolerance follows
the usual convention for the precision the matrix was *stored* in: ``max(n, m) * eps(dtype)``
(float32 inputs: about ``1e-7 * max(n, m)``), so float32 rounding of an exactly rank-deficient
matrix does not count as rank. The decomposition itself always runs in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tgeom.errors import check_finite


def default_rtol(n: int, m: int, dtype: torch.dtype) -> float:
    """``max(n, m) * eps(dtype)``, the relative rank tolerance for data stored in ``dtype``."""
    eps = torch.finfo(dtype if dtype.is_floating_point else torch.float64).eps
    return max(n, m, 1) * eps


def singular_values(T: Tensor) -> Tensor:
    """Singular values ``[..., min(n, m)]`` of ``T [..., n, m]`` in float64, largest first."""
    return torch.linalg.svdvals(check_finite("the matrix", T).double())


def numerical_rank(T: Tensor, rtol: float | None = None) -> Tensor | int:
    """Rank of ``T [..., n, m]``: singular values above ``rtol * s_max`` (default
    :func:`default_rtol` for ``T``'s dtype); an int for one matrix, a tensor ``[...]`` else."""
    n, m = T.shape[-2:]
    rtol = default_rtol(n, m, T.dtype) if rtol is None else rtol
    s = singular_values(T)
    tol = rtol * s[..., :1].clamp_min(torch.finfo(s.dtype).tiny)
    rank = (s > tol).sum(-1)
    return int(rank) if rank.ndim == 0 else rank


def left_null_space(T: Tensor, rtol: float | None = None) -> Tensor:
    """Orthonormal basis ``N [n, n - rank]`` (float64) of ``{v : v^T T = 0}`` for ``T [n, m]``
    (full SVD: the slow, obvious route, used as the reference)."""
    n, m = T.shape
    rtol = default_rtol(n, m, T.dtype) if rtol is None else rtol
    U, s, _ = torch.linalg.svd(check_finite("the matrix", T).double(), full_matrices=True)
    tol = rtol * (float(s[0]) if s.numel() else 0.0)
    rank = int((s > tol).sum()) if s.numel() else 0
    return U[:, rank:]


def null_space_projectors(T: Tensor, rtol: float | None = None) -> tuple[Tensor, Tensor]:
    """Batched ``N N^T [..., n, n]`` (projector on the left null space of each ``T [..., n, m]``)
    and the ranks ``[...]``, float64."""
    n, m = T.shape[-2:]
    rtol = default_rtol(n, m, T.dtype) if rtol is None else rtol
    U, s, _ = torch.linalg.svd(check_finite("the matrix", T).double(), full_matrices=True)
    tol = rtol * s[..., :1]
    rank = (s > tol).sum(-1)  # [...]
    keep = torch.arange(n, device=T.device) >= rank[..., None]  # columns of U beyond the rank
    N = U * keep[..., None, :].to(U.dtype)
    return N @ N.transpose(-1, -2), rank
