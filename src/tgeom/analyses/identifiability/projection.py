"""Effective attention of bidirectional heads over a whole sequence [BRU] (SPEC section 5).

``A_eff = A - A N N^T = A P`` with ``P`` the projector on the range of ``T = V W_O[h]``, i.e. of
``M = V R^T [n, d_head]`` (``W_O = R^T Q^T``, ``Q`` orthonormal; see
:mod:`tgeom.analyses.identifiability.effective`). The rank counts singular values of ``M`` above
``rtol * s_max``.

- Fast path (``rtol >= FAST_PATH_MIN_RTOL``, true of the float32 defaults whenever
  ``d_model >= 84``), for heads that a Cholesky factor *proves* full rank
  (:func:`certified_full_rank`; every head of MiniLM and SmolLM2 on real text): ``A`` itself
  when ``n <= d_head``, else ``A M G^{-1} M^T`` with ``G = M^T M`` from that factor (one step of
  iterative refinement when the certified ``eps * cond(M)^2`` exceeds 1e-10). No
  eigendecomposition.
- Other heads, same tolerances: ``P = M G^+ M^T`` from a float64 eigendecomposition of ``G``
  (singular values resolved down to about ``1e-7 s_max``, far below the tolerance) and, when
  some head's ``eps * cond(M)^2`` exceeds 1e-10, one step of iterative refinement against ``M``
  (removes that error of the Gram matrix).
- Exact path (smaller tolerances): a thin SVD of ``M``.

Heads whose ``T`` has full row rank keep ``A`` bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tgeom.analyses.identifiability.causal import FAST_PATH_MIN_RTOL
from tgeom.errors import check_finite


def sequence_effective_attention(
    A: Tensor, M: Tensor, rtol: float, *, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``A_eff [..., n, n]`` and ``rank [...]`` for attention ``A [..., n, n]`` and
    ``M [..., n, dh]`` (both float64); ``A_eff`` is written into ``out`` when given (a
    contiguous float64 tensor shaped like ``A``)."""
    check_finite("the attention", A)
    check_finite("the value-output factor", M)
    n = M.shape[-2]
    batch = M.shape[:-2]
    if rtol < FAST_PATH_MIN_RTOL:
        U, s, _ = torch.linalg.svd(M, full_matrices=False)
        keep = _kept(s, rtol)
        U = U * keep.unsqueeze(-2).to(U.dtype)
        rank = keep.sum(-1)
        effective = torch.where((rank == n)[..., None, None], A, (A @ U) @ U.transpose(-1, -2))
        return _into(out, effective), rank
    A_flat, M_flat = A.reshape(-1, n, n), M.reshape(-1, *M.shape[-2:])
    proven, factor, cond2 = certified_full_rank(M_flat, rtol)
    if bool(proven.all()):  # the common case: no gather, no scatter
        flat_out = out.view(-1, n, n) if out is not None else None
        effective, rank = _proven_projection(A_flat, M_flat, factor, cond2, out=flat_out)
        return effective.reshape(A.shape), rank.reshape(batch)
    effective = torch.empty_like(A_flat)
    rank = torch.empty(proven.shape, dtype=torch.long, device=M.device)
    done = proven.nonzero()[:, 0]
    if len(done):
        effective[done], rank[done] = _proven_projection(
            A_flat[done], M_flat[done], factor[done], cond2[done]
        )
    rest = (~proven).nonzero()[:, 0]
    if len(rest):
        effective[rest], rank[rest] = _gram_projection(A_flat[rest], M_flat[rest], rtol)
    return _into(out, effective.reshape(A.shape)), rank.reshape(batch)


def _into(out: Tensor | None, value: Tensor) -> Tensor:
    return value if out is None else out.copy_(value)


def certified_full_rank(M: Tensor, rtol: float) -> tuple[Tensor, Tensor, Tensor]:
    """Cheap, conservative proof that ``M [b, n, dh]`` has full rank ``min(n, dh)`` at the
    tolerance (every singular value above ``rtol * s_max``), and the factor the projection needs.

    With ``K = M^T M`` (``n >= dh``) or ``M M^T`` (``n < dh``) ``= L L^T`` (Cholesky), ``s_min^2
    >= 1 / ||L^{-1}||_F^2`` and ``s_max^2 <= ||K||_F``, so ``c = ||K||_F ||L^{-1}||_F^2 >=
    cond(M)^2``; proven when ``(2 rtol)^2 c < 1`` (the factor 2 absorbs the float64 error of
    ``K``). Returns ``proven [b]``, ``L^{-1} [b, m, m]`` (``m = min(n, dh)``; meaningful where
    proven) and ``c [b]``."""
    K = M.transpose(-1, -2) @ M if M.shape[-2] >= M.shape[-1] else M @ M.transpose(-1, -2)
    L, info = torch.linalg.cholesky_ex(K)
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device).expand_as(K)
    L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
    cond2 = torch.linalg.matrix_norm(K) * (L_inv**2).sum((-1, -2))
    return (info == 0) & ((2 * rtol) ** 2 * cond2 < 1), L_inv, cond2


def _proven_projection(
    A: Tensor, M: Tensor, L_inv: Tensor, cond2: Tensor, *, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Heads proven full rank: ``A`` itself when ``n <= dh`` (full row rank: nothing is in the
    null space), else ``(A Q) Q^T`` with ``Q = M L^{-T}`` (orthonormal columns spanning the
    range of ``M``), plus one step of iterative refinement when the certified
    ``eps * cond(M)^2`` exceeds 1e-10."""
    n, dh = M.shape[-2:]
    if n <= dh:
        return _into(out, A), torch.full(A.shape[:-2], n, dtype=torch.long, device=A.device)
    Q = M @ L_inv.transpose(-1, -2)
    Qt = Q.transpose(-1, -2).contiguous()  # a contiguous right factor: faster batched GEMM
    Z = A @ Q  # A_eff = Z Q^T
    if float(cond2.max()) * torch.finfo(A.dtype).eps > 1e-10:
        Z = Z + (A - Z @ Qt) @ Q
    effective = torch.matmul(Z, Qt, out=out) if out is not None else Z @ Qt
    return effective, torch.full(A.shape[:-2], dh, dtype=torch.long, device=A.device)


def _gram_projection(A: Tensor, M: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
    """Any head: ``P = M G^+ M^T`` from a float64 eigendecomposition of ``G = M^T M``
    (singular values resolved down to about ``1e-7 s_max``), with one step of iterative
    refinement when some head's ``eps * cond(M)^2`` exceeds 1e-10."""
    n = M.shape[-2]
    lam, W = torch.linalg.eigh(M.transpose(-1, -2) @ M)  # ascending
    keep = _kept(lam.clamp_min(0).sqrt().flip(-1), rtol).flip(-1)
    inv = torch.where(keep, 1.0 / lam.clamp_min(torch.finfo(lam.dtype).tiny), 0.0)

    def solve(rhs: Tensor) -> Tensor:  # rows of rhs times G^+
        return ((rhs @ W) * inv.unsqueeze(-2)) @ W.transpose(-1, -2)

    Z = solve(A @ M)  # A_eff = Z M^T
    kept_min = torch.where(keep, lam, torch.inf).amin(-1)
    if float((lam[..., -1] / kept_min).max()) * torch.finfo(lam.dtype).eps > 1e-10:
        Z = Z + solve((A - Z @ M.transpose(-1, -2)) @ M)  # one step of iterative refinement
    rank = keep.sum(-1)
    return torch.where((rank == n)[..., None, None], A, Z @ M.transpose(-1, -2)), rank


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
