"""Effective attention and null spaces of sliding-window heads [BRU] (SPEC section 1, "Sliding
windows"; section 5).

In a layer with a sliding window of ``w`` keys, query ``i`` sees only the keys ``lo_i..i`` with
``lo_i = max(0, i - w + 1)`` (``m_i = i - lo_i + 1`` of them): its output is ``a_i[lo_i:i+1]
T[lo_i:i+1]``, so the part of its attention that cannot change the output is the part in the left
null space of the *window's rows* of ``T = V W_O[h]``. Per query::

    A_eff[i, lo_i:i+1] = a_i[lo_i:i+1] - a_i[lo_i:i+1] N_i N_i^T,  N_i: left null space of
                                                                    T[lo_i:i+1]
    A_eff[i, j] = 0 for every other key j

which gives ``A_eff T = A T`` row by row and ``A_eff[i] = a_i`` (bit for bit) whenever the window's
rows have full row rank, in particular whenever ``m_i <= rank``: a window of at most ``d_head``
keys never has a null space. For queries whose window is the whole prefix (``i < w``) this is the
causal prefix definition (:mod:`tgeom.analyses.identifiability.causal`).

Null dimension of a windowed head on a sequence: each query has its own, ``m_i - rank(T[lo_i:
i+1])``; the head's is the largest over its queries (generic heads: ``max(0, min(n, w) -
d_head)``), reported with the rank of the last query that attains it. For a global causal head the
null dimension of the prefixes never falls as rows are added, so the same rule gives the whole
sequence's ``n - rank(T)``: one definition for every head.

Computation: ``T[lo_i:i+1] = M[lo_i:i+1] Q^T`` (``M = V R^T``, ``Q`` orthonormal columns; see
:mod:`tgeom.analyses.identifiability.effective`), so each window takes a float64 thin SVD of its
``[w, d_head]`` block of ``M`` (rows before the sequence start are zero, which adds no rank), the
rank counting singular values above ``rtol_for(m_i) * s_max``; queries are taken in chunks so the
stacked windows stay small. The per-query SVD is the definition itself; no certificate is used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tgeom.errors import check_finite

CHUNK_ELEMENTS = 1 << 22  # float64 entries of stacked window blocks per chunk of queries


def window_blocks(M: Tensor, window: int, start: int, stop: int) -> Tensor:
    """The rows of ``M [..., n, dh]`` that queries ``start..stop-1`` see: ``[..., stop - start,
    window, dh]``, row ``r`` of query ``i`` being ``M[i - window + 1 + r]`` (zero before row 0)."""
    padded = torch.nn.functional.pad(M, (0, 0, window - 1, 0))  # [..., n + w - 1, dh]
    return padded[..., start : stop + window - 1, :].unfold(-2, window, 1).transpose(-1, -2)


def window_effective_attention(
    A: Tensor,
    V: Tensor,
    rtol_for: Callable[[int], float],
    window: int,
    *,
    right: Tensor | None = None,
    out: Tensor | None = None,
    first_query: int = 0,
) -> tuple[Tensor, Tensor]:
    """Windowed effective attention ``[..., H, n, n]`` and the rank of every query's window
    ``[..., H, n]``; written into ``out`` when given (a contiguous float64 tensor shaped like
    ``A``; it may be ``A`` itself). ``first_query``: the queries before it are left as they are
    in ``out`` (their ranks ``-1``), for a caller that computes them another way (queries ``i <
    window`` see their whole prefix: the causal path of
    :func:`~tgeom.analyses.identifiability.causal.prefix_effective_attention`).

    ``A [..., H, n, n]``: the layer's attention (float64, zero outside each query's window).
    ``V [..., K, n, dh]`` (float64): the values of ``K`` KV heads, query head ``h`` reading KV
    head ``h // (H / K)``; the rank rule is that of ``M_h = V right[h]`` (``right [H, dh, dh]``;
    without it ``M = V`` and ``K = H``). ``rtol_for(m)``: relative rank tolerance of a window of
    ``m`` keys."""
    check_finite("the attention", A)
    check_finite("the value-output factor", V)
    n, dh = V.shape[-2:]
    H = A.shape[-3]
    if H % V.shape[-3]:
        raise ValueError(f"{H} query heads cannot read {V.shape[-3]} value heads")
    M = V.repeat_interleave(H // V.shape[-3], dim=-3)
    if right is not None:
        M = M @ right
    effective = out if out is not None else torch.empty_like(A)
    rank = torch.full(A.shape[:-1], -1, dtype=torch.long, device=A.device)
    batch = A[..., 0, 0].numel()
    step = max(1, CHUNK_ELEMENTS // max(1, batch * window * dh))
    padded_A = torch.nn.functional.pad(A, (window - 1, 0))  # [..., n, n + w - 1]
    offsets = torch.arange(window, device=A.device)
    for start in range(first_query, n, step):
        stop = min(n, start + step)
        rows = torch.arange(start, stop, device=A.device)
        blocks = window_blocks(M, window, start, stop)  # [..., c, w, dh]
        # a_i on its window: padded column i + r holds key i - w + 1 + r
        index = (rows[:, None] + offsets[None, :]).expand(*A.shape[:-2], -1, -1)
        a = padded_A[..., start:stop, :].gather(-1, index)  # [..., c, w]
        U, s, _ = torch.linalg.svd(blocks, full_matrices=False)  # U [..., c, w, k]
        seen = (rows + 1).clamp_max(window)  # m_i, keys in the window
        rtol = torch.tensor(
            [rtol_for(int(m)) for m in seen.tolist()], dtype=s.dtype, device=s.device
        )
        keep = s > rtol[:, None] * s[..., :1].clamp_min(torch.finfo(s.dtype).tiny)
        U = U * keep.unsqueeze(-2).to(U.dtype)
        projected = ((a.unsqueeze(-2) @ U) @ U.transpose(-1, -2)).squeeze(-2)  # [..., c, w]
        r = keep.sum(-1)
        projected = torch.where((r == seen).unsqueeze(-1), a, projected)  # full row rank: a_i
        part = torch.zeros_like(padded_A[..., start:stop, :])
        part.scatter_(-1, index, projected)
        effective[..., start:stop, :] = part[..., window - 1 :]
        rank[..., start:stop] = r
    return effective, rank


def window_ranks(M: Tensor, rtol_for: Callable[[int], float], window: int) -> Tensor:
    """Rank ``[..., n]`` of every query's window of ``M [..., n, dh]`` (float64), by the rule of
    :func:`window_effective_attention` (no attention needed)."""
    n, dh = M.shape[-2:]
    rank = torch.empty(M.shape[:-1], dtype=torch.long, device=M.device)
    step = max(1, CHUNK_ELEMENTS // max(1, M[..., 0, 0].numel() * window * dh))
    for start in range(0, n, step):
        stop = min(n, start + step)
        s = torch.linalg.svdvals(window_blocks(M, window, start, stop))
        seen = (torch.arange(start, stop, device=M.device) + 1).clamp_max(window)
        rtol = torch.tensor(
            [rtol_for(int(m)) for m in seen.tolist()], dtype=s.dtype, device=s.device
        )
        keep = s > rtol[:, None] * s[..., :1].clamp_min(torch.finfo(s.dtype).tiny)
        rank[..., start:stop] = keep.sum(-1)
    return rank


def window_null_dims(rank: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """A windowed head's null dimension and rank ``[...]`` from its queries' window ranks
    ``rank [..., n]``: the largest ``m_i - rank_i`` over the queries, and the rank of the last
    query attaining it."""
    n = rank.shape[-1]
    seen = (torch.arange(n, device=rank.device) + 1).clamp_max(window)
    null = seen - rank
    largest = null.amax(-1)
    last = n - 1 - (null == largest.unsqueeze(-1)).flip(-1).to(torch.uint8).argmax(-1)
    return largest, rank.gather(-1, last.unsqueeze(-1)).squeeze(-1)
