"""Spectral helpers for the positional part of hidden states [SZ] (SPEC section 4).

- :func:`dct_matrix`: the orthonormal DCT-II basis, used to read the smoothness of the positional
  Gram matrix (a smooth Gram concentrates its energy in low frequencies).
- :func:`stable_rank`: ``||P||_F^2 / ||P||_2^2`` from singular values.
- :func:`optimal_rank`: the Gavish-Donoho optimal hard threshold for a matrix with unknown
  noise level (Gavish & Donoho 2014, "The optimal hard threshold for singular values is 4/sqrt(3)",
  eq. for ``omega(beta)``): ``tau = omega(beta) * median(s)``. ``omega`` is either the paper's
  cubic approximation ``0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43`` (``method="cubic"``, the
  default) or computed exactly (``method="exact"``) as ``lambda*(beta) / sqrt(mu_beta)``, with
  ``lambda*(beta) = sqrt(2 (beta + 1) + 8 beta / (beta + 1 + sqrt(beta^2 + 14 beta + 1)))`` and
  ``mu_beta`` the median of the Marchenko-Pastur law of ratio ``beta`` (found numerically: scipy
  quadrature of the density and a root of CDF - 1/2). The two differ by < 0.016 on (0, 1].
- :func:`screenot_rank`: the ScreeNOT adaptive hard threshold (Donoho, Gavish & Romanov 2023)
  as the [SZ] code calls it, ``adaptiveHardThresholding(P, k, strategy)`` of the ``screenot``
  package: the rank convention of the paper's own metrics (``k = 20``, imputation ``"i"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from tgeom.errors import check_finite


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Orthonormal DCT-II matrix ``D [n, n]``: ``(D x)_k = scipy.fft.dct(x, norm='ortho')_k``.

    ``D[k, j] = s_k cos(pi (2j + 1) k / (2n))`` with ``s_0 = sqrt(1/n)``, ``s_k = sqrt(2/n)``;
    ``D @ D.T = I``. A matrix ``G [n, n]`` is transformed as ``D @ G @ D.T``.
    """
    if n < 1:
        raise ValueError(f"dct_matrix needs n >= 1, got {n}")
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * j + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] = math.sqrt(1.0 / n)
    return d.to(dtype)


def stable_rank(singular_values: Tensor) -> float:
    """``sum s^2 / max s^2`` (1 <= stable rank <= rank); 0.0 for a zero matrix."""
    s = check_finite("the singular values", singular_values).double()
    top = float(s.max()) if s.numel() else 0.0
    if top == 0.0:
        return 0.0
    return float((s**2).sum() / top**2)


RANK_METHODS = ("cubic", "exact")


def marchenko_pastur_median(beta: float) -> float:
    """Median of the Marchenko-Pastur law with aspect ratio ``beta`` in (0, 1] and unit variance
    (the limit law of the eigenvalues of ``X X^T / n`` for ``X [m, n]`` i.i.d. N(0, 1),
    ``beta = m / n``): density ``sqrt((b - x)(x - a)) / (2 pi beta x)`` on
    ``[a, b] = [(1 - sqrt(beta))^2, (1 + sqrt(beta))^2]``."""
    from scipy import integrate, optimize

    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2

    def density(x: float) -> float:
        return math.sqrt(max((hi - x) * (x - lo), 0.0)) / (2 * math.pi * beta * x)

    def cdf_minus_half(m: float) -> float:
        return float(integrate.quad(density, lo, m, limit=200)[0]) - 0.5

    return float(optimize.brentq(cdf_minus_half, lo, hi, xtol=1e-13))


def gavish_donoho_lambda(beta: float) -> float:
    """``lambda*(beta)``, the optimal threshold coefficient for a *known* noise level
    (``4 / sqrt(3)`` for square matrices)."""
    return math.sqrt(2 * (beta + 1) + 8 * beta / ((beta + 1) + math.sqrt(beta**2 + 14 * beta + 1)))


def gavish_donoho_omega(beta: float, method: str = "cubic") -> float:
    """``omega(beta)``, the threshold coefficient for unknown noise: the paper's cubic
    approximation, or ``lambda*(beta) / sqrt(mu_beta)`` exactly (``method="exact"``)."""
    if method == "cubic":
        return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
    if method == "exact":
        return gavish_donoho_lambda(beta) / math.sqrt(marchenko_pastur_median(beta))
    raise ValueError(f"method must be one of {RANK_METHODS}, got {method!r}")


def optimal_rank(singular_values: Tensor, shape: Sequence[int], method: str = "cubic") -> int:
    """Rank estimated by the Gavish-Donoho hard threshold for an ``m x n`` matrix of unknown noise.

    ``singular_values``: all ``min(m, n)`` singular values. ``beta = min(m, n) / max(m, n)``;
    counts the singular values above ``omega(beta) * median(s)`` (``method``: how omega is
    computed, see :func:`gavish_donoho_omega`).
    """
    m, n = int(shape[0]), int(shape[1])
    s = check_finite("the singular values", singular_values).double().flatten()
    if s.numel() != min(m, n):
        raise ValueError(
            f"expected {min(m, n)} singular values for shape {(m, n)}, got {s.numel()}"
        )
    if s.numel() == 0:
        return 0
    beta = min(m, n) / max(m, n)
    tau = gavish_donoho_omega(beta, method) * float(s.median() if s.numel() % 2 else _median(s))
    return int((s > tau).sum())


def _median(s: Tensor) -> Tensor:
    """The usual median (mean of the two middle values for an even count; torch takes the lower)."""
    ordered = s.sort().values
    mid = s.numel() // 2
    return (ordered[mid - 1] + ordered[mid]) / 2


SCREENOT_STRATEGIES = ("i", "w", "0")


def screenot_fits(shape: Sequence[int], k: int, strategy: str = "i") -> bool:
    """Whether ScreeNOT can run on an ``m x n`` matrix with signal-rank bound ``k``: it needs
    ``2 k + 1 < min(m, n)`` for imputation (``"i"``), ``k < min(m, n)`` otherwise."""
    smallest = min(int(shape[0]), int(shape[1]))
    return 2 * k + 1 < smallest if strategy == "i" else k < smallest


def screenot_rank(matrix: Tensor, k: int = 20, strategy: str = "i") -> int:
    """Rank kept by ScreeNOT's optimal adaptive hard threshold on ``matrix [m, n]`` (float64 on
    the CPU): the number of singular values above the threshold that the package derives from
    the bulk left after imputing the top ``k``. Raises ValueError when
    :func:`screenot_fits` is false; 0 for a zero matrix (the package's search never ends)."""
    from screenot.ScreeNOT import adaptiveHardThresholding

    if strategy not in SCREENOT_STRATEGIES:
        raise ValueError(f"strategy must be one of {SCREENOT_STRATEGIES}, got {strategy!r}")
    if not screenot_fits(tuple(matrix.shape), k, strategy):
        raise ValueError(f"ScreeNOT with k={k} needs 2k+1 < min(m, n); shape {tuple(matrix.shape)}")
    y = check_finite("the matrix", matrix).detach().double().cpu().numpy()
    if not y.any():
        return 0
    return int(adaptiveHardThresholding(y, k=k, strategy=strategy)[-1])
