"""Effective attention of bidirectional heads over a whole sequence [BRU] (SPEC section 5).

``A_eff = A - A N N^T = A P`` with ``P`` the projector on the range of ``T = V W_O[h]``, i.e. of
``M = V R^T [n, d_head]`` (``W_O = R^T Q^T``, ``Q`` orthonormal; see
:mod:`tgeom.analyses.identifiability.effective`). The rank counts singular values of ``M`` above
``rtol * s_max``.

- Fast path (``rtol >= FAST_PATH_MIN_RTOL``, true of the float32 defaults whenever
  ``d_model >= 84``): ``P = M G^+ M^T`` with ``G = M^T M [d_head, d_head]`` from a float64
  eigendecomposition (singular values resolved down to about ``1e-7 s_max``, far below the
  tolerance) and, when some head's ``eps * cond(M)^2`` exceeds 1e-10, one step of iterative
  refinement against ``M`` (removes that error of the Gram matrix). About three times cheaper
  than an SVD of ``M``.
- Exact path (smaller tolerances): a thin SVD of ``M``.

Heads whose ``T`` has full row rank keep ``A`` bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tgeom.analyses.identifiability.causal import FAST_PATH_MIN_RTOL


def sequence_effective_attention(A: Tensor, M: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
    """``A_eff [..., n, n]`` and ``rank [...]`` for attention ``A [..., n, n]`` and
    ``M [..., n, dh]`` (both float64)."""
    n = M.shape[-2]
    if rtol >= FAST_PATH_MIN_RTOL:
        lam, W = torch.linalg.eigh(M.transpose(-1, -2) @ M)  # ascending
        keep = _kept(lam.clamp_min(0).sqrt().flip(-1), rtol).flip(-1)
        inv = torch.where(keep, 1.0 / lam.clamp_min(torch.finfo(lam.dtype).tiny), 0.0)

        def solve(rhs: Tensor) -> Tensor:  # rows of rhs times G^+
            return ((rhs @ W) * inv.unsqueeze(-2)) @ W.transpose(-1, -2)

        Z = solve(A @ M)  # A_eff = Z M^T
        kept_min = torch.where(keep, lam, torch.inf).amin(-1)
        if float((lam[..., -1] / kept_min).max()) * torch.finfo(lam.dtype).eps > 1e-10:
            Z = Z + solve((A - Z @ M.transpose(-1, -2)) @ M)  # one step of iterative refinement
        effective = Z @ M.transpose(-1, -2)
    else:
        U, s, _ = torch.linalg.svd(M, full_matrices=False)
        keep = _kept(s, rtol)
        U = U * keep.unsqueeze(-2).to(U.dtype)
        effective = (A @ U) @ U.transpose(-1, -2)
    rank = keep.sum(-1)
    return torch.where((rank == n)[..., None, None], A, effective), rank


def sequence_rank(M: Tensor, rtol: float) -> Tensor:
    """Rank ``[...]`` of ``M [..., n, dh]`` (float64) at the relative tolerance, by the same rule
    and path as :func:`sequence_effective_attention`."""
    if rtol >= FAST_PATH_MIN_RTOL:
        s = torch.linalg.eigvalsh(M.transpose(-1, -2) @ M).clamp_min(0).sqrt().flip(-1)
    else:
        s = torch.linalg.svdvals(M)
    return _kept(s, rtol).sum(-1)


def _kept(s: Tensor, rtol: float) -> Tensor:
    """Singular values ``s [..., k]`` (largest first) above ``rtol * s_max``."""
    return s > rtol * s[..., :1].clamp_min(torch.finfo(s.dtype).tiny)
