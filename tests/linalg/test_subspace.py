"""Principal angles against scipy.linalg.subspace_angles; top subspace against a brute SVD."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from tgeom.linalg.subspace import principal_angles, top_subspace


@pytest.mark.parametrize(("d", "k1", "k2"), [(10, 3, 3), (30, 5, 2), (8, 2, 6)])
def test_principal_angles_match_scipy(d: int, k1: int, k2: int) -> None:
    rng = np.random.default_rng(d + k1)
    u, w = rng.normal(size=(d, k1)), rng.normal(size=(d, k2))
    ours = principal_angles(torch.from_numpy(u), torch.from_numpy(w)).numpy()
    ref = np.sort(scipy.linalg.subspace_angles(u, w))
    np.testing.assert_allclose(ours, ref, atol=1e-10)


def test_principal_angles_of_nearly_equal_subspaces_are_accurate() -> None:
    rng = np.random.default_rng(0)
    u = rng.normal(size=(20, 3))
    w = u + 1e-9 * rng.normal(size=(20, 3))
    ours = principal_angles(torch.from_numpy(u), torch.from_numpy(w)).numpy()
    np.testing.assert_allclose(ours, np.sort(scipy.linalg.subspace_angles(u, w)), atol=1e-12)


def test_top_subspace_spans_planted_directions() -> None:
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 2, generator=gen, dtype=torch.float64)).Q
    x = torch.randn(50, 2, generator=gen, dtype=torch.float64) * 10 @ basis.T
    x = x + 1e-3 * torch.randn(50, 16, generator=gen, dtype=torch.float64)
    angles = principal_angles(top_subspace(x, 2), basis)
    assert float(angles.max()) < 1e-3
