"""Subspaces: top singular subspaces and principal angles between them [SZ] (SPEC section 4)."""

from __future__ import annotations

import torch
from torch import Tensor

from tgeom.errors import check_finite


def _orthonormal_basis(a: Tensor) -> Tensor:
    """An orthonormal basis ``[d, r]`` of the column span of ``a [d, k]`` (float64, SVD-based)."""
    u, s, _ = torch.linalg.svd(check_finite("the subspace basis", a).double(), full_matrices=False)
    tol = s.max() * max(a.shape) * torch.finfo(torch.float64).eps if s.numel() else 0.0
    return u[:, s > tol]


def principal_angles(u: Tensor, w: Tensor) -> Tensor:
    """Principal angles (radians, ascending) between the column spans of ``u [d, k1]`` and
    ``w [d, k2]``; ``min(k1, k2)`` angles (columns need not be orthonormal; float64).

    Cosines are the singular values of ``Q_u^T Q_w``; small angles are taken from the sines
    (the singular values of ``Q_w - Q_u Q_u^T Q_w``) for accuracy, as in Knyazev & Argentati.
    """
    if u.shape[0] != w.shape[0]:
        raise ValueError(f"subspaces live in different spaces: {u.shape[0]} vs {w.shape[0]}")
    qu, qw = _orthonormal_basis(u), _orthonormal_basis(w)
    if qu.shape[1] < qw.shape[1]:
        qu, qw = qw, qu
    k = min(u.shape[1], w.shape[1])
    cos = torch.linalg.svdvals(qu.T @ qw).clamp(max=1.0)
    angles = torch.arccos(cos)  # cos descending -> angles ascending
    sin = torch.linalg.svdvals(qw - qu @ (qu.T @ qw)).clamp(max=1.0).flip(0)  # ascending sines
    small = cos**2 >= 0.5
    angles = torch.where(small, torch.arcsin(sin[: cos.numel()]), angles)
    if angles.numel() < k:  # rank-deficient input: missing directions are orthogonal
        pad = torch.full((k - angles.numel(),), torch.pi / 2, dtype=torch.float64)
        angles = torch.cat([angles, pad])
    return angles[:k]


def top_subspace(x: Tensor, k: int) -> Tensor:
    """The top-``k`` right singular vectors ``[d, k']`` of ``x [n, d]`` (``k' = min(k, n, d)``),
    float64: the span of the rows that carries most of their energy (no centring)."""
    _, _, vh = torch.linalg.svd(check_finite("the matrix", x).double(), full_matrices=False)
    return vh[: min(k, vh.shape[0])].T
