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


def test_float32_rounding_counts_as_rank_unless_the_tolerance_says_otherwise():
    """A product formed in float32 is full rank at the float64 default tolerance; a tolerance
    above float32 rounding recovers the exact rank (callers form T in float64, see effective)."""
    g = torch.Generator().manual_seed(3)
    T = torch.randn(10, 4, generator=g) @ torch.randn(4, 16, generator=g)
    assert numerical_rank(T, rtol=1e-5) == 4
