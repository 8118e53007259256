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

from dataclasses import dataclass

import torch
from torch import Tensor

from tgeom.analyses.identifiability.causal import FAST_PATH_MIN_RTOL
from tgeom.errors import check_finite


def sequence_effective_attention(
    A: Tensor,
    M: Tensor,
    rtol: float,
    *,
    out: Tensor | None = None,
    right: Tensor | None = None,
    right_cond2: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``A_eff [..., H, n, n]`` and ``rank [..., H]`` for attention ``A [..., H, n, n]`` and
    ``M [..., H, n, dh]`` (both float64); ``A_eff`` is written into ``out`` when given (a
    contiguous float64 tensor shaped like ``A``). ``right``/``right_cond2``: see
    :meth:`HeadProjectors.build` (the second argument is then ``V``)."""
    n, dh = M.shape[-2:]
    projectors = HeadProjectors.build(M.reshape(-1, n, dh), rtol, right, right_cond2)
    A_flat = A.reshape(-1, n, n)
    flat_out = out.view(-1, n, n) if out is not None else torch.empty_like(A_flat)
    projectors.apply(A_flat, slice(None), flat_out)
    return flat_out.reshape(A.shape), projectors.rank.reshape(M.shape[:-2])


@dataclass
class HeadProjectors:
    """The projector on the range of ``T`` of each of ``b`` heads (sequences of one length
    ``n``), built once from the values and then applied to the attention chunk by chunk.

    ``A_eff = (A Q) Q^T`` with ``Q [b, n, dh]`` orthonormal columns spanning the kept range
    (columns of dropped directions are zero); heads with ``keep[h]`` (full row rank: trivial null
    space) keep ``A`` bit for bit. ``refine``: one step of iterative refinement, for bases built
    from a Gram matrix whose certified ``eps * cond(M)^2`` exceeds 1e-10."""

    rank: Tensor
    keep: Tensor
    Q: Tensor
    Qt: Tensor
    refine: bool

    @classmethod
    def build(
        cls,
        M: Tensor,
        rtol: float,
        right: Tensor | None = None,
        right_cond2: Tensor | None = None,
    ) -> HeadProjectors:
        """From ``M [b, n, dh]`` (float64). With ``right [H, dh, dh]`` (and ``right_cond2 [H]``,
        upper bounds of ``cond(right)^2``; head of row ``i`` is ``i % H``) the argument is ``V``
        and the matrix of the rank rule is ``M = V right``: when ``right`` is invertible, ``M``
        has the range of ``V``, so a head whose ``V`` *proves* ``M`` full rank (``cond(M) <=
        cond(V) cond(right)``) takes its basis from ``V``; ``M`` is formed for the others."""
        check_finite("the value-output factor", M)
        b, n = M.shape[:2]
        heads = torch.arange(b, device=M.device) % (right.shape[0] if right is not None else 1)
        if rtol < FAST_PATH_MIN_RTOL:
            if right is not None:
                M = M @ right[heads]
            U, s, _ = torch.linalg.svd(M, full_matrices=False)
            kept = _kept(s, rtol)
            Q = U * kept.unsqueeze(-2).to(U.dtype)
            rank = kept.sum(-1)
            return cls(rank, rank == n, Q, Q.transpose(-1, -2).contiguous(), False)
        proven, L_inv, cond2 = certified_full_rank(M, rtol)  # cond2 >= cond(M)^2 (or V's)
        if right is not None:
            assert right_cond2 is not None
            proven &= (2 * rtol) ** 2 * cond2 * right_cond2[heads] < 1  # >= cond(V right)^2
        base = cls._proven(M, L_inv, cond2, proven)
        if bool(proven.all()):  # the common case
            return base
        rest = (
            cls.build(M[~proven] @ right[heads[~proven]], rtol)  # form M for these heads
            if right is not None
            else cls._gram(M[~proven], rtol)
        )
        return cls._merge(base, proven, rest)

    @classmethod
    def _proven(cls, M: Tensor, L_inv: Tensor, cond2: Tensor, proven: Tensor) -> HeadProjectors:
        """Heads proven full rank (the others: placeholders, to be replaced): ``A`` itself when
        ``n <= dh``, else ``Q = M L^{-T}``."""
        b, n, dh = M.shape
        rank = torch.full((b,), min(n, dh), dtype=torch.long, device=M.device)
        if n <= dh:  # full row rank: nothing is in the null space
            Qt = torch.zeros(b, dh, n, dtype=M.dtype, device=M.device)
            return cls(rank, torch.ones(b, dtype=torch.bool, device=M.device), Qt.mT, Qt, False)
        Qt = L_inv @ M.transpose(-1, -2)  # [b, dh, n], contiguous: the faster GEMM operand
        worst = float(cond2[proven].max()) if bool(proven.any()) else 0.0
        refine = worst * torch.finfo(M.dtype).eps > 1e-10
        keep = torch.zeros(b, dtype=torch.bool, device=M.device)
        return cls(rank, keep, Qt.transpose(-1, -2), Qt, refine)

    @classmethod
    def _gram(cls, M: Tensor, rtol: float) -> HeadProjectors:
        """Any head: ``Q = M W diag(lam^{-1/2})`` over the kept eigenpairs of ``G = M^T M``
        (float64 eigendecomposition: singular values resolved down to about ``1e-7 s_max``)."""
        n = M.shape[-2]
        lam, W = torch.linalg.eigh(M.transpose(-1, -2) @ M)  # ascending
        kept = _kept(lam.clamp_min(0).sqrt().flip(-1), rtol).flip(-1)
        scale = torch.where(kept, lam.clamp_min(torch.finfo(lam.dtype).tiny).rsqrt(), 0.0)
        Q = (M @ W) * scale.unsqueeze(-2)
        kept_min = torch.where(kept, lam, torch.inf).amin(-1)
        refine = float((lam[..., -1] / kept_min).max()) * torch.finfo(lam.dtype).eps > 1e-10
        rank = kept.sum(-1)
        return cls(rank, rank == n, Q, Q.transpose(-1, -2).contiguous(), refine)

    @classmethod
    def _merge(cls, base: HeadProjectors, proven: Tensor, rest: HeadProjectors) -> HeadProjectors:
        """``base`` where ``proven``, ``rest`` (one row per unproven head, in order) elsewhere."""
        rank, keep, Q = base.rank.clone(), base.keep.clone(), base.Q.clone()
        rank[~proven], keep[~proven], Q[~proven] = rest.rank, rest.keep, rest.Q
        return cls(rank, keep, Q, Q.transpose(-1, -2).contiguous(), base.refine or rest.refine)

    def keeps_all(self, heads: slice) -> bool:
        """Whether every head of ``heads`` keeps ``A`` (then :meth:`apply` takes ``A`` in any
        dtype)."""
        return bool(self.keep[heads].all())

    def apply(self, A: Tensor, heads: slice, out: Tensor) -> Tensor:
        """``A_eff [k, n, n]`` into ``out`` for attention ``A [k, n, n]`` (float64) of the heads
        ``heads`` (a slice of the ``b`` heads)."""
        keep = self.keep[heads]
        if bool(keep.all()):
            check_finite("the attention", A)
            return out.copy_(A)
        Q, Qt = self.Q[heads], self.Qt[heads]
        Z = A @ Q
        check_finite("the attention", Z)  # NaN/inf anywhere in A reaches A Q
        if self.refine:
            Z = Z + (A - Z @ Qt) @ Q
        torch.matmul(Z, Qt, out=out)
        if bool(keep.any()):
            out[keep] = A[keep]
        return out


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
