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
``a_i`` on the range of ``M_i = M[:i+1]``. When ``R`` is invertible that range is the range of
``V_i``, the same for every query head reading the same values (grouped-query attention).

- Fast path (relative tolerances >= :data:`FAST_PATH_MIN_RTOL`, which the defaults for float32
  data are whenever ``d_model >= 84``). With ``tau = 1.1 rtol s`` (``s^2 = ||M^T M||_F``, an
  upper bound of every prefix's ``s_max^2``; the factor 1.1 absorbs the float64 error of the
  Gram matrices), *shifted* Cholesky factorisations prove

  * full row rank for every prefix ``i < d_head`` whose leading block of ``M M^T - tau^2 I``
    is positive definite (one factorisation gives every leading block at once), and
  * full column rank for every prefix ``i >= c`` with ``M[:c+1]^T M[:c+1] - tau^2 I`` positive
    definite (``s_dh`` never falls as rows are added; ``c`` is found by a few batched tries).

  They run once per KV head on ``V`` with ``tau / s_min(R)`` (``s_j(M_i) >= s_j(V_i) s_min(R)``),
  and on ``M`` itself only for the query heads with a row ``V`` leaves unproven; rows proven
  neither way get their rank from the float64 eigenvalues of the prefix Gram matrix (the SVD's
  rule). Rows of full row rank keep ``a_i``. Rows of full column rank are projected with one
  *staircase* basis of the left null space of ``V`` per KV head (:func:`staircase_null_basis`:
  orthonormal columns ``u_c`` with ``u_c`` zero below row ``d_head + c``, so that the columns
  ``c <= i - d_head`` are a basis of the null space of *every* such prefix ``i``)::

      A_eff[i] = a_i - sum_{c <= i - d_head} (a_i . u_c) u_c

  two GEMMs per query head, from two Householder QR factorisations per KV head: no per-prefix
  matrices, no normal equations. Prefixes whose distinct rows are independent but which repeat
  a row (repeated tokens where values carry no position, a RoPE model's first layer) take class
  averages. Only rows of a smaller rank take a float64 eigendecomposition of their prefix Gram
  matrix, keeping the eigenvectors of the eigenvalues counted in the rank, refined once.
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
    A: Tensor,
    V: Tensor,
    rtol_for: Callable[[int], float],
    *,
    right: Tensor | None = None,
    right_smin: Tensor | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Causal effective attention ``[..., H, n, n]`` and the rank of every prefix ``[..., H,
    n]``; written into ``out`` when given (a contiguous float64 tensor shaped like ``A``).

    ``A [..., H, n, n]``: causal attention (float64, zero above the diagonal). ``V [..., K, n,
    dh]`` (float64): the values of ``K`` KV heads, query head ``h`` reading KV head ``h // (H /
    K)`` (grouped-query attention; ``K = H`` otherwise). The matrix of the rank rule for query
    head ``h`` is ``M_h = V right[h]`` (``right [H, dh, dh]``; without it ``M = V`` and ``K``
    must equal ``H``), ``right_smin [H]`` the smallest singular value of each ``right[h]``.
    ``rtol_for(m)``: relative rank tolerance for a prefix of ``m`` tokens. ``out`` may be ``A``
    itself (computed in place).

    Rows whose prefix has full row rank keep ``A`` bit for bit. On the fast path, prefixes
    proven full row rank cost nothing more, those proven full column rank share one staircase
    null-space basis per KV head (two GEMMs per query head); only the rest need an
    eigendecomposition."""
    check_finite("the attention", A)
    check_finite("the value-output factor", V)
    n, dh = V.shape[-2:]
    if right is None:  # M = V: one matrix per attention matrix
        if A.shape[:-2] != V.shape[:-2]:
            raise ValueError(f"attention {tuple(A.shape)} does not match M {tuple(V.shape)}")
        H = K = g = 1
    else:
        H, K = A.shape[-3], V.shape[-3]
        if H % K or right.shape[0] != H:
            raise ValueError(f"{H} query heads cannot read {K} value heads")
        g = H // K
    rows = torch.arange(n, device=V.device)
    visible = (rows[None, :] <= rows[:, None]).to(V.dtype)  # [i, j]: key j visible to query i
    rtol = torch.tensor([rtol_for(i + 1) for i in range(n)], dtype=V.dtype, device=V.device)
    V_f = V.reshape(-1, n, dh)  # [k, n, dh], KV head of query head q: q // g
    if right is not None and right_smin is None:
        raise ValueError("right_smin (the smallest singular values of right) is needed")
    if float(rtol.min()) < FAST_PATH_MIN_RTOL:
        M = V_f.repeat_interleave(g, 0)
        M = M if right is None else M @ right.repeat(V_f.shape[0] // K, 1, 1)
        A_f = A.reshape(-1, n, n)
        effective, rank = _svd_projection(A_f * visible, M, visible, rtol, rows)
        effective = torch.where((rank == rows + 1).unsqueeze(-1), A_f, effective)
        if out is not None:
            effective = out.view(-1, n, n).copy_(effective)
        return effective.reshape(A.shape), rank.reshape(A.shape[:-1])
    A_f = A.reshape(-1, n, n)  # [q, n, n]
    cert, formed, M_formed = _certify_heads(V_f, g, right, right_smin, float(rtol.max()))
    rank = torch.where(cert.row_ok, cert.distinct, dh)
    if out is None:
        effective = A_f.clone()
    else:  # ``out`` may be ``A`` itself: every row below is read before it is written
        effective = out.view(-1, n, n)
        if effective.data_ptr() != A_f.data_ptr():
            effective.copy_(A_f)
    projected = cert.col_ok & ~cert.row_ok  # [q, n]: the rows the staircase basis serves
    pairs = (~(cert.row_ok | cert.col_ok)).nonzero()  # [P, 2]: (head, row) proven neither way
    if len(pairs):  # their ranks from the eigenvalues of the prefix Gram (the SVD's rule)
        pair_heads, index = pairs[:, 0].unique(return_inverse=True)
        # M of these heads: V itself, or formed already by the certificates (a row V left
        # unproven made them certify M)
        M = V_f[pair_heads] if right is None else M_formed[torch.searchsorted(formed, pair_heads)]
        head, row = pairs.unbind(-1)
        pair_rank = _prefix_ranks(M, index, row, rtol)
        rank[head, row] = pair_rank
        projected[head, row] = (pair_rank == dh) & (row >= dh)  # full column rank after all
        deficient = pair_rank < (row + 1).clamp_max(dh)
    heads = cert.repeated.any(-1).nonzero()[:, 0]
    if len(heads):  # repeated rows, distinct rows independent: average over each class
        part = A_f[heads]  # [h, n, n]
        keys, averaged = _class_average(part, cert.first[heads], visible)
        repeated = cert.repeated[heads].unsqueeze(-1)
        part.index_copy_(-1, keys, torch.where(repeated, averaged, part.index_select(-1, keys)))
        effective[heads] = part
    by_group = projected.view(-1, g, n)
    groups = by_group.any(-1).any(-1).nonzero()[:, 0]
    if len(groups):  # one staircase basis per KV head, shared by its query heads
        start = int(by_group[groups].any(-2).any(0).nonzero()[0, 0])
        grouped = effective.view(-1, g, n, n)
        if len(groups) == len(by_group):  # the common case: in place
            _staircase_project(grouped, staircase_null_basis(V_f), by_group, start)
        else:
            part = grouped[groups]
            _staircase_project(part, staircase_null_basis(V_f[groups]), by_group[groups], start)
            grouped[groups] = part
    if len(pairs) and bool(deficient.any()):  # a smaller rank: the eigenvectors are needed
        head, index, row = head[deficient], index[deficient], row[deficient]
        effective[head, row] = _gram_projection(A_f[head, row], M, index, row, pair_rank[deficient])
    return effective.reshape(A.shape), rank.reshape(A.shape[:-1])


def staircase_null_basis(V: Tensor) -> Tensor:
    """An orthonormal basis ``U [b, n, n - dh]`` of the left null space of each ``V [b, n, dh]``
    (full column rank, ``n >= dh``) whose column ``c`` is zero below row ``dh + c``. Then for
    every prefix ``V[:i+1]`` of full column rank, the columns ``c <= i - dh`` (cut to their first
    ``i + 1`` rows) are an orthonormal basis of the prefix's own left null space: a nested basis,
    one new vector per added row.

    Why: let ``B`` be any orthonormal basis of the null space (Householder QR of ``V``) and
    ``W = J B^T J`` (``J``: order reversed). The QR factor ``R`` of ``W`` has orthonormal rows
    spanning those of ``W``, and its last ``p`` rows vanish on the first ``n - dh - p``
    columns; reversed back, columns ``c < p`` of ``U = J R^T J`` are ``p`` orthonormal null
    vectors that vanish below row ``i = dh + p - 1``, so they span the null space of ``V[:i+1]``
    whenever that has dimension ``p = i + 1 - dh``, i.e. ``V[:i+1]`` has full column rank."""
    b, n, dh = V.shape
    reflectors, tau = torch.geqrf(V)
    tail = torch.zeros(b, n, n - dh, dtype=V.dtype, device=V.device)
    tail[:, dh:] = torch.eye(n - dh, dtype=V.dtype, device=V.device)
    B = torch.ormqr(reflectors, tau, tail)  # the last n - dh columns of the full Q
    R = torch.linalg.qr(B.flip((-2, -1)).transpose(-1, -2), mode="r").R  # [b, n - dh, n]
    return R.flip((-2, -1)).transpose(-1, -2)


def _staircase_project(E: Tensor, U: Tensor, use: Tensor, start: int) -> None:
    """In place, for the rows ``i >= start`` of ``E [k, g, n, n]`` marked in ``use [k, g, n]``
    (rows holding ``a_i``; ``g`` query heads per KV head, their basis ``U [k, n, m]`` from
    :func:`staircase_null_basis`): ``a_i - sum_{c <= i - dh} (a_i . u_c) u_c``, the effective
    rows of prefixes with full column rank. Two GEMMs per query head and block of rows: rows
    ``i < hi`` meet only the keys ``< hi`` (``a_i`` is causal) and the basis columns ``c < hi -
    dh``, which vanish from row ``hi`` on, so a block's GEMMs are ``[rows, hi]`` by ``[hi, hi -
    dh]``: about half the work of full-width GEMMs at ``n = 4 dh``."""
    n, m = U.shape[-2:]
    dh = n - m
    Ut = U.transpose(-1, -2)
    step = max(32, -(-(n - start) // 4))  # up to four blocks of at least 32 rows
    for lo in range(start, n, step):
        hi = min(lo + step, n)
        used = hi - dh  # basis columns these rows can use
        if used <= 0:
            continue
        rows = torch.arange(lo, hi, device=E.device)
        serves = (torch.arange(used, device=E.device)[None, :] + dh <= rows[:, None]).to(E.dtype)
        basis, basis_t = U[:, :hi, :used], Ut[:, :used, :hi]
        for j in range(E.shape[1]):
            block = E[:, j, lo:hi, :hi]  # a strided view, changed in place
            C = (block @ basis) * (serves * use[:, j, lo:hi, None])  # coefficients on the basis
            block.sub_(C @ basis_t)  # (a batched GEMM into a strided view would loop per matrix)


@dataclass
class _Certificate:
    """Per head ``[b, n]``: ``row_ok`` (prefix proven to have rank ``distinct``: its distinct
    rows are independent), ``distinct`` (distinct rows in the prefix), ``first`` (index of the
    first row equal to row ``t``), ``col_ok`` (proven full column rank)."""

    row_ok: Tensor
    distinct: Tensor
    first: Tensor
    col_ok: Tensor

    @property
    def repeated(self) -> Tensor:
        """Rows proven by their distinct rows whose prefix repeats a row: class averages."""
        rows = torch.arange(self.row_ok.shape[-1], device=self.row_ok.device)
        return self.row_ok & (self.distinct < rows + 1)

    def expand(self, g: int) -> _Certificate:
        """The certificate of each of ``b`` KV heads repeated for its ``g`` query heads."""
        return _Certificate(*(t.repeat_interleave(g, 0) for t in vars(self).values()))


def certified_prefix_full_rank(M: Tensor, rtol: Tensor) -> tuple[Tensor, Tensor]:
    """Proofs for the prefixes ``M[:i+1]`` of ``M [..., n, dh]``: ``[..., n]`` bools "proven full
    row rank" (``i < dh``) and "proven full column rank" (``i >= dh - 1``), meaning
    ``min(i + 1, dh)`` singular values above ``rtol[i] * s_max(M[:i+1])``; False: not proven.
    See the module docstring (shifted Cholesky factorisations, threshold ``1.1 max(rtol) s``)."""
    n, dh = M.shape[-2:]
    M_f = M.reshape(-1, n, dh)
    shift = _shift(torch.linalg.matrix_norm(M_f.transpose(-1, -2) @ M_f), float(rtol.max()))
    cert = _certify(M_f, shift, repeated_rows(M_f))
    full_row = cert.row_ok & ~cert.repeated
    return full_row.reshape(M.shape[:-1]), cert.col_ok.reshape(M.shape[:-1])


def _shift(gram_norm: Tensor, rtol: float) -> Tensor:
    """``tau^2 = (1.1 rtol)^2 ||G||_F [b]`` from the Frobenius norms ``gram_norm [b]`` of Gram
    matrices ``G``: ``||G||_F >= s_max^2`` of the matrix and of each of its prefixes; the
    factor 1.1 absorbs the float64 error of Gram matrices."""
    return (1.1 * rtol) ** 2 * gram_norm


def _certify_heads(
    V: Tensor, g: int, right: Tensor | None, right_smin: Tensor | None, rtol: float
) -> tuple[_Certificate, Tensor, Tensor]:
    """Certificates ``[q, n]`` for the query heads (``q = g k``) of the KV heads ``V [k, n,
    dh]`` (``k = b K``: ``b`` sequences of ``K`` KV heads), the rank rule being that of ``M_h =
    V right[h]`` (``right [H, dh, dh]`` with ``H = g K``, the same for every sequence;
    ``right_smin [H]`` its smallest singular values; ``None``: ``M = V``, ``g = 1``).

    First from ``V`` once per KV head: ``s_j(M_i) >= s_j(V_i) s_min(right)``, so a prefix of
    ``V`` proven above ``tau = 1.1 rtol max_h s_h / s_min(right[h])`` (``s_h^2 = ||M_h^T
    M_h||_F``, see :func:`_output_gram_norms`) is proven for every query head of the group.
    ``M_h`` is formed, and certified itself, only for the query heads with a row left
    unproven. Equal rows of ``V`` are equal rows of every ``M_h``: one set of classes.

    Returns the certificate, the query heads for which ``M`` was formed (ascending) and their
    ``M [m, n, dh]`` (none without ``right``)."""
    k = V.shape[0]
    G = V.transpose(-1, -2) @ V
    first = repeated_rows(V)
    none = torch.empty(0, dtype=torch.long, device=V.device)
    if right is None:
        return _certify(V, _shift(torch.linalg.matrix_norm(G), rtol), first), none, V[:0]
    assert right_smin is not None
    H = right.shape[0]
    sequences = k // (H // g)  # (H // g KV heads each)
    shift_M = _shift(_output_gram_norms(G, right, g), rtol)  # [q]
    shift_V = (shift_M / right_smin.repeat(sequences).square()).view(k, g).amax(-1)
    cert = _certify(V, shift_V, first).expand(g)  # (inf where right is singular)
    heads = (~(cert.row_ok | cert.col_ok)).any(-1).nonzero()[:, 0]
    M = V[heads // g] @ right[heads % H]
    if len(heads):  # the rows V proved need no search: M's anchor lies below V's
        proven = cert.col_ok[heads]
        bound = torch.where(proven.any(-1), proven.to(torch.uint8).argmax(-1), V.shape[1])
        own = _certify(M, shift_M[heads], first[heads // g], bound)
        cert.row_ok[heads] |= own.row_ok
        cert.col_ok[heads] |= own.col_ok
    return cert, heads, M


def _output_gram_norms(G: Tensor, right: Tensor, g: int) -> Tensor:
    """``||right[h]^T G right[h]||_F [q]`` (the Frobenius norm of ``M_h^T M_h``, ``M_h = V
    right[h]``) for the Gram matrices ``G [b K, dh, dh]`` of ``b`` sequences' ``K`` KV heads
    and the ``H = g K`` query heads' ``right [H, dh, dh]``, in the order ``(sequence, KV head,
    query head of the group)``, without forming ``M_h^T M_h``: the norm is ``tr((G P)^2)^(1/2)``
    with ``P = right right^T``, and ``G P`` for all ``g`` heads of a KV head and all sequences is
    one GEMM per KV head ``[b dh, dh] x [dh, g dh]``."""
    H, dh = right.shape[0], right.shape[-1]
    K = H // g
    b = G.shape[0] // K
    P = (right @ right.transpose(-1, -2)).view(K, g, dh, dh).transpose(1, 2).reshape(K, dh, -1)
    by_kv = G.view(b, K, dh, dh).transpose(0, 1).reshape(K, b * dh, dh)
    X = (by_kv @ P).view(K, b, dh, g, dh).permute(1, 0, 3, 2, 4)  # [b, K, g, dh, dh]: G P
    return (X * X.transpose(-1, -2)).sum((-2, -1)).clamp_min(0).sqrt().reshape(-1)


def repeated_rows(M: Tensor) -> Tensor:
    """``first [b, n]``: for each row ``t`` of ``M [b, n, dh]``, the index of the first row
    bitwise equal to it (``t`` itself when it is new). A repeated token gives repeated value rows
    where the attention input carries no position (RoPE models' first layer)."""
    n, dh = M.shape[-2:]
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(dh, generator=generator, dtype=M.dtype).to(M.device)
    key = M @ probe  # equal rows have equal keys; equal keys are checked row by row
    rows = torch.arange(n, device=M.device)
    ordered = key.sort(-1).values
    if not bool((ordered[:, 1:] == ordered[:, :-1]).any()):  # the common case: all keys differ
        return rows.expand(M.shape[0], n)
    candidate = (key[:, :, None] == key[:, None, :]) & (rows[None, :] < rows[:, None])
    same = torch.zeros_like(candidate)
    h, t, j = candidate.nonzero().unbind(-1)
    exact = (M[h, t] == M[h, j]).all(-1)
    same[h[exact], t[exact], j[exact]] = True
    same |= torch.eye(n, dtype=torch.bool, device=M.device)
    return same.to(torch.uint8).argmax(-1)  # the first equal row (argmax: first maximum)


def _certify(M: Tensor, shift: Tensor, first: Tensor, bound: Tensor | None = None) -> _Certificate:
    """Certificates for ``M [b, n, dh]`` at the thresholds ``tau^2 = shift [b]`` (the
    module docstring) given its classes of equal rows ``first [b, n]`` (:func:`repeated_rows`):
    prefixes proven full rank above ``tau`` (``inf``: none). ``bound [b]``: the row from which
    full column rank is proven already (by another certificate); the search stops there, and
    the rows from it on are marked proven."""
    b, n, dh = M.shape
    if bound is None:
        bound = torch.full((b,), n, device=M.device)
    k = min(n, dh)
    rows = torch.arange(n, device=M.device)
    new_row = first == rows
    distinct = new_row.cumsum(-1)  # distinct rows in each prefix, [b, n]
    # the first k distinct rows of each head, in order (zero rows pad heads with fewer)
    if bool(new_row[:, :k].all()):  # the common case: no repeat among the first k rows
        D = M[:, :k]
    else:
        picked = torch.sort((~new_row).to(torch.uint8), dim=-1, stable=True).indices[:, :k]
        valid = torch.arange(k, device=M.device)[None, :] < distinct[:, -1:]
        D = torch.gather(M, 1, picked[..., None].expand(b, k, dh)) * valid[..., None]
    K = D @ D.transpose(-1, -2)
    K.diagonal(dim1=-2, dim2=-1).sub_(shift[:, None])  # D D^T - tau^2 I
    info = torch.linalg.cholesky_ex(K).info
    positive = torch.where(info == 0, k, info - 1)  # leading distinct rows that factored
    # repeating a row adds nothing to the range and scales no singular value down (weights >= 1)
    row_ok = distinct <= positive[:, None]
    col_ok = torch.zeros_like(row_ok)
    if n >= dh:
        # the first row c >= dh - 1 whose prefix is proven full column rank (s_dh never falls
        # as rows are added, so every later prefix is proven too), searched from the first row
        # whose prefix holds dh distinct rows. When the first dh rows are distinct and all
        # factored above, D is the square prefix M[:dh]: its Gram matrices D D^T and D^T D share
        # their smallest eigenvalue, so c = dh - 1; if they did not factor, dh - 1 cannot be
        # proven. The other heads try their first possible row (where most real heads are
        # proven), then the rows 1, 3, 7, 15, ... after it at once, then up to 7 rows inside
        # the bracket found.
        ready = torch.where(distinct[:, -1] >= dh, (distinct < dh).sum(-1), n)  # [b]
        square = (ready == dh - 1) & (positive == dh)
        anchor = torch.where(square, dh - 1, bound)
        lo = ready + (ready == dh - 1).long()
        others = (~square & (lo < bound)).nonzero()[:, 0]
        if len(others):
            lo, hi = lo[others], bound[others]
            found = torch.minimum(_first_proven(M[others], shift[others], lo[:, None]), hi)
            rest = (found > lo).nonzero()[:, 0]
            if len(rest):
                found[rest] = _gallop(M[others[rest]], shift[others[rest]], lo[rest] + 1, hi[rest])
            anchor[others] = found
        col_ok = rows[None, :] >= anchor[:, None]
    return _Certificate(row_ok, distinct, first, col_ok)


def _gallop(M: Tensor, shift: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """The first row in ``lo[h] .. hi[h] - 1`` at which :func:`_first_proven` succeeds for each
    head of ``M [b, n, dh]`` (``hi`` when none; up to 7 rows of the last bracket are tried, so a
    later row may be returned): the rows ``lo - 1 + 2^j`` and ``hi - 1`` in one batch, then
    inside the bracket."""
    powers = 2 ** torch.arange(max(int((hi - lo).max()), 1).bit_length(), device=M.device)
    last = (hi - 1)[:, None]
    tries = torch.minimum(torch.cat([lo[:, None] - 1 + powers, last], 1), last)  # ascending
    found = torch.minimum(_first_proven(M, shift, tries), hi)
    below = torch.searchsorted(tries, found[:, None])[:, 0] - 1  # last row tried, not proven
    start = torch.where(below >= 0, tries.gather(1, below.clamp_min(0)[:, None])[:, 0] + 1, lo)
    gap = found - start  # rows strictly inside the bracket
    inside = (gap > 0).nonzero()[:, 0]
    if len(inside):
        fraction = torch.arange(1, 8, device=M.device) / 8
        inner = start[inside, None] + (fraction * gap[inside, None]).long()
        found[inside] = torch.minimum(found[inside], _first_proven(M[inside], shift[inside], inner))
    return found


def _first_proven(M: Tensor, shift: Tensor, tries: Tensor) -> Tensor:
    """For each head of ``M [b, n, dh]``, the first of the rows ``tries [b, t]`` (ascending)
    whose prefix Gram matrix minus ``shift [b]`` times the identity has a Cholesky factor; ``n``
    when none has. One batched factorisation of ``b t`` matrices."""
    b, n, dh = M.shape
    t = tries.shape[1]
    rows = int(tries.max()) + 1  # later rows are in no prefix tried
    upto = torch.arange(rows, device=M.device)[None, None, :] <= tries[..., None]  # [b, t, rows]
    prefixes = (M[:, None, :rows] * upto[..., None].to(M.dtype)).view(b * t, rows, dh)
    G = prefixes.transpose(-1, -2) @ prefixes  # [b t, dh, dh]
    G.diagonal(dim1=-2, dim2=-1).sub_(shift.repeat_interleave(t)[:, None])
    ok = (torch.linalg.cholesky_ex(G).info == 0).view(b, t)
    first = torch.where(ok.any(-1), ok.to(torch.uint8).argmax(-1), t)  # argmax: first True
    return torch.cat([tries, torch.full((b, 1), n, device=M.device)], 1).gather(1, first[:, None])[
        :, 0
    ]


def _class_average(A: Tensor, first: Tensor, visible: Tensor) -> tuple[Tensor, Tensor]:
    """Effective attention of prefixes whose distinct rows are independent: the range of
    ``M_i`` is then the vectors constant on each class of equal rows, so ``a_eff_i[t]`` is the
    mean of ``a_i`` over the rows ``<= i`` equal to row ``t``. For ``A [b, n, n]`` and the
    classes ``first [b, n]`` (:func:`repeated_rows`): the keys ``[r]`` of classes with more than
    one member in some head (all other keys keep ``a_i[t]``) and ``A_eff`` on them ``[b, n,
    r]``; ``O(n r)`` per head."""
    b, n = first.shape
    rows = torch.arange(n, device=A.device)
    later = first != rows  # rows repeating an earlier row
    member = later.clone()
    member[torch.arange(b, device=A.device)[:, None].expand(b, n)[later], first[later]] = True
    keys = member.any(0).nonzero()[:, 0]  # [r], ascending; each class's first row is a key
    r = len(keys)
    label = torch.searchsorted(keys, first[:, keys].contiguous())  # [b, r]: class, as a key index
    by_key = label[:, None, :].expand(b, n, r)
    sums = torch.zeros(b, n, r, dtype=A.dtype, device=A.device)
    sums.scatter_add_(-1, by_key, A.index_select(-1, keys))  # [b, i, class]: A is causal
    members = torch.zeros(b, r + 1, r, dtype=A.dtype, device=A.device)  # row 0: no key yet
    members[:, 1:].scatter_(-1, label[:, :, None], 1.0)
    seen = torch.searchsorted(keys, rows, right=True)  # [n]: keys <= i
    counts = members.cumsum(-2).index_select(1, seen)  # [b, i, class]: members in rows <= i
    means = sums / counts.clamp_min(1)  # classes with no member yet have zero sums
    return keys, means.gather(-1, by_key) * visible.index_select(-1, keys)


def _prefix_grams(M: Tensor, head: Tensor, row: Tensor, block: int = 64) -> Tensor:
    """Gram matrices ``[p, dh, dh]`` of the prefixes ``M[head, :row+1]`` (``M [b, n, dh]``,
    ``head, row [p]``): per head, one GEMM for its shortest prefix, then running sums of the
    later rows' outer products (``block`` rows at a time), so a head's prefixes cost ``O(n
    dh^2)`` together instead of ``O(n dh^2)`` each. Float64 sums of at most ``n`` terms: their
    error is ``~n eps ||G||``, far below the rank tolerances (``>= 1e-5`` on this path)."""
    dh = M.shape[-1]
    grams = torch.empty(len(head), dh, dh, dtype=M.dtype, device=M.device)
    for h in head.unique().tolist():
        pairs = (head == h).nonzero()[:, 0]
        rows, order = row[pairs].sort()
        pairs = pairs[order]
        Mh, first, last = M[h], int(rows[0]), int(rows[-1])
        running = Mh[: first + 1].transpose(-1, -2) @ Mh[: first + 1]
        grams[pairs[0]] = running
        for lo in range(first + 1, last + 1, block):
            hi = min(lo + block, last + 1)
            X = Mh[lo:hi]
            sums = torch.cumsum(X[:, :, None] * X[:, None, :], 0)
            sums += running
            running = sums[-1]
            inside = (rows >= lo) & (rows < hi)
            grams[pairs[inside]] = sums[rows[inside] - lo]
    return grams


def _prefix_ranks(M: Tensor, head: Tensor, row: Tensor, rtol: Tensor, chunk: int = 512) -> Tensor:
    """Ranks ``[p]`` of the prefixes ``M[head, :row+1]`` (``M [b, n, dh]``, float64): singular
    values, as square roots of the Gram matrix's float64 eigenvalues (resolved down to about
    ``1e-7 s_max``, far below the tolerance), above ``rtol[row] * s_max``."""
    ranks = []
    for start in range(0, len(head), chunk):
        h, r = head[start : start + chunk], row[start : start + chunk]
        s = torch.linalg.eigvalsh(_prefix_grams(M, h, r)).clamp_min(0).sqrt()  # ascending
        ranks.append((s > rtol[r, None] * s[:, -1:].clamp_min(torch.finfo(s.dtype).tiny)).sum(-1))
    return torch.cat(ranks)


def _gram_projection(
    a: Tensor, M: Tensor, head: Tensor, row: Tensor, rank: Tensor, chunk: int = 512
) -> Tensor:
    """Effective rows ``[p, n]`` for the attention rows ``a [p, n]`` of the prefixes ``M[head,
    :row+1]`` (``M [b, n, dh]``) of rank ``rank [p]`` (from :func:`_prefix_ranks`): the
    projection on the eigenvectors of the ``rank`` largest eigenvalues of the prefix's Gram
    matrix, refined once; ``chunk`` rows at a time. ``a`` and the result vanish past ``row``,
    so ``a M[head]`` is ``a`` times the prefix and the prefix times ``z`` is ``M[head] z`` cut
    at ``row``."""
    n, dh = M.shape[-2:]
    out_rows = []
    for start in range(0, len(head), chunk):
        part = slice(start, start + chunk)
        Mh = M[head[part]]  # [c, n, dh]
        lam, W = torch.linalg.eigh(_prefix_grams(M, head[part], row[part]))  # ascending
        keep = torch.arange(dh, device=M.device)[None, :] >= dh - rank[part, None]
        inv = torch.where(keep, 1.0 / lam.clamp_min(torch.finfo(lam.dtype).tiny), 0.0)

        def solve(rhs: Tensor, W: Tensor = W, inv: Tensor = inv) -> Tensor:  # G^+ rhs, [p, dh]
            return (W @ (inv * (W.transpose(-1, -2) @ rhs[..., None])[..., 0])[..., None])[..., 0]

        visible = (torch.arange(n, device=M.device)[None, :] <= row[part, None]).to(a.dtype)
        a_p = a[part] * visible  # [c, n]

        def prefix_times(z: Tensor, Mh: Tensor = Mh, visible: Tensor = visible) -> Tensor:
            return (Mh @ z[..., None])[..., 0] * visible  # [c, n]

        z = solve((a_p[:, None, :] @ Mh)[:, 0])
        z = z + solve(((a_p - prefix_times(z))[:, None, :] @ Mh)[:, 0])  # iterative refinement
        out_rows.append(prefix_times(z))
    return torch.cat(out_rows)


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
