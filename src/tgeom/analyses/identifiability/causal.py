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
  data are whenever ``d_model >= 84``). With ``tau = 1.1 rtol s`` (``s^2 = ||M^T M||_F``, an
  upper bound of every prefix's ``s_max^2``; the factor 1.1 absorbs the float64 error of the
  Gram matrices), :func:`certified_full_rank` proves, by *shifted* Cholesky factorisations,

  * full row rank for every prefix ``i < d_head`` whose leading block of ``M M^T - tau^2 I``
    is positive definite (one factorisation gives every leading block at once), and
  * full column rank for every prefix ``i >= c`` with ``M[:c+1]^T M[:c+1] - tau^2 I`` positive
    definite (``s_dh`` never falls as rows are added, so ``c`` is found by bisection).

  Rows proven full row rank keep ``a_i``. Rows proven full column rank need
  ``z_i = G_i^{-1} (A M)_i`` for every prefix Gram ``G_i = M_i^T M_i``; all of them come from one
  anchor: with ``G_c = L L^T`` and ``X = M[c+1:] L^{-T}``, ``G_i^{-1} = L^{-T} (I - Y_i^T Y_i)
  L^{-1}`` where ``Y = chol(I + X X^T)^{-1} X`` and ``Y_i`` its rows up to ``i`` (leading blocks
  of one Cholesky factor: Woodbury), then one step of iterative refinement against ``M`` itself.
  Cost ``O(n^2 d_head)`` per head, like the attention itself: no ``[n, d_head, d_head]``
  per-prefix matrices. Only the rows proven neither way (a rank-deficient or borderline prefix,
  e.g. repeated tokens where values carry no position) take a float64 eigendecomposition of
  their prefix Gram matrix, keeping eigenvalues whose square roots exceed ``rtol * s_max`` (the
  SVD's rank rule), refined the same way.
- Exact path (smaller tolerances, e.g. float64 models): an SVD of every prefix ``M_i``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from tgeom.errors import check_finite

FAST_PATH_MIN_RTOL = 1e-5


def prefix_effective_attention(
    A: Tensor, M: Tensor, rtol_for: Callable[[int], float], *, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Causal effective attention ``[..., n, n]`` and the rank of every prefix ``[..., n]``;
    written into ``out`` when given (a contiguous float64 tensor shaped like ``A``).

    ``A [..., n, n]``: causal attention (float64, zero above the diagonal); ``M [..., n, dh]``:
    ``V R^T`` (float64); ``rtol_for(m)``: relative rank tolerance for a prefix of ``m`` tokens.
    Rows whose prefix has full row rank keep ``A`` bit for bit. On the fast path, prefixes that
    :func:`certified_full_rank` proves full row rank cost nothing more, those it proves full
    column rank share one anchored Woodbury solve per head; only the rest need an
    eigendecomposition."""
    check_finite("the attention", A)
    check_finite("the value-output factor", M)
    n, dh = M.shape[-2:]
    rows = torch.arange(n, device=M.device)
    visible = (rows[None, :] <= rows[:, None]).to(M.dtype)  # [i, j]: key j visible to query i
    rtol = torch.tensor([rtol_for(i + 1) for i in range(n)], dtype=M.dtype, device=M.device)
    if float(rtol.min()) < FAST_PATH_MIN_RTOL:
        effective, rank = _svd_projection(A * visible, M, visible, rtol, rows)
        effective = torch.where((rank == rows + 1).unsqueeze(-1), A, effective)
        return (effective if out is None else out.copy_(effective)), rank
    batch = M.shape[:-2]
    A_f, M_f = A.reshape(-1, n, n), M.reshape(-1, n, dh)
    cert = _certify(M_f, float(rtol.max()))
    rank = torch.where(cert.row_ok, cert.distinct, dh)
    effective = A_f.clone() if out is None else out.view(-1, n, n).copy_(A_f)
    heads = cert.repeated.any(-1).nonzero()[:, 0]
    if len(heads):  # repeated rows, distinct rows independent: average over each class
        averaged = _class_average(A_f[heads], cert.first[heads], visible)
        effective[heads] = torch.where(cert.repeated[heads].unsqueeze(-1), averaged, A_f[heads])
    heads = cert.col_ok.any(-1).nonzero()[:, 0]
    if len(heads):  # rows proven full column rank: one anchored solve per head
        start, anchored = _anchored_projection(A_f[heads], M_f[heads], visible, cert.anchor[heads])
        proven = (cert.col_ok[heads] & ~cert.row_ok[heads])[:, start:, None]
        effective[heads, start:] = torch.where(proven, anchored, effective[heads, start:])
    pairs = (~(cert.row_ok | cert.col_ok)).nonzero()  # [P, 2]: (head, row) proven neither way
    if len(pairs):
        eff_rows, rank_rows = _gram_projection(A_f, M_f, rtol, pairs)
        head, row = pairs[:, 0], pairs[:, 1]
        full_rank = (rank_rows == row + 1).unsqueeze(-1)
        effective[head, row] = torch.where(full_rank, A_f[head, row], eff_rows)
        rank[head, row] = rank_rows
    return effective.reshape(A.shape), rank.reshape(*batch, n)


@dataclass
class _Certificate:
    """Per head ``[b, n]``: ``row_ok`` (prefix proven to have rank ``distinct``: its distinct
    rows are independent), ``distinct`` (distinct rows in the prefix), ``first`` (index of the
    first row equal to row ``t``), ``col_ok`` (proven full column rank); ``anchor [b]``: the first
    row proven full column rank (``n`` when none)."""

    row_ok: Tensor
    distinct: Tensor
    first: Tensor
    col_ok: Tensor
    anchor: Tensor

    @property
    def repeated(self) -> Tensor:
        """Rows proven by their distinct rows whose prefix repeats a row: class averages."""
        rows = torch.arange(self.row_ok.shape[-1], device=self.row_ok.device)
        return self.row_ok & (self.distinct < rows + 1)


def certified_full_rank(M: Tensor, rtol: Tensor) -> tuple[Tensor, Tensor]:
    """Proofs for the prefixes ``M[:i+1]`` of ``M [..., n, dh]``: ``[..., n]`` bools "proven full
    row rank" (``i < dh``) and "proven full column rank" (``i >= dh - 1``), meaning
    ``min(i + 1, dh)`` singular values above ``rtol[i] * s_max(M[:i+1])``; False: not proven.
    See the module docstring (shifted Cholesky factorisations, threshold ``1.1 max(rtol) s``)."""
    n, dh = M.shape[-2:]
    cert = _certify(M.reshape(-1, n, dh), float(rtol.max()))
    full_row = cert.row_ok & ~cert.repeated
    return full_row.reshape(M.shape[:-1]), cert.col_ok.reshape(M.shape[:-1])


def repeated_rows(M: Tensor) -> Tensor:
    """``first [b, n]``: for each row ``t`` of ``M [b, n, dh]``, the index of the first row
    bitwise equal to it (``t`` itself when it is new). A repeated token gives repeated value rows
    where the attention input carries no position (RoPE models' first layer)."""
    n, dh = M.shape[-2:]
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(dh, generator=generator, dtype=M.dtype).to(M.device)
    key = M @ probe  # equal rows have equal keys; equal keys are checked row by row
    rows = torch.arange(n, device=M.device)
    candidate = (key[:, :, None] == key[:, None, :]) & (rows[None, :] < rows[:, None])
    same = torch.zeros_like(candidate)
    if bool(candidate.any()):
        h, t, j = candidate.nonzero().unbind(-1)
        exact = (M[h, t] == M[h, j]).all(-1)
        same[h[exact], t[exact], j[exact]] = True
    same |= torch.eye(n, dtype=torch.bool, device=M.device)
    return same.to(torch.uint8).argmax(-1)  # the first equal row (argmax: first maximum)


def _certify(M: Tensor, rtol: float) -> _Certificate:
    """:func:`certified_full_rank` for ``M [b, n, dh]`` and one tolerance, with the anchors."""
    b, n, dh = M.shape
    G = M.transpose(-1, -2) @ M
    shift = (1.1 * rtol) ** 2 * torch.linalg.matrix_norm(G)  # tau^2 >= (1.1 rtol s_max(M_i))^2
    k = min(n, dh)
    rows = torch.arange(n, device=M.device)
    first = repeated_rows(M)
    new_row = first == rows
    distinct = new_row.cumsum(-1)  # distinct rows in each prefix, [b, n]
    # the first k distinct rows of each head, in order (zero rows pad heads with fewer)
    picked = torch.sort((~new_row).to(torch.uint8), dim=-1, stable=True).indices[:, :k]
    valid = torch.arange(k, device=M.device)[None, :] < distinct[:, -1:]
    D = torch.gather(M, 1, picked[..., None].expand(b, k, dh)) * valid[..., None]
    eye_k = torch.eye(k, dtype=M.dtype, device=M.device)
    info = torch.linalg.cholesky_ex(D @ D.transpose(-1, -2) - shift[:, None, None] * eye_k).info
    positive = torch.where(info == 0, k, info - 1)  # leading distinct rows that factored
    # repeating a row adds nothing to the range and scales no singular value down (weights >= 1)
    row_ok = distinct <= positive[:, None]
    col_ok = torch.zeros_like(row_ok)
    anchor = torch.full((b,), n, dtype=torch.long, device=M.device)
    if n >= dh:
        eye = torch.eye(dh, dtype=M.dtype, device=M.device)

        def proven(heads: Tensor, rows: Tensor) -> Tensor:  # is G_row - tau^2 I pos. definite
            shifted = prefix_gram_per_head(M[heads], rows) - shift[heads, None, None] * eye
            return torch.linalg.cholesky_ex(shifted).info == 0

        # smallest c in [dh - 1, n - 1] with a proof (monotone in c); n when there is none.
        # Most heads have one at dh - 1 already: try it first, bisect only the others.
        lo = torch.full((b,), dh - 1, dtype=torch.long, device=M.device)
        every = torch.arange(b, device=M.device)
        hi = torch.where(proven(every, lo), lo, n)  # invariant: proof at hi (or hi = n)
        lo = torch.where(hi == lo, lo, lo + 1)
        while bool((lo < hi).any()):
            active = (lo < hi).nonzero()[:, 0]
            mid = torch.div(lo[active] + hi[active], 2, rounding_mode="floor")
            ok = proven(active, mid)
            hi[active] = torch.where(ok, mid, hi[active])
            lo[active] = torch.where(ok, lo[active], mid + 1)
        anchor = hi
        col_ok = rows[None, :] >= anchor[:, None]
    return _Certificate(row_ok, distinct, first, col_ok, anchor)


def _class_average(A: Tensor, first: Tensor, visible: Tensor) -> Tensor:
    """``A_eff [b, n, n]`` when each prefix's distinct rows are independent: the range of ``M_i``
    is then the vectors constant on each class of equal rows, so ``a_eff_i[t]`` is the mean of
    ``a_i`` over the rows ``<= i`` equal to row ``t``."""
    n = A.shape[-1]
    onehot = torch.nn.functional.one_hot(first, n).to(A.dtype)  # [b, n(t), n(class)]
    sums = A @ onehot  # [b, n(i), n(class)]: A is causal, so only rows <= i count
    counts = onehot.cumsum(-2)  # [b, n(i), n(class)]: members among the rows <= i
    means = torch.where(counts > 0, sums / counts.clamp_min(1), 0.0)
    return (means @ onehot.transpose(-1, -2)) * visible


def prefix_gram_per_head(M: Tensor, rows: Tensor) -> Tensor:
    """``G = M[h, :rows[h]+1]^T M[h, :rows[h]+1]`` for each head of ``M [b, n, dh]``: ``[b, dh,
    dh]``."""
    mask = (torch.arange(M.shape[-2], device=M.device)[None, :] <= rows[:, None]).to(M.dtype)
    return M.transpose(-1, -2) @ (M * mask[..., None])


def _anchored_projection(
    A: Tensor, M: Tensor, visible: Tensor, anchor: Tensor
) -> tuple[int, Tensor]:
    """Effective attention of the rows ``i >= anchor[h]`` for heads whose prefix
    ``M[:anchor+1]`` has full column rank: ``z_i = G_i^{-1} (A M)_i`` by the anchored Woodbury
    identity of the module docstring, ``a_eff_i = z_i M_i^T``, then one step of iterative
    refinement. Returns ``start = min(anchor)`` and the rows ``start..n-1`` ``[b, n - start,
    n]`` (rows before a head's own anchor: not meaningful); earlier rows are never computed."""
    n = M.shape[-2]
    rows = torch.arange(n, device=M.device)
    later = (rows[None, :] > anchor[:, None]).to(M.dtype)  # [b, n]: rows after the anchor
    start = int(anchor.min())  # the first query row any head needs
    first = start + 1  # rows before this are at or before every anchor
    L = torch.linalg.cholesky(prefix_gram_per_head(M, anchor))  # G_c = L L^T
    Lt = L.transpose(-1, -2)
    X = torch.linalg.solve_triangular(
        Lt, M[:, first:] * later[:, first:, None], upper=True, left=False
    )  # rows after the anchor, whitened: [b, m, dh]
    eye = torch.eye(n - first, dtype=M.dtype, device=M.device)
    LK = torch.linalg.cholesky(eye + X @ X.transpose(-1, -2))
    Y = torch.linalg.solve_triangular(LK, X, upper=False)  # [b, m, dh]
    Yt = Y.transpose(-1, -2).contiguous()
    sees = visible[start:, first:]  # [n - start, m]: query i sees the added row t
    shown = visible[start:]  # [n - start, n]: the keys each needed query sees

    def solve(C: Tensor) -> Tensor:  # rows c_i -> z_i = G_i^{-1} c_i, [b, n - start, dh]
        Ch = torch.linalg.solve_triangular(Lt, C, upper=True, left=False)  # C L^{-T}
        Zh = Ch - ((Ch @ Yt) * sees) @ Y
        return torch.linalg.solve_triangular(L, Zh, upper=False, left=False)  # Zh L^{-1}

    Mt = M.transpose(-1, -2).contiguous()
    A_rows = A[:, start:]  # the queries that need it
    Z = solve(A_rows @ M)
    effective = (Z @ Mt) * shown
    Z = Z + solve((A_rows - effective) @ M)  # one step of iterative refinement
    return start, (Z @ Mt) * shown


def _gram_projection(
    A: Tensor, M: Tensor, rtol: Tensor, pairs: Tensor, chunk: int = 512
) -> tuple[Tensor, Tensor]:
    """Rows ``pairs [P, 2]`` = (head, row) of ``A [b, n, n]`` / ``M [b, n, dh]``, by an
    eigendecomposition of each prefix Gram matrix (the SVD's rank rule), refined once:
    effective rows ``[P, n]`` and prefix ranks ``[P]``, ``chunk`` pairs at a time."""
    n = M.shape[-2]
    out_rows, out_rank = [], []
    for start in range(0, len(pairs), chunk):
        head, row = pairs[start : start + chunk, 0], pairs[start : start + chunk, 1]
        mask = (torch.arange(n, device=M.device)[None, :] <= row[:, None]).to(M.dtype)  # [p, n]
        Mp = M[head] * mask[..., None]  # [p, n, dh]: the prefix, later rows zeroed
        lam, W = torch.linalg.eigh(Mp.transpose(-1, -2) @ Mp)  # ascending
        s = lam.clamp_min(0).sqrt()
        keep = s > rtol[row, None] * s[:, -1:].clamp_min(torch.finfo(s.dtype).tiny)
        inv = torch.where(keep, 1.0 / lam.clamp_min(torch.finfo(s.dtype).tiny), 0.0)

        def solve(rhs: Tensor, W: Tensor = W, inv: Tensor = inv) -> Tensor:  # G^+ rhs, [p, dh]
            return (W @ (inv * (W.transpose(-1, -2) @ rhs[..., None])[..., 0])[..., None])[..., 0]

        a = A[head, row] * mask  # [p, n]
        z = solve((a[:, None, :] @ Mp)[:, 0])
        effective = (Mp @ z[..., None])[..., 0]
        z = z + solve(((a - effective)[:, None, :] @ Mp)[:, 0])  # iterative refinement
        out_rows.append((Mp @ z[..., None])[..., 0])
        out_rank.append(keep.sum(-1))
    return torch.cat(out_rows), torch.cat(out_rank)


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
