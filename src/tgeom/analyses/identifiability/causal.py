"""Effective attention for causal (decoder) heads [BRU] (SPEC section 5), per query prefix.

[BRU] define ``A_eff = A - A N N^T`` for a bidirectional head, ``N`` spanning the left null space
of ``T = V W_O[h]`` over the whole sequence. In a decoder, query ``i`` sees only keys ``0..i``:
its output is ``a_i[:i+1] T[:i+1]``, so the part of its attention that cannot change the output
is the part in the left null space of the *prefix* ``T[:i+1]``. Projecting with the null space of
the full ``T`` instead would give query ``i`` weight on later tokens and make its effective
attention change when text is appended after it. Here, per query ``i``::

    A_eff[i, :i+1] = a_i[:i+1] - a_i[:i+1] N_i N_i^T,   N_i: left null space of T[:i+1]
    A_eff[i, i+1:] = 0

which still gives ``A_eff T = A T``, and ``A_eff[i] = a_i`` exactly when ``T[:i+1]`` has full row
rank. For the last query this is the bidirectional definition on the whole sequence.

Computation: ``T[:i+1] = M[:i+1] Q^T`` with ``M = V R^T [n, d_head]`` and ``Q`` orthonormal (see
:mod:`tgeom.analyses.identifiability.effective`), so ``a_i (I - N_i N_i^T)`` is the projection of
``a_i`` on the range of ``M_i = M[:i+1]``.

- Fast path (relative tolerances >= :data:`FAST_PATH_MIN_RTOL`, which the defaults for float32
  data are whenever ``d_model >= 84``): ``M_i G_i^+ M_i^T a_i`` with the prefix Gram matrix
  ``G_i = M_i^T M_i`` (``[d_head, d_head]``) and ``M_i^T a_i = (A M)_i`` (A is causal). Cheap
  proofs (:func:`certified_full_rank`) settle most prefixes: those proven full row rank keep
  ``a_i``; those proven full column rank use a Cholesky solve. The rest take ``G_i^+`` from a
  float64 eigendecomposition, keeping eigenvalues whose square roots (the singular values of
  ``M_i``) exceed ``rtol * s_max``: the SVD's rank rule. Eigenvalues carry absolute errors near
  ``eps64 * s_max^2``, so singular values are resolved down to about ``1e-7 s_max``, far below
  the tolerance; one step of iterative refinement against ``M`` itself removes the
  ``eps * cond^2`` error of the Gram matrix. Cost: ``O(n d_head^3)`` per head at worst (about
  3 s for SmolLM2's 30 layers on a 128-token sequence, one CPU thread); nothing beyond the
  proofs while ``n <= d_head``.
- Exact path (smaller tolerances, e.g. float64 models): an SVD of every prefix ``M_i``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

FAST_PATH_MIN_RTOL = 1e-5


def prefix_effective_attention(
    A: Tensor, M: Tensor, rtol_for: Callable[[int], float]
) -> tuple[Tensor, Tensor]:
    """Causal effective attention ``[..., n, n]`` and the rank of every prefix ``[..., n]``.

    ``A [..., n, n]``: causal attention (float64, zero above the diagonal); ``M [..., n, dh]``:
    ``V R^T`` (float64); ``rtol_for(m)``: relative rank tolerance for a prefix of ``m`` tokens.
    Rows whose prefix has full row rank keep ``A`` bit for bit. On the fast path, prefixes that
    :func:`certified_full_rank` proves full row rank cost nothing more, those it proves full
    column rank one Cholesky solve; only the rest need an eigendecomposition."""
    n, dh = M.shape[-2:]
    rows = torch.arange(n, device=M.device)
    visible = (rows[None, :] <= rows[:, None]).to(M.dtype)  # [i, j]: key j visible to query i
    rtol = torch.tensor([rtol_for(i + 1) for i in range(n)], dtype=M.dtype, device=M.device)
    if float(rtol.min()) < FAST_PATH_MIN_RTOL:
        effective, rank = _svd_projection(A * visible, M, visible, rtol, rows)
        return torch.where((rank == rows + 1).unsqueeze(-1), A, effective), rank
    row_ok, col_ok = certified_full_rank(M, rtol)
    every_row, every_col = row_ok.reshape(-1, n).all(0), col_ok.reshape(-1, n).all(0)
    rank = torch.where(row_ok, rows + 1, dh)
    effective = A.clone()
    by_cholesky = (every_col & ~every_row).nonzero()[:, 0]
    by_eigh = (~every_row & ~every_col).nonzero()[:, 0]
    for todo, path in ((by_cholesky, _cholesky_projection), (by_eigh, _gram_projection)):
        if len(todo):
            A_sub = A[..., todo, :] * visible[todo]
            eff_sub, rank_sub = path(A_sub, M, visible[todo], rtol[todo], todo)
            full_rank = (rank_sub == todo + 1).unsqueeze(-1)
            effective[..., todo, :] = torch.where(full_rank, A[..., todo, :], eff_sub)
            rank[..., todo] = rank_sub
    return effective, rank


def certified_full_rank(M: Tensor, rtol: Tensor) -> tuple[Tensor, Tensor]:
    """Cheap, conservative proofs for the prefixes ``M[:i+1]`` of ``M [..., n, dh]``: ``[..., n]``
    bools "proven full row rank" (``i < dh``) and "proven full column rank" (``i >= dh - 1``),
    meaning ``min(i + 1, dh)`` singular values above ``rtol[i] * s_max``; False: not proven.

    With ``K = M_k M_k^T = L L^T`` (``k = min(n, dh)``), the leading block of ``L^{-1}`` is the
    inverse of the leading block of ``L``, so ``s_min(M[:i+1]) >= 1 / ||L^{-1}[:i+1, :i+1]||_F``,
    a cumulative sum over rows; adding rows never lowers the ``dh``-th singular value, so the
    bound for ``M[:c+1]`` (``c >= dh - 1``, from a Cholesky factor of its ``[dh, dh]`` Gram
    matrix, at checkpoints every ``dh / 4`` rows) holds for every longer prefix;
    ``s_max <= ||M[:i+1]||_F``. Proven when the lower bound exceeds twice
    ``rtol * ||M[:i+1]||_F`` (the factor 2 absorbs the float64 error of the Gram matrices for
    ``rtol >= FAST_PATH_MIN_RTOL``)."""
    n, dh = M.shape[-2:]
    k = min(n, dh)
    Mk = M[..., :k, :]
    L, info = torch.linalg.cholesky_ex(Mk @ Mk.transpose(-1, -2))
    eye = torch.eye(k, dtype=M.dtype, device=M.device).expand_as(L)
    Linv = torch.linalg.solve_triangular(L, eye, upper=False)
    inverse_fro = torch.cumsum((Linv**2).sum(-1), dim=-1)  # ||L_i^{-1}||_F^2, [..., k]
    order = torch.arange(1, k + 1, device=M.device)
    factored = (info[..., None] == 0) | (order < info[..., None])  # leading minors that worked
    inverse_fro = torch.where(factored, inverse_fro, torch.inf)  # not factored: not proven
    fro = torch.cumsum((M**2).sum(-1), dim=-1)  # ||M_i||_F^2, [..., n]
    top = torch.linalg.eigvalsh(M.transpose(-1, -2) @ M)[..., -1:]  # s_max(M)^2 >= s_max(M_i)^2
    upper = torch.minimum(fro, top)
    row_ok = torch.zeros(M.shape[:-1], dtype=torch.bool, device=M.device)
    row_ok[..., :k] = (2 * rtol[:k]) ** 2 * inverse_fro * upper[..., :k] < 1  # NaN: not proven
    col_ok = torch.zeros_like(row_ok)
    if n >= dh:  # checkpoints c: s_dh(M[:i+1]) >= s_min(M[:c+1]) for every c <= i
        checkpoints = torch.arange(dh - 1, n, max(1, dh // 8), device=M.device)
        lowest = torch.linalg.eigvalsh(prefix_grams(M, checkpoints))[..., 0]  # [..., C]
        lowest = lowest.nan_to_num(0.0).cummax(-1).values
        i = torch.arange(dh - 1, n, device=M.device)
        latest = torch.searchsorted(checkpoints, i, right=True) - 1
        col_ok[..., dh - 1 :] = (2 * rtol[dh - 1 :]) ** 2 * upper[..., dh - 1 :] < lowest[
            ..., latest
        ]
    return row_ok, col_ok


def prefix_grams(M: Tensor, rows: Tensor) -> Tensor:
    """``G_i = M[:i+1]^T M[:i+1]`` for the prefixes ``rows [p]`` of ``M [..., n, dh]``:
    ``[..., p, dh, dh]``."""
    n = M.shape[-2]
    visible = (torch.arange(n, device=M.device)[None, :] <= rows[:, None]).to(M.dtype)  # [p, n]
    return torch.einsum("...nd,pn,...ne->...pde", M, visible, M)


def _cholesky_projection(
    A: Tensor, M: Tensor, visible: Tensor, rtol: Tensor, rows: Tensor
) -> tuple[Tensor, Tensor]:
    """Rows ``rows``, every head proven full column rank: ``G_i^{-1}`` by Cholesky, refined."""
    L, info = torch.linalg.cholesky_ex(prefix_grams(M, rows))
    if bool((info != 0).any()):  # cannot happen for proven prefixes; stay exact regardless
        return _gram_projection(A, M, visible, rtol, rows)

    def solve(rhs: Tensor) -> Tensor:
        return torch.cholesky_solve(rhs.unsqueeze(-1), L)[..., 0]

    z = solve(A @ M)
    effective = (z @ M.transpose(-1, -2)) * visible
    z = z + solve(((A - effective) * visible) @ M)  # one step of iterative refinement
    rank = torch.full(z.shape[:-1], M.shape[-1], dtype=torch.long, device=M.device)
    return (z @ M.transpose(-1, -2)) * visible, rank


def _gram_projection(
    A: Tensor, M: Tensor, visible: Tensor, rtol: Tensor, rows: Tensor
) -> tuple[Tensor, Tensor]:
    """Rows ``rows`` (``A``, ``visible``, ``rtol`` already cut to them) by prefix Grams."""
    G = prefix_grams(M, rows)  # [..., p, dh, dh]
    lam, W = torch.linalg.eigh(G)  # ascending
    s = lam.clamp_min(0).sqrt()
    keep = s > rtol[:, None] * s[..., -1:].clamp_min(torch.finfo(s.dtype).tiny)
    inv = torch.where(keep, 1.0 / lam.clamp_min(torch.finfo(s.dtype).tiny), 0.0)  # [..., n, dh]

    def solve(rhs: Tensor) -> Tensor:  # G_i^+ rhs_i for every prefix i: [..., n, dh]
        return (W @ (inv * (W.transpose(-1, -2) @ rhs.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1))[
            ..., 0
        ]

    z = solve(A @ M)  # coefficients of each row's projection in the basis of M's columns
    effective = (z @ M.transpose(-1, -2)) * visible
    z = z + solve(((A - effective) * visible) @ M)  # one step of iterative refinement
    return (z @ M.transpose(-1, -2)) * visible, keep.sum(-1)


def _svd_projection(
    A: Tensor, M: Tensor, visible: Tensor, rtol: Tensor, rows: Tensor
) -> tuple[Tensor, Tensor]:
    """Rows ``rows`` (``A``, ``visible``, ``rtol`` already cut to them) by prefix SVDs."""
    Mp = M.unsqueeze(-3) * visible[..., None]  # [..., p, n, dh]: prefix i, later rows zeroed
    U, s, _ = torch.linalg.svd(Mp, full_matrices=False)  # U [..., n, n, k]
    keep = s > rtol[:, None] * s[..., :1].clamp_min(torch.finfo(s.dtype).tiny)
    U = U * keep.unsqueeze(-2).to(U.dtype)
    a = A.unsqueeze(-2)  # [..., n(i), 1, n(j)]
    return ((a @ U) @ U.transpose(-1, -2)).squeeze(-2) * visible, keep.sum(-1)
