"""Spectral helpers for the positional part of hidden states [SZ] (SPEC section 4).

- :func:`dct_matrix`: the orthonormal DCT-II basis, used to read the smoothness of the positional
  Gram matrix (a smooth Gram concentrates its energy in low frequencies).
- :func:`stable_rank`: ``||P||_F^2 / ||P||_2^2`` from singular values.
- :func:`optimal_rank`: the Gavish-Donoho optimal hard threshold for a matrix with unknown
  noise level (Gavish & Donoho 2014, "The optimal hard threshold for singular values is 4/sqrt(3)",
  eq. for ``omega(beta)``): ``tau = omega(beta) * median(s)`` with the cubic approximation
  ``omega(beta) ~ 0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


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
    s = singular_values.double()
    top = float(s.max()) if s.numel() else 0.0
    if top == 0.0:
        return 0.0
    return float((s**2).sum() / top**2)


def gavish_donoho_omega(beta: float) -> float:
    """``omega(beta)``, the threshold coefficient for unknown noise (cubic approximation)."""
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def optimal_rank(singular_values: Tensor, shape: Sequence[int]) -> int:
    """Rank estimated by the Gavish-Donoho hard threshold for an ``m x n`` matrix of unknown noise.

    ``singular_values``: all ``min(m, n)`` singular values. ``beta = min(m, n) / max(m, n)``;
    counts the singular values above ``omega(beta) * median(s)``.
    """
    m, n = int(shape[0]), int(shape[1])
    s = singular_values.double().flatten()
    if s.numel() != min(m, n):
        raise ValueError(
            f"expected {min(m, n)} singular values for shape {(m, n)}, got {s.numel()}"
        )
    if s.numel() == 0:
        return 0
    beta = min(m, n) / max(m, n)
    tau = gavish_donoho_omega(beta) * float(s.median() if s.numel() % 2 else _median(s))
    return int((s > tau).sum())


def _median(s: Tensor) -> Tensor:
    """The usual median (mean of the two middle values for an even count; torch takes the lower)."""
    ordered = s.sort().values
    mid = s.numel() // 2
    return (ordered[mid - 1] + ordered[mid]) / 2
