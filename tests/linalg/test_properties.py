"""Property-based tests (hypothesis) of the linear-algebra core on hostile matrices: zero rows,
duplicate rows, rank deficiency, NaN and inf. Rank, null spaces, spectra and principal angles
against numpy (float64, independent implementation); effective attention against the definition
``A - A N N^T`` with ``N`` from a full SVD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tgeom.analyses.identifiability.causal import prefix_effective_attention
from tgeom.analyses.identifiability.projection import sequence_effective_attention
from tgeom.errors import TgeomError
from tgeom.linalg.nullspace import left_null_space, numerical_rank
from tgeom.linalg.spectral import optimal_rank, stable_rank
from tgeom.linalg.subspace import principal_angles

RTOL = 1e-4  # a float32-level tolerance: the fast paths of the effective attention
finite = st.floats(-4, 4, allow_nan=False, allow_infinity=False, width=32)
settings_ = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI cannot flake
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def hostile(draw, max_rows: int = 9, max_cols: int = 5):
    """A float64 matrix with, at random, zero rows, repeated rows and a repeated column."""
    n, m = draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols))
    T = torch.tensor(draw(st.lists(finite, min_size=n * m, max_size=n * m)), dtype=torch.float64)
    T = T.reshape(n, m)
    for i in draw(st.lists(st.integers(0, n - 1), max_size=3)):
        T[i] = 0.0
    for i, j in draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=3)):
        T[i] = T[j]
    if m > 1 and draw(st.booleans()):
        T[:, -1] = T[:, 0]
    return T


def numpy_rank(T: torch.Tensor, rtol: float) -> int:
    s = np.linalg.svd(T.numpy(), compute_uv=False)
    return int((s > rtol * s[0]).sum()) if s.size and s[0] > 0 else 0


def well_separated(T: torch.Tensor, rtol: float) -> bool:
    """No singular value within a factor 10 of the threshold (where rank is a matter of ulps)."""
    s = np.linalg.svd(T.numpy(), compute_uv=False)
    if not s.size or s[0] == 0:
        return True
    ratio = s / s[0]
    return bool(np.all((ratio > 10 * rtol) | (ratio < rtol / 10)))


@settings_
@given(hostile())
def test_rank_and_left_null_space(T):
    rtol = 1e-9
    assume(well_separated(T, rtol))  # else the rank itself is a matter of ulps
    rank = numerical_rank(T, rtol=rtol)
    assert rank == numpy_rank(T, rtol)
    N = left_null_space(T, rtol=rtol)
    assert N.shape == (T.shape[0], T.shape[0] - rank)
    torch.testing.assert_close(
        N.T @ N, torch.eye(N.shape[1], dtype=torch.float64), atol=1e-10, rtol=0
    )
    assert float((N.T @ T).norm()) <= 1e-9 * max(1.0, float(T.norm()))


@settings_
@given(hostile())
def test_spectral_summaries_stay_in_range(T):
    s = torch.linalg.svdvals(T)
    rank = numpy_rank(T, 1e-12)
    sr = stable_rank(s)
    if rank == 0:
        assert sr == 0.0
    else:
        assert 1.0 - 1e-12 <= sr <= rank + 1e-9
    assert 0 <= optimal_rank(s, tuple(T.shape)) <= min(T.shape)


@settings_
@given(hostile(max_rows=7, max_cols=4), st.integers(1, 3))
def test_principal_angles_are_angles(T, k):
    U = T[:, :k]
    angles = principal_angles(U, T)
    assert angles.numel() == min(U.shape[1], T.shape[1])
    assert bool(((angles >= 0) & (angles <= math.pi / 2 + 1e-12)).all())
    if numpy_rank(U, 1e-10) == U.shape[1]:  # a subspace of T's span: every angle is zero
        assert float(angles.max()) <= 1e-6


@st.composite
def heads(draw):
    """``A [n, n]`` a (causal or not) softmax, ``M [n, dh]`` hostile value rows."""
    M = draw(hostile(max_rows=10, max_cols=4))
    n = M.shape[0]
    scores = torch.tensor(
        draw(st.lists(finite, min_size=n * n, max_size=n * n)), dtype=torch.float64
    )
    return scores.reshape(n, n), M


def reference_rows(A, M, rtol, causal):
    out = torch.zeros_like(A)
    for i in range(A.shape[0]):
        rows = slice(0, i + 1) if causal else slice(None)
        N = left_null_space(M[rows], rtol=rtol)
        a = A[i, rows]
        out[i, rows] = a - a @ N @ N.T
    return out


@settings_
@given(heads(), st.booleans())
def test_effective_attention_on_hostile_heads(head, causal):
    scores, M = head
    n = M.shape[0]
    if causal:
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    A = torch.softmax(scores, dim=-1)
    prefixes = [M[: i + 1] for i in range(n)] if causal else [M]
    assume(all(well_separated(P, RTOL) for P in prefixes))  # else the rank is ambiguous
    if causal:
        effective, _ = prefix_effective_attention(A, M, lambda m: RTOL)
    else:
        effective, _ = sequence_effective_attention(A, M, RTOL)
    expected = reference_rows(A, M, RTOL, causal)
    torch.testing.assert_close(effective, expected, atol=1e-9, rtol=0)
    assert float(((effective - A) @ M).abs().max()) <= 1e-8 * max(1.0, float(M.abs().max()))


special = st.sampled_from([float("nan"), float("inf"), float("-inf")])


@settings(max_examples=40, deadline=None, derandomize=True)
@given(hostile(), special, st.integers(0, 40))
def test_non_finite_input_is_a_one_line_error(T, value, where):
    T.view(-1)[where % T.numel()] = value
    for call in (
        lambda: numerical_rank(T),
        lambda: left_null_space(T),
        lambda: stable_rank(T.reshape(-1)),
        lambda: principal_angles(T, T),
    ):
        with pytest.raises(TgeomError, match="contains NaN or inf"):
            call()
    A = torch.full((T.shape[0], T.shape[0]), 1.0 / T.shape[0], dtype=torch.float64)
    with pytest.raises(TgeomError, match="contains NaN or inf"):
        sequence_effective_attention(A, T, RTOL)
    with pytest.raises(TgeomError, match="contains NaN or inf"):
        prefix_effective_attention(A.tril(), T, lambda m: RTOL)


def test_check_finite_is_exact_when_the_sum_overflows():
    from tgeom.errors import check_finite

    huge = torch.full((4,), torch.finfo(torch.float64).max, dtype=torch.float64)
    assert check_finite("huge", huge) is huge  # the sum is inf, every entry is finite
    huge[2] = float("nan")
    with pytest.raises(TgeomError, match=r"huge contains NaN or inf \(first at index \[2\]\)"):
        check_finite("huge", huge)
