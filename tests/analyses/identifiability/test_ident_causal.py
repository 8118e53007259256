"""Causal effective attention per query prefix [BRU]: against per-prefix full SVDs (float64),
on both computation paths (prefix Gram + refinement for float32-level tolerances, prefix SVDs
for smaller ones)."""

from __future__ import annotations

import pytest
import torch

from tgeom.analyses.identifiability.causal import (
    FAST_PATH_MIN_RTOL,
    _output_gram_norms,
    certified_prefix_full_rank,
    prefix_effective_attention,
)
from tgeom.linalg.nullspace import left_null_space

FAST, EXACT = 4 * FAST_PATH_MIN_RTOL, 1e-10


def causal_softmax(scores: torch.Tensor) -> torch.Tensor:
    n = scores.shape[-1]
    future = ~torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


def per_prefix_reference(A, M, rtol):
    """Row i: a_i - a_i N_i N_i^T with N_i from a full SVD of the prefix M[:i+1]."""
    n = A.shape[-1]
    expected, ranks = torch.zeros_like(A), []
    for i in range(n):
        N = left_null_space(M[: i + 1], rtol=rtol)
        a = A[i, : i + 1]
        expected[i, : i + 1] = a - a @ N @ N.T
        ranks.append(i + 1 - N.shape[1])
    return expected, ranks


@pytest.mark.parametrize("rtol", [FAST, EXACT])
def test_prefix_effective_attention_matches_per_prefix_svd_with_repeated_rows(rtol):
    """Repeated value rows (a repeated token where x carries no position) make short prefixes
    rank deficient; ranks and effective rows must still match the per-prefix SVD."""
    g = torch.Generator().manual_seed(0)
    n, dh = 30, 6
    M = torch.randn(n, dh, generator=g, dtype=torch.float64)
    M[4], M[9], M[10] = M[1], M[2], M[1]
    A = causal_softmax(torch.randn(n, n, generator=g, dtype=torch.float64))
    effective, rank = prefix_effective_attention(A, M, lambda m: rtol)
    expected, ranks = per_prefix_reference(A, M, rtol)
    assert rank.tolist() == ranks
    assert ranks[4] == 4  # the first repeat already leaves a one-dimensional null space
    assert torch.allclose(effective, expected, atol=1e-10)
    assert ((effective - A) @ M).norm() <= 1e-9 * (A @ M).norm()  # same head output
    full_rank_rows = torch.tensor(ranks) == torch.arange(1, n + 1)
    assert torch.equal(effective[full_rank_rows], A[full_rank_rows])  # bit for bit
    assert effective.triu(1).abs().max() == 0


