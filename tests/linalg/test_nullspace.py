"""Left null spaces and numerical rank against float64 brute force."""

from __future__ import annotations

import torch

from tgeom.linalg.nullspace import left_null_space, null_space_projectors, numerical_rank


def test_left_null_space_annihilates_and_is_orthonormal():
    g = torch.Generator().manual_seed(0)
    T = torch.randn(12, 5, generator=g, dtype=torch.float64) @ torch.randn(
        5, 20, generator=g, dtype=torch.float64
    )
    N = left_null_space(T)
    assert N.shape == (12, 7)
    assert (N.T @ T).abs().max() < 1e-10
    assert torch.allclose(N.T @ N, torch.eye(7, dtype=torch.float64), atol=1e-12)
    assert numerical_rank(T) == 5 == torch.linalg.matrix_rank(T).item()


def test_full_rank_has_trivial_null_space():
    T = torch.randn(4, 9, generator=torch.Generator().manual_seed(1))
    assert left_null_space(T).shape == (4, 0)


def test_batched_projectors_match_single():
    g = torch.Generator().manual_seed(2)
    f64 = torch.float64
    T = torch.randn(3, 10, 4, generator=g, dtype=f64) @ torch.randn(
        3, 4, 16, generator=g, dtype=f64
    )
    P, rank = null_space_projectors(T)
    assert rank.tolist() == [4, 4, 4]
    for b in range(3):
        N = left_null_space(T[b])
        assert torch.allclose(P[b], N @ N.T, atol=1e-10)


def test_float32_rounding_of_a_rank_deficient_matrix_does_not_count_as_rank():
    """The default tolerance follows the stored dtype (max(n, m) * eps); a float64 tolerance
    would count float32 rounding as rank."""
    g = torch.Generator().manual_seed(3)
    T = torch.randn(10, 4, generator=g) @ torch.randn(4, 16, generator=g)  # float32, rank 4
    assert numerical_rank(T) == 4
    assert left_null_space(T).shape == (10, 6)
    assert numerical_rank(T, rtol=1e-12) > 4
    assert numerical_rank(T.double()) > 4  # float64 data: float32 noise is real rank


def test_rank_matches_brute_force_over_random_ranks():
    g = torch.Generator().manual_seed(4)
    for r in range(0, 7):
        T = torch.randn(9, r, generator=g, dtype=torch.float64) @ torch.randn(
            r, 11, generator=g, dtype=torch.float64
        )
        assert numerical_rank(T) == r
        N = left_null_space(T)
        assert N.shape == (9, 9 - r)
        if r:
            assert (N.T @ T).abs().max() < 1e-10 * T.abs().max()
