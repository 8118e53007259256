"""DCT-II, stable rank and the Gavish-Donoho rank against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch

from tgeom.linalg.spectral import dct_matrix, optimal_rank, stable_rank


@pytest.mark.parametrize("n", [1, 2, 7, 16])
def test_dct_matrix_matches_scipy_orthonormal_dct(n: int) -> None:
    x = np.random.default_rng(n).normal(size=(n, 3))
    ours = dct_matrix(n).numpy() @ x
    np.testing.assert_allclose(ours, scipy.fft.dct(x, axis=0, norm="ortho"), atol=1e-12)


def test_dct_matrix_is_orthonormal() -> None:
    d = dct_matrix(12)
    torch.testing.assert_close(d @ d.T, torch.eye(12, dtype=torch.float64))


def test_stable_rank_is_frobenius_over_spectral_norm() -> None:
    a = torch.randn(20, 9, dtype=torch.float64)
    s = torch.linalg.svdvals(a)
    expected = torch.linalg.matrix_norm(a) ** 2 / torch.linalg.matrix_norm(a, ord=2) ** 2
    assert stable_rank(s) == pytest.approx(float(expected), rel=1e-12)
    assert stable_rank(torch.zeros(3)) == 0.0


@pytest.mark.parametrize(("m", "n", "rank"), [(200, 100, 5), (100, 100, 3), (60, 300, 8)])
def test_optimal_rank_recovers_planted_rank(m: int, n: int, rank: int) -> None:
    gen = torch.Generator().manual_seed(rank)
    signal = torch.randn(m, rank, generator=gen, dtype=torch.float64) @ torch.randn(
        rank, n, generator=gen, dtype=torch.float64
    )
    noise = 0.05 * torch.randn(m, n, generator=gen, dtype=torch.float64)
    s = torch.linalg.svdvals(signal + noise)
    assert optimal_rank(s, (m, n)) == rank


def test_optimal_rank_of_pure_noise_is_near_zero() -> None:
    s = torch.linalg.svdvals(torch.randn(200, 100, generator=torch.Generator().manual_seed(1)))
    assert optimal_rank(s, (200, 100)) <= 1
