"""DCT-II, stable rank and the Gavish-Donoho rank against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch

from tgeom.linalg.spectral import (
    dct_matrix,
    gavish_donoho_lambda,
    gavish_donoho_omega,
    marchenko_pastur_median,
    optimal_rank,
    stable_rank,
)


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


def test_marchenko_pastur_median_matches_random_matrix_eigenvalues() -> None:
    m, n = 400, 800  # beta = 0.5
    x = np.random.default_rng(0).normal(size=(m, n))
    empirical = float(np.median(np.linalg.eigvalsh(x @ x.T / n)))
    assert marchenko_pastur_median(m / n) == pytest.approx(empirical, abs=0.02)


def test_lambda_star_of_square_matrices_is_four_over_root_three() -> None:
    # Gavish & Donoho (2014): the optimal threshold for square matrices is 4/sqrt(3) sigma sqrt(n)
    assert gavish_donoho_lambda(1.0) == pytest.approx(4 / np.sqrt(3), rel=1e-14)


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.25, 0.5, 0.75, 1.0])
def test_cubic_omega_approximates_the_exact_one(beta: float) -> None:
    exact = gavish_donoho_omega(beta, "exact")
    # the exact omega(1) = 2.858 is the value the paper quotes for square matrices
    assert abs(gavish_donoho_omega(beta, "cubic") - exact) < 0.02
    if beta == 1.0:
        assert exact == pytest.approx(2.858, abs=1e-3)


def test_exact_threshold_recovers_planted_rank() -> None:
    gen = torch.Generator().manual_seed(4)
    signal = torch.randn(150, 4, generator=gen, dtype=torch.float64) @ torch.randn(
        4, 90, generator=gen, dtype=torch.float64
    )
    noisy = signal + 0.05 * torch.randn(150, 90, generator=gen, dtype=torch.float64)
    assert optimal_rank(torch.linalg.svdvals(noisy), (150, 90), method="exact") == 4


def test_unknown_omega_method_is_refused() -> None:
    with pytest.raises(ValueError, match="method"):
        gavish_donoho_omega(0.5, "quartic")