@pytest.mark.parametrize("rtol", [FAST, EXACT])
def test_prefix_effective_attention_batched_and_ill_conditioned(rtol):
    """Singular values down to 3 * FAST (condition ~1e4): the Gram path stays at float64-SVD
    accuracy thanks to its refinement step."""
    g = torch.Generator().manual_seed(1)
    H, n, dh = 3, 24, 5
    Q = torch.linalg.qr(torch.randn(H, n, dh, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, float(torch.log10(torch.tensor(3 * FAST))), dh, dtype=torch.float64)
    M = (Q * s) @ torch.linalg.qr(torch.randn(H, dh, dh, generator=g, dtype=torch.float64)).Q
    A = causal_softmax(torch.randn(H, n, n, generator=g, dtype=torch.float64))
    effective, rank = prefix_effective_attention(A, M, lambda m: rtol)
    for h in range(H):
        expected, ranks = per_prefix_reference(A[h], M[h], rtol)
        assert rank[h].tolist() == ranks
        assert torch.allclose(effective[h], expected, atol=1e-10)


def test_fast_and_exact_paths_agree_on_random_heads():
    g = torch.Generator().manual_seed(2)
    M = torch.randn(4, 40, 8, generator=g, dtype=torch.float64)
    A = causal_softmax(torch.randn(4, 40, 40, generator=g, dtype=torch.float64))
    fast, rank_fast = prefix_effective_attention(A, M, lambda m: FAST)
    exact, rank_exact = prefix_effective_attention(A, M, lambda m: EXACT)
    assert torch.equal(rank_fast, rank_exact)
    assert torch.equal(rank_fast[0], torch.arange(1, 41).clamp_max(8))  # generic: min(i+1, dh)
    assert torch.allclose(fast, exact, atol=1e-12)


def test_certified_full_row_rank_never_certifies_a_deficient_prefix():
    """The cheap screen may say "not proven" but never certifies a prefix whose smallest singular
    value is at or below rtol * s_max (checked against float64 singular values)."""
    g = torch.Generator().manual_seed(3)
    n, dh, rtol = 12, 10, 1e-3
    M = torch.randn(50, n, dh, generator=g, dtype=torch.float64)
    # plant near-dependent rows: row 5 = row 2 + a tiny multiple of noise, scaled per batch item
    scale = torch.logspace(-6, 0, 50, dtype=torch.float64)[:, None]
    M[:, 5] = M[:, 2] + scale * torch.randn(50, dh, generator=g, dtype=torch.float64)
    proven, _ = certified_prefix_full_rank(M, torch.full((n,), rtol, dtype=torch.float64))
    for b in range(50):
        for i in range(n):
            s = torch.linalg.svdvals(M[b, : i + 1])
            full = bool(s[-1] > rtol * s[0]) and i < dh
            assert not proven[b, i] or full
    assert proven[:, :5].all()  # generic Gaussian prefixes are proven
    assert not proven[:6, 5:].any()  # the near-copies at 1e-6..1e-5 are not


def test_certified_full_column_rank_never_certifies_a_deficient_prefix():
    g = torch.Generator().manual_seed(4)
    n, dh, rtol = 16, 4, 1e-4
    M = torch.randn(40, n, dh, generator=g, dtype=torch.float64)
    # a column that is nearly zero in the first rows: long prefixes regain full column rank
    M[:, :10, 3] *= torch.logspace(-7, 0, 40, dtype=torch.float64)[:, None]
    _, proven = certified_prefix_full_rank(M, torch.full((n,), rtol, dtype=torch.float64))
    for b in range(40):
        for i in range(n):
            s = torch.linalg.svdvals(M[b, : i + 1])
            full = i >= dh - 1 and bool(s[dh - 1] > rtol * s[0])
            assert not proven[b, i] or full
    assert proven[-5:, dh - 1 :].all()  # well-conditioned prefixes are proven
    assert not proven[:5, :10].any()  # the nearly-zero column is not, while it stays tiny


def test_generic_heads_need_no_eigendecomposition(monkeypatch):
    """Well-conditioned prefixes are proven full rank: rows up to d_head keep A, longer ones go
    through the staircase basis; the result equals the per-prefix SVD path. (A random square
    prefix can be too ill-conditioned to prove, so the first d_head rows are made orthogonal.)"""
    import tgeom.analyses.identifiability.causal as causal

    g = torch.Generator().manual_seed(5)
    M = torch.randn(3, 36, 8, generator=g, dtype=torch.float64)
    M[:, :8] = torch.linalg.qr(M[:, :8]).Q * torch.linspace(1, 3, 8, dtype=torch.float64)
    A = causal_softmax(torch.randn(3, 36, 36, generator=g, dtype=torch.float64))
    exact, rank_exact = prefix_effective_attention(A, M, lambda m: EXACT)

    def no_eigh(*args):
        raise AssertionError("eigendecomposition path used on generic heads")

    monkeypatch.setattr(causal, "_gram_projection", no_eigh)
    fast, rank_fast = prefix_effective_attention(A, M, lambda m: FAST)
    assert torch.equal(rank_fast, rank_exact)
    assert torch.allclose(fast, exact, atol=1e-12)
    assert torch.equal(fast[..., :8, :], A[..., :8, :])


def test_repeated_rows_finds_bitwise_copies_only():
    from tgeom.analyses.identifiability.causal import repeated_rows

    g = torch.Generator().manual_seed(6)
    M = torch.randn(2, 9, 4, generator=g, dtype=torch.float64)
    M[0, 5], M[0, 7], M[0, 8] = M[0, 2], M[0, 2], M[0, 1]
    M[1, 3] = torch.nextafter(M[1, 0], torch.tensor(torch.inf, dtype=torch.float64))  # 1 ulp
    first = repeated_rows(M)
    assert first[0].tolist() == [0, 1, 2, 3, 4, 2, 6, 2, 1]
    assert first[1].tolist() == list(range(9))


def test_repeated_tokens_beyond_d_head_need_no_eigendecomposition(monkeypatch):
    """A first layer without positions: value rows repeat with the tokens. While the distinct rows
    are independent, the range of a prefix is the vectors constant on each class of equal rows
    (class averages); once they span R^dh, the staircase basis takes over. Both equal the
    per-prefix SVD, and no eigendecomposition is needed."""
    import tgeom.analyses.identifiability.causal as causal

    g = torch.Generator().manual_seed(7)
    n, dh, vocab = 48, 6, 9
    table = torch.linalg.qr(torch.randn(vocab, dh, generator=g, dtype=torch.float64)).Q
    table = table * torch.linspace(1, 2, dh, dtype=torch.float64)  # well-conditioned rows
    tokens = torch.cat(
        [torch.tensor([0, 1, 0, 2, 1, 3, 4, 4, 5]), torch.randint(0, vocab, (n - 9,), generator=g)]
    )
    M = table[tokens]
    A = causal_softmax(torch.randn(n, n, generator=g, dtype=torch.float64))
    expected, ranks = per_prefix_reference(A, M, FAST)

    def no_eigh(*args):
        raise AssertionError("eigendecomposition path used")

    monkeypatch.setattr(causal, "_gram_projection", no_eigh)
    effective, rank = prefix_effective_attention(A, M, lambda m: FAST)
    assert rank.tolist() == ranks
    assert ranks[2] == 2 and ranks[8] == 6  # a repeat at row 2; six distinct tokens by row 8
    assert torch.allclose(effective, expected, atol=1e-10)
    assert effective.triu(1).abs().max() == 0


@pytest.mark.parametrize("rtol", [FAST, EXACT])
def test_out_buffer_receives_the_same_result(rtol):
    g = torch.Generator().manual_seed(8)
    M = torch.randn(2, 20, 6, generator=g, dtype=torch.float64)
    M[1, 7] = M[1, 3]  # a repeated row takes the class-average path
    A = causal_softmax(torch.randn(2, 20, 20, generator=g, dtype=torch.float64))
    expected, rank = prefix_effective_attention(A, M, lambda m: rtol)
    out = torch.full_like(A, float("nan"))
    effective, rank_out = prefix_effective_attention(A, M, lambda m: rtol, out=out)
    assert effective.data_ptr() == out.data_ptr()
    assert torch.equal(out, expected) and torch.equal(rank_out, rank)


def test_staircase_null_basis_nests_the_prefix_null_spaces():
    """Orthonormal, in the left null space, zero below row d_head + c in column c, and for every
    prefix of full column rank its first columns span exactly that prefix's null space; also
    when the first d_head rows are dependent (a repeat) and when V is ill-conditioned."""
    from tgeom.analyses.identifiability.causal import staircase_null_basis

    g = torch.Generator().manual_seed(9)
    n, dh = 14, 5
    V = torch.randn(3, n, dh, generator=g, dtype=torch.float64)
    V[1, 3] = V[1, 1]  # V[:dh] singular: prefixes up to row dh are rank deficient
    V[2] = V[2] * torch.logspace(0, -4, dh, dtype=torch.float64)  # cond ~1e4
    U = staircase_null_basis(V)
    eye = torch.eye(n - dh, dtype=torch.float64)
    rows, cols = torch.arange(n)[:, None], torch.arange(n - dh)[None, :]
    for b in range(3):
        assert torch.allclose(U[b].T @ U[b], eye, atol=1e-12)
        assert (V[b].T @ U[b]).abs().max() <= 1e-12 * V[b].norm()
        assert torch.equal(U[b][rows > dh + cols], torch.zeros(int((rows > dh + cols).sum())))
        for i in range(dh - 1, n):
            prefix = V[b, : i + 1]
            if int(torch.linalg.matrix_rank(prefix)) < dh:
                assert b == 1 and i <= dh  # only the planted repeat
                continue
            N = left_null_space(prefix, rtol=1e-10)
            basis = U[b, : i + 1, : i + 1 - dh]
            assert torch.allclose(basis @ basis.T, N @ N.T, atol=1e-10)


def grouped_heads(g, B, K, group, n, dh):
    """Values of ``K`` KV heads shared by ``group`` query heads each, with right factors: generic,
    singular (rank dh - 1) and ill-conditioned (cond 1e3); one KV head repeats rows (a first
    layer without positions)."""
    H = K * group
    right = torch.randn(H, dh, dh, generator=g, dtype=torch.float64)
    right[1, :, 2] = right[1, :, 0]  # singular
    U, _, Vh = torch.linalg.svd(right[4])
    right[4] = U @ torch.diag(torch.logspace(0, -3, dh, dtype=torch.float64)) @ Vh
    smin = torch.linalg.svdvals(right)[:, -1]
    V = torch.randn(B, K, n, dh, generator=g, dtype=torch.float64)
    V[0, 1, 4], V[0, 1, 9], V[0, 1, 11] = V[0, 1, 1], V[0, 1, 2], V[0, 1, 1]
    A = causal_softmax(torch.randn(B, H, n, n, generator=g, dtype=torch.float64))
    return V, right, smin, A


@pytest.mark.parametrize("rtol", [FAST, EXACT])
def test_grouped_query_heads_equal_the_definition_on_m(rtol):
    """Grouped-query attention: one V per KV head, M_h = V_{h // group} right[h] per query head.
    Certificates from V, from M where V cannot prove a row, the staircase basis shared by the
    group and the eigendecomposition fallback together equal the per-prefix SVD of every M_h."""
    g = torch.Generator().manual_seed(10)
    B, K, group, n, dh = 2, 2, 3, 20, 5
    V, right, smin, A = grouped_heads(g, B, K, group, n, dh)
    effective, rank = prefix_effective_attention(A, V, lambda m: rtol, right=right, right_smin=smin)
    for b in range(B):
        for h in range(K * group):
            M = V[b, h // group] @ right[h]
            expected, ranks = per_prefix_reference(A[b, h], M, rtol)
            assert rank[b, h].tolist() == ranks
            assert torch.allclose(effective[b, h], expected, atol=1e-10)
            assert ((effective[b, h] - A[b, h]) @ M).norm() <= 1e-9 * (A[b, h] @ M).norm()
    assert (rank[:, 1, dh:] == dh - 1).all()  # the singular right factor costs a dimension
    assert rank[0, 3, 4] == 4  # the repeat in KV head 1 (query heads 3..5)


def test_output_gram_norms_equal_the_norms_of_the_formed_grams():
    """||M_h^T M_h||_F from tr((G P)^2) with one GEMM per KV head equals the norm of the
    formed Gram of M_h = V right[h], for every (sequence, KV head, query head) in that order,
    generic, singular and ill-conditioned right factors alike."""
    g = torch.Generator().manual_seed(21)
    B, K, group, n, dh = 3, 2, 3, 20, 5
    V, right, _, _ = grouped_heads(g, B, K, group, n, dh)
    G = (V.transpose(-1, -2) @ V).reshape(B * K, dh, dh)
    got = _output_gram_norms(G, right, group)
    expected = torch.stack(
        [
            torch.linalg.matrix_norm(
                (V[b, h // group] @ right[h]).T @ (V[b, h // group] @ right[h])
            )
            for b in range(B)
            for h in range(K * group)
        ]
    )
    assert torch.allclose(got, expected, rtol=1e-12, atol=0)


def test_full_rank_prefixes_the_certificate_misses_need_no_eigendecomposition(monkeypatch):
    """A square prefix whose s_min / s_max is just above the tolerance cannot be certified (the
    certificate keeps a safety margin) but has full rank: its eigenvalues say so, and the rows
    after it (which barely raise s_min) are projected with the staircase basis, not by
    eigendecompositions."""
    import tgeom.analyses.identifiability.causal as causal

    g = torch.Generator().manual_seed(11)
    n, dh = 24, 6
    Q = torch.linalg.qr(torch.randn(dh, dh, generator=g, dtype=torch.float64)).Q
    top = Q * torch.logspace(0, float(torch.log10(torch.tensor(1.05 * FAST))), dh).double()
    tiny = 1e-6 * torch.randn(4, dh, generator=g, dtype=torch.float64)  # s_min barely moves
    rest = 1e-3 * torch.randn(n - dh - 4, dh, generator=g, dtype=torch.float64)
    M = torch.cat([top, tiny, rest])
    A = causal_softmax(torch.randn(n, n, generator=g, dtype=torch.float64))
    expected, ranks = per_prefix_reference(A, M, FAST)
    assert ranks == [min(i + 1, dh) for i in range(n)]  # full rank everywhere

    ranked = []
    prefix_ranks = causal._prefix_ranks

    def counted(*args, **kwargs):
        ranked.append(len(args[1]))
        return prefix_ranks(*args, **kwargs)

    def no_eigh(*args):
        raise AssertionError("eigendecomposition path used on full-rank prefixes")

    monkeypatch.setattr(causal, "_prefix_ranks", counted)
    monkeypatch.setattr(causal, "_gram_projection", no_eigh)
    effective, rank = prefix_effective_attention(A, M, lambda m: FAST)
    assert sum(ranked) >= 5  # rows dh - 1 .. dh + 3 were left to the eigenvalues
    assert rank.tolist() == ranks
    assert torch.allclose(effective, expected, atol=1e-10)


def test_column_rank_search_stops_at_a_known_bound():
    """The column-rank search of a certificate (:func:`_certify`) with ``bound``: rows from
    which another certificate proved full column rank already. Heads whose first ``d_head`` rows
    are nearly dependent need the search; every row it returns as proven is proven (the shifted
    prefix Gram has no eigenvalue below the shift, by float64 eigenvalues), no anchor lies past
    its bound (rows from it on count as proven), and with the bound at ``n`` the result is the
    unbounded one."""
    from tgeom.analyses.identifiability.causal import _certify, repeated_rows

    g = torch.Generator().manual_seed(21)
    b, n, dh = 6, 40, 8
    M = torch.randn(b, n, dh, generator=g, dtype=torch.float64)
    M[:, dh - 1] = M[:, : dh - 1].sum(1) + 1e-6 * M[:, dh - 1]  # square prefix near singular
    M[:, dh : dh + 6] *= 1e-3  # the next rows add little: the search has to go further
    shift = torch.full((b,), 1e-4 * float((M.mT @ M).norm(dim=(-2, -1)).max()))
    first = repeated_rows(M)
    bound = torch.tensor([n, n, 30, 20, 12, dh])
    free, bounded = _certify(M, shift, first), _certify(M, shift, first, bound)
    assert torch.equal(_certify(M, shift, first, torch.full((b,), n)).col_ok, free.col_ok)
    for cert, limit in ((free, torch.full((b,), n)), (bounded, bound)):
        anchor = torch.where(cert.col_ok.any(-1), cert.col_ok.to(torch.uint8).argmax(-1), n)
        assert bool((anchor <= limit).all()) and bool((anchor > dh - 1).all())
        for h in range(b):
            for i in range(int(anchor[h]), int(limit[h])):
                lam = torch.linalg.eigvalsh(M[h, : i + 1].mT @ M[h, : i + 1])
                assert float(lam[0]) > float(shift[h])


def test_staircase_projection_in_row_blocks_equals_the_row_by_row_formula():
    """The staircase projection works on blocks of rows with GEMMs cut to the keys and basis
    columns each block can meet; every row equals ``a_i - sum_{c <= i - dh} (a_i . u_c) u_c``
    computed one row at a time over the whole basis (n = 150, d_head = 6: four blocks), and
    rows not marked in ``use`` are left alone."""
    from tgeom.analyses.identifiability.causal import _staircase_project, staircase_null_basis

    g = torch.Generator().manual_seed(22)
    k, q, n, dh = 2, 3, 150, 6
    V = torch.randn(k, n, dh, generator=g, dtype=torch.float64)
    U = staircase_null_basis(V)  # [k, n, n - dh]
    A = causal_softmax(torch.randn(k, q, n, n, generator=g, dtype=torch.float64))
    use = torch.rand(k, q, n, generator=g) < 0.8
    use[..., :dh] = False
    start = dh
    E = A.clone()
    _staircase_project(E, U, use, start)
    expected = A.clone()
    for h in range(k):
        for j in range(q):
            for i in range(start, n):
                if use[h, j, i]:
                    basis = U[h, :, : i + 1 - dh]
                    a = A[h, j, i]
                    expected[h, j, i] = a - (a @ basis) @ basis.T
    assert torch.allclose(E, expected, rtol=0, atol=1e-13)
    assert torch.equal(E.triu(1), torch.zeros_like(E))  # still causal, exactly
