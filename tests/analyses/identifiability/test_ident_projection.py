"""Bidirectional effective attention on both paths (Gram + refinement, SVD) against the
definition A - A N N^T with N from a full float64 SVD."""

from __future__ import annotations

import pytest
import torch

from tgeom.analyses.identifiability.causal import FAST_PATH_MIN_RTOL
from tgeom.analyses.identifiability.effective import effective_attention_batch
from tgeom.analyses.identifiability.projection import sequence_effective_attention, sequence_rank
from tgeom.capture import capture
from tgeom.linalg.nullspace import left_null_space

FAST, EXACT = 4 * FAST_PATH_MIN_RTOL, 1e-10


def reference(A, M, rtol):
    N = left_null_space(M, rtol=rtol)
    return A - A @ N @ N.T, M.shape[0] - N.shape[1]


@pytest.mark.parametrize("rtol", [FAST, EXACT])
def test_sequence_effective_attention_matches_full_svd(rtol):
    g = torch.Generator().manual_seed(0)
    H, n, dh = 4, 20, 6
    Q = torch.linalg.qr(torch.randn(H, n, dh, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, float(torch.log10(torch.tensor(3 * FAST))), dh, dtype=torch.float64)
    M = (Q * s) @ torch.linalg.qr(torch.randn(H, dh, dh, generator=g, dtype=torch.float64)).Q
    M[1, :, 2] = M[1, :, 0]  # an exactly rank-deficient head
    A = torch.softmax(torch.randn(H, n, n, generator=g, dtype=torch.float64), dim=-1)
    effective, rank = sequence_effective_attention(A, M, rtol)
    assert torch.equal(rank, sequence_rank(M, rtol))
    for h in range(H):
        expected, r = reference(A[h], M[h], rtol)
        assert int(rank[h]) == r
        assert torch.allclose(effective[h], expected, atol=1e-11)
    assert int(rank[1]) == dh - 1


@pytest.mark.parametrize("rtol", [FAST, EXACT])
def test_short_sequences_keep_attention_bit_for_bit(rtol):
    g = torch.Generator().manual_seed(1)
    M = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    A = torch.softmax(torch.randn(3, 5, 5, generator=g, dtype=torch.float64), dim=-1)
    effective, rank = sequence_effective_attention(A, M, rtol)
    assert rank.tolist() == [5, 5, 5] and torch.equal(effective, A)


def test_tiny_encoder_on_the_gram_path_matches_full_svd(tiny_model):
    """Tiny models have d_model = 32, so their default tolerance takes the SVD path; an explicit
    float32-level tolerance sends them through the Gram path."""
    lm = tiny_model("bert")
    ids = torch.randint(4, 96, (1, 19), generator=torch.Generator().manual_seed(2))
    (seq,) = effective_attention_batch(lm, ids, rtol=FAST)
    cap = capture(lm, ids, attentions=True, values=True)
    for layer, lw in enumerate(lm.weights().layers):
        for head in range(lm.summary.n_heads):
            T = cap.values[layer, 0, head].double() @ lw.W_O[head].double()
            expected, r = reference(cap.attentions[layer, 0, head].double(), T, FAST)
            assert torch.allclose(seq.effective[layer, head], expected, atol=1e-10)
            assert int(seq.rank[layer, head]) == r == lm.summary.d_head


def test_generic_heads_are_proven_and_need_no_eigendecomposition(monkeypatch):
    """Well-conditioned heads take the Cholesky-certified path (n > d_head: A Q Q^T; n <= d_head:
    A itself) and still equal the full-SVD definition."""
    import tgeom.analyses.identifiability.projection as projection

    def no_eigh(*args):
        raise AssertionError("eigendecomposition path used on generic heads")

    monkeypatch.setattr(projection.HeadProjectors, "_gram", classmethod(no_eigh))
    g = torch.Generator().manual_seed(3)
    for n in (5, 40):
        M = torch.randn(3, n, 8, generator=g, dtype=torch.float64)
        A = torch.softmax(torch.randn(3, n, n, generator=g, dtype=torch.float64), dim=-1)
        effective, rank = sequence_effective_attention(A, M, FAST)
        for h in range(3):
            expected, r = reference(A[h], M[h], FAST)
            assert int(rank[h]) == r == min(n, 8)
            assert torch.allclose(effective[h], expected, atol=1e-11)
        if n <= 8:
            assert torch.equal(effective, A)


def test_certificate_never_proves_a_deficient_head():
    from tgeom.analyses.identifiability.projection import certified_full_rank

    g = torch.Generator().manual_seed(4)
    M = torch.randn(40, 30, 6, generator=g, dtype=torch.float64)
    M[:, :, 5] = M[:, :, 4] + torch.logspace(-8, 0, 40, dtype=torch.float64)[:, None] * torch.randn(
        40, 30, generator=g, dtype=torch.float64
    )
    proven, _, _ = certified_full_rank(M, FAST)
    s = torch.linalg.svdvals(M)
    full = s[:, -1] > FAST * s[:, 0]
    assert not (proven & ~full).any()
    assert proven[-5:].all() and not proven[:5].any()


@pytest.mark.parametrize("rtol", [FAST, EXACT])
def test_values_route_equals_the_definition_on_m(rtol):
    """Given V and the right factor (M = V R), heads whose V proves M full rank use V's range;
    a singular R (rank-deficient W_O) and an ill-conditioned R fall back to M. Every head equals
    the full-SVD definition on M = V R, in both shapes (n > d_head and n <= d_head)."""
    g = torch.Generator().manual_seed(7)
    H, dh = 4, 6
    right = torch.randn(H, dh, dh, generator=g, dtype=torch.float64)
    right[1, :, 3] = right[1, :, 0]  # singular: rank(M) <= dh - 1
    U, _, Vh = torch.linalg.svd(right[2])
    right[2] = U @ torch.diag(torch.logspace(0, -6, dh, dtype=torch.float64)) @ Vh  # cond 1e6
    s = torch.linalg.svdvals(right)
    cond2 = torch.where(s[:, -1] > 0, (s[:, 0] / s[:, -1]) ** 2, torch.inf)
    for n in (15, 5):
        V = torch.randn(3, H, n, dh, generator=g, dtype=torch.float64)
        A = torch.softmax(torch.randn(3, H, n, n, generator=g, dtype=torch.float64), dim=-1)
        effective, rank = sequence_effective_attention(A, V, rtol, right=right, right_cond2=cond2)
        M = V @ right
        assert torch.equal(rank, sequence_rank(M, rtol))
        for b in range(3):
            for h in range(H):
                expected, r = reference(A[b, h], M[b, h], rtol)
                assert int(rank[b, h]) == r
                assert torch.allclose(effective[b, h], expected, atol=1e-10)
        assert (rank[:, 1] == min(n, dh - 1)).all()  # the singular head lost a dimension
