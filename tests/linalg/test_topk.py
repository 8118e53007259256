"""factored_topk against the obvious reference: the dense float64 product, fully sorted."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tgeom.errors import TgeomError
from tgeom.linalg.topk import _balanced_basis, _Screen, factored_topk


def dense_reference(A, B, k, largest=True, row_mask=None, col_mask=None):
    """Materialise A @ B.T in float64 and sort every allowed entry by (value, row, col)."""
    S = A.double() @ B.double().T
    R, C = S.shape
    entries = []
    for i in range(R):
        if row_mask is not None and not row_mask[i]:
            continue
        for j in range(C):
            if col_mask is not None and not col_mask[j]:
                continue
            v = float(S[i, j])
            entries.append((-v if largest else v, i, j))
    entries.sort()
    return [(i, j, (-v if largest else v)) for v, i, j in entries[:k]]


def as_list(pairs):
    return list(
        zip(pairs.rows.tolist(), pairs.cols.tolist(), pairs.values.double().tolist(), strict=True)
    )


def assert_matches(got, want, atol=1e-4):
    assert len(got) == len(want)
    for (_, _, gv), (_, _, wv) in zip(got, want, strict=True):
        assert abs(gv - wv) <= atol * max(1.0, abs(wv))
    # Index sets agree except among near-ties: compare the pairs whose value is clearly separated.
    got_values = sorted(v for _, _, v in got)
    assert got_values == pytest.approx(sorted(v for _, _, v in want), rel=atol, abs=atol)
    boundary = want[-1][2]
    clear = {(i, j) for i, j, v in want if abs(v - boundary) > 10 * atol}
    assert clear <= {(i, j) for i, j, _ in got}


SHAPES = [(7, 5, 3), (5, 9, 4), (12, 12, 1), (1, 8, 2), (8, 1, 6), (30, 17, 8)]


@pytest.mark.parametrize(("R", "C", "r"), SHAPES)
@pytest.mark.parametrize("k", [1, 3, 10, 1000])
@pytest.mark.parametrize("largest", [True, False])
def test_factored_topk_equals_dense_sort(R, C, r, k, largest):
    g = torch.Generator().manual_seed(R * 100 + C * 10 + r)
    A, B = torch.randn(R, r, generator=g), torch.randn(C, r, generator=g)
    want = dense_reference(A, B, k, largest)
    got = factored_topk(A, B, k, largest=largest)
    assert len(got) == min(k, R * C)
    assert_matches(as_list(got), want)


@pytest.mark.parametrize(("R", "C", "r"), SHAPES)
@pytest.mark.parametrize("k", [1, 4, 50, 1000])
def test_factored_topk_with_masks_excludes_before_selection(R, C, r, k):
    g = torch.Generator().manual_seed(7 + R + C)
    A, B = torch.randn(R, r, generator=g), torch.randn(C, r, generator=g)
    row_mask = torch.rand(R, generator=g) < 0.6
    col_mask = torch.rand(C, generator=g) < 0.6
    row_mask[0] = col_mask[0] = True
    want = dense_reference(A, B, k, True, row_mask, col_mask)
    got = factored_topk(A, B, k, row_mask=row_mask, col_mask=col_mask, chunk_size=2)
    assert len(got) == min(k, int(row_mask.sum()) * int(col_mask.sum()))
    assert all(row_mask[i] and col_mask[j] for i, j, _ in as_list(got))
    assert_matches(as_list(got), want)


@pytest.mark.parametrize("chunk", [(1, 1), (3, 2), (1, 100), (3, None), (None, None)])
@pytest.mark.parametrize("largest", [True, False])
def test_integer_ties_follow_row_then_column_order(chunk, largest):
    g = torch.Generator().manual_seed(3)
    A = torch.randint(-2, 3, (23, 2), generator=g).float()
    B = torch.randint(-2, 3, (19, 2), generator=g).float()
    for k in (1, 5, 40, 200, 23 * 19):
        want = dense_reference(A, B, k, largest)
        got = factored_topk(A, B, k, largest=largest, chunk_size=chunk[0], col_chunk_size=chunk[1])
        # Integer-valued products are exact in float32: the order must match exactly.
        assert as_list(got) == want


def test_all_zero_matrix_returns_first_entries_in_row_major_order():
    A, B = torch.zeros(50, 3), torch.zeros(40, 3)
    got = factored_topk(A, B, 7, chunk_size=4, col_chunk_size=8)
    assert as_list(got) == [(0, j, 0.0) for j in range(7)]


@pytest.mark.parametrize("largest", [True, False])
def test_all_negative_matrix(largest):
    g = torch.Generator().manual_seed(5)
    A = torch.rand(16, 4, generator=g) + 0.1
    B = -(torch.rand(11, 4, generator=g) + 0.1)
    want = dense_reference(A, B, 9, largest)
    assert all(v < 0 for _, _, v in want)
    assert_matches(as_list(factored_topk(A, B, 9, largest=largest, chunk_size=3)), want)


def test_tiny_chunks_equal_default_chunks():
    g = torch.Generator().manual_seed(11)
    A, B = torch.randn(41, 6, generator=g), torch.randn(37, 6, generator=g)
    default = factored_topk(A, B, 25)
    for rows, cols in [(1, 1), (3, 3), (1, None), (7, 5)]:
        tiny = factored_topk(A, B, 25, chunk_size=rows, col_chunk_size=cols)
        assert torch.equal(tiny.rows, default.rows) and torch.equal(tiny.cols, default.cols)
        torch.testing.assert_close(tiny.values, default.values, rtol=1e-6, atol=1e-6)


def test_pruning_does_not_change_the_result_on_skewed_norms():
    g = torch.Generator().manual_seed(13)
    A = torch.randn(200, 8, generator=g) * torch.logspace(-2, 1, 200)[:, None]
    B = torch.randn(150, 8, generator=g) * torch.logspace(1, -2, 150)[:, None]
    pruned = factored_topk(A, B, 30, chunk_size=5, col_chunk_size=7)
    full = factored_topk(A, B, 30, chunk_size=5, col_chunk_size=7, prune=False)
    assert as_list(pruned) == as_list(full)
    assert_matches(as_list(pruned), dense_reference(A, B, 30))


def test_float64_factors_compute_in_float64():
    g = torch.Generator().manual_seed(17)
    A, B = torch.randn(9, 3, generator=g).double(), torch.randn(8, 3, generator=g).double()
    got = factored_topk(A, B, 5)
    assert got.values.dtype == torch.float64
    assert_matches(as_list(got), dense_reference(A, B, 5), atol=1e-12)


def test_empty_masks_return_nothing():
    A, B = torch.randn(4, 2), torch.randn(3, 2)
    got = factored_topk(A, B, 5, row_mask=torch.zeros(4, dtype=torch.bool))
    assert len(got) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be a positive"),
        ({"k": -3}, "k must be a positive"),
        ({"k": 2, "chunk_size": 0}, "chunk_size"),
        ({"k": 2, "row_mask": torch.ones(3, dtype=torch.bool)}, "row_mask"),
        ({"k": 2, "col_mask": torch.ones(3)}, "col_mask"),
    ],
)
def test_bad_arguments_raise_one_line_errors(kwargs, match):
    with pytest.raises(TgeomError, match=match):
        factored_topk(torch.randn(4, 2), torch.randn(3, 2), **kwargs)


def test_mismatched_widths_raise():
    with pytest.raises(TgeomError, match="widths differ"):
        factored_topk(torch.randn(4, 2), torch.randn(3, 5), 1)


def test_overflowing_product_raises():
    with pytest.raises(TgeomError, match="overflow"):
        factored_topk(torch.full((2, 2), 1e20), torch.full((2, 2), 1e20), 1)


finite = st.floats(-4, 4, allow_nan=False, width=32)
special = st.sampled_from([0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf")])


@st.composite
def factors(draw):
    R, C, r = draw(st.integers(1, 7)), draw(st.integers(1, 7)), draw(st.integers(1, 3))
    A = torch.tensor(draw(st.lists(finite, min_size=R * r, max_size=R * r))).reshape(R, r)
    B = torch.tensor(draw(st.lists(finite, min_size=C * r, max_size=C * r))).reshape(C, r)
    if draw(st.booleans()):  # duplicate rows
        A[-1] = A[0]
    if draw(st.booleans()):  # zero rows
        B[0] = 0.0
    return A, B


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(factors(), st.integers(1, 60), st.booleans(), st.integers(1, 4))
def test_property_matches_dense_reference(ab, k, largest, chunk):
    A, B = ab
    got = factored_topk(A, B, k, largest=largest, chunk_size=chunk, col_chunk_size=chunk)
    assert_matches(as_list(got), dense_reference(A, B, k, largest))
    # Best first, and ties in (row, col) order.
    listed = as_list(got)
    for (i1, j1, v1), (i2, j2, v2) in itertools.pairwise(listed):
        assert (v1 >= v2) if largest else (v1 <= v2)
        if v1 == v2:
            assert (i1, j1) < (i2, j2)


@settings(max_examples=60, deadline=None)
@given(factors(), special, st.booleans(), st.integers(0, 6))
def test_property_non_finite_factors_raise_naming_the_factor(ab, value, in_a, where):
    A, B = ab
    target = A if in_a else B
    target.view(-1)[where % target.numel()] = value
    if torch.isfinite(torch.tensor(value)):
        factored_topk(A, B, 3)  # finite specials are fine
        return
    with pytest.raises(TgeomError, match=f"factor {'A' if in_a else 'B'} contains NaN or inf"):
        factored_topk(A, B, 3)


@pytest.mark.parametrize("r", [32, 64])
@pytest.mark.parametrize("largest", [True, False])
def test_screening_in_the_eigenbasis_keeps_the_exact_result(r, largest):
    """r > 25 takes the rotated screening path; anisotropic factors make the bound bite."""
    g = torch.Generator().manual_seed(r)
    spectrum = torch.logspace(1, -2, r)
    A = torch.randn(400, r, generator=g) * spectrum * torch.rand(400, 1, generator=g)
    B = torch.randn(300, r, generator=g) * spectrum * torch.rand(300, 1, generator=g)
    S = (A.double() @ B.double().T).reshape(-1)
    by_value = torch.sort(S if not largest else -S, stable=True).indices[:50]
    want = [(int(i) // 300, int(i) % 300, float(S[i])) for i in by_value]
    for chunks in [(16, 32), (None, None)]:
        got = factored_topk(
            A, B, 50, largest=largest, chunk_size=chunks[0], col_chunk_size=chunks[1]
        )
        assert [(i, j) for i, j, _ in as_list(got)] == [(i, j) for i, j, _ in want]
        assert_matches(as_list(got), want, atol=1e-5)


@pytest.mark.parametrize("screen_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("r", [6, 40])
@pytest.mark.parametrize("largest", [True, False])
def test_low_precision_screen_keeps_the_exact_result(screen_dtype, r, largest):
    """Screens in bfloat16 / float16 (r = 6: the plain screen; r = 40: rotated, p = 16) over
    many small tiles: the same pairs, in the same order, as the unscreened float64 path and the
    dense float64 sort; factors given in bfloat16 screen in it by default."""
    g = torch.Generator().manual_seed(r + 1)
    spectrum = torch.logspace(1, -2, r, dtype=torch.float64)
    A = torch.randn(300, r, generator=g, dtype=torch.float64) * spectrum
    B = torch.randn(250, r, generator=g, dtype=torch.float64) * spectrum
    B[:20] = 3 * A[:20]  # parallel rows: entries equal to their Cauchy-Schwarz bound
    A = A * torch.rand(300, 1, generator=g, dtype=torch.float64)
    full = factored_topk(A, B, 60, largest=largest, prune=False)
    got = factored_topk(
        A, B, 60, largest=largest, chunk_size=7, col_chunk_size=11, screen_dtype=screen_dtype
    )
    # float64 values of a tile product and of a gathered entry may differ in the last bit
    assert [(i, j) for i, j, _ in as_list(got)] == [(i, j) for i, j, _ in as_list(full)]
    want = dense_reference(A, B, 60, largest)
    assert [(i, j) for i, j, _ in as_list(got)] == [(i, j) for i, j, _ in want]
    assert_matches(as_list(got), want, atol=1e-12)
    low_A, low_B = A.to(screen_dtype), B.to(screen_dtype)
    own = factored_topk(low_A, low_B, 60, largest=largest, chunk_size=7, col_chunk_size=11)
    assert own.values.dtype == torch.float32
    want = dense_reference(low_A, low_B, 60, largest)
    assert [(i, j) for i, j, _ in as_list(own)] == [(i, j) for i, j, _ in want]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("r", [8, 64])
def test_screen_in_a_low_precision_bounds_every_entry(dtype, r):
    """The stated bound: the screening product computed in ``dtype`` is at least every exact
    entry (scaled, minus the underflow allowance), over the whole matrix, parallel rows (where
    Cauchy-Schwarz is tight) included; without the rounding margin bfloat16 breaks it."""
    g = torch.Generator().manual_seed(r)
    spectrum = torch.logspace(0, -1, r, dtype=torch.float64)
    A = torch.randn(400, r, generator=g, dtype=torch.float64) * spectrum
    B = torch.randn(300, r, generator=g, dtype=torch.float64) * spectrum
    B[:100] = A[:100] * torch.rand(100, 1, generator=g, dtype=torch.float64)
    screen = _Screen(A, B, A.norm(dim=1), B.norm(dim=1), dtype)
    assert screen.SA.dtype == dtype
    bound = (screen.SA @ screen.SB.T).double() * screen.scale
    exact = A @ B.T  # float64 factors: the values the top-k compares
    assert bool((bound + screen.underflow * screen.scale >= exact).all())
    if dtype == torch.bfloat16:  # the same factors rounded without the margin fall short
        scale = float(A.norm(dim=1).max() * B.norm(dim=1).max())
        bare = (A / A.norm(dim=1).max()).to(dtype) @ (B / B.norm(dim=1).max()).to(dtype).T
        assert bool((bare.double() * scale < exact).any())


def equal_norm_factors(R, C, r, seed):
    """Rows of one norm (QK-norm-like) with decaying spectra that differ between the sides."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(R, r, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, r)
    B = torch.randn(C, r, generator=g, dtype=torch.float64) * torch.logspace(-0.5, -1, r).flip(0)
    B = B @ torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64)).Q
    return A / A.norm(dim=1, keepdim=True), 3 * B / B.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("r", [64, 96])
def test_balanced_basis_keeps_the_product_and_orders_its_spectrum(r):
    A, B = equal_norm_factors(500, 400, r, seed=r)
    basis = _balanced_basis(A, B)
    eye = torch.eye(r, dtype=torch.float64)
    assert float((basis.M @ basis.N.T - eye).abs().max()) < 1e-9
    assert torch.allclose((A @ basis.M) @ (B @ basis.N).T, A @ B.T, atol=1e-10)
    assert bool((basis.spectrum[:-1] >= basis.spectrum[1:]).all())
    assert 0 < basis.error < 1e-6 and basis.stretch >= 1.0
    # ||a|| ||b|| <= stretch ||a M|| ||b N|| (what the margin relies on)
    lhs = A.norm(dim=1)[:, None] * B.norm(dim=1)[None]
    rhs = (A @ basis.M).norm(dim=1)[:, None] * (B @ basis.N).norm(dim=1)[None]
    assert bool((lhs <= basis.stretch * rhs).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("r", [64, 96])
def test_screen_in_the_balanced_basis_bounds_every_entry(dtype, r):
    """Equal-norm factors, decaying spectra: the screen keeps fewer than r/2 directions and its
    product is at least every exact entry, over the whole matrix, parallel rows included."""
    A, B = equal_norm_factors(400, 300, r, seed=r + 1)
    B[:50] = 3 * A[:50]  # parallel rows: Cauchy-Schwarz is tight
    A, B = A.to(dtype), B.to(dtype)
    screen = _Screen(A, B, A.double().norm(dim=1), B.double().norm(dim=1), dtype)
    assert screen.width < r // 2
    bound = (screen.SA @ screen.SB.T).double() * screen.scale
    exact = (A.double() @ B.double().T).to(dtype).double()  # the values the top-k compares
    assert bool((bound + screen.underflow * screen.scale >= exact).all())


@pytest.mark.parametrize("r", [64, 96])
@pytest.mark.parametrize("largest", [True, False])
def test_equal_norm_factors_match_the_dense_sort(r, largest):
    """Equal-norm factors with a decaying spectrum (the balanced-basis screen, small tiles) and
    exact ties (duplicated columns): the same pairs, in the same order, as the unscreened path
    and the dense float64 sort."""
    A, B = equal_norm_factors(300, 200, r, seed=r + 2)
    B[100:110] = B[:10]  # every entry of these columns ties with one of an earlier column
    full = factored_topk(A, B, 40, largest=largest, prune=False)
    want = dense_reference(A, B, 40, largest)
    for chunks in [(7, 13), (None, None)]:
        got = factored_topk(
            A, B, 40, largest=largest, chunk_size=chunks[0], col_chunk_size=chunks[1]
        )
        assert [(i, j) for i, j, _ in as_list(got)] == [(i, j) for i, j, _ in as_list(full)]
        assert [(i, j) for i, j, _ in as_list(got)] == [(i, j) for i, j, _ in want]
        assert_matches(as_list(got), want, atol=1e-12)
        float32 = factored_topk(A.float(), B.float(), 40, largest=largest, chunk_size=chunks[0])
        assert_matches(as_list(float32), dense_reference(A.float(), B.float(), 40, largest))


def test_rank_deficient_and_random_factors_match_the_dense_sort():
    """A factor with zero columns (singular Gram: the ridge) and isotropic random factors."""
    g = torch.Generator().manual_seed(5)
    A = torch.randn(200, 64, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 64)
    A[:, 40:] = 0
    B = torch.randn(150, 64, generator=g, dtype=torch.float64)
    for F, G in [(A, B), (B, torch.randn(120, 64, generator=g, dtype=torch.float64))]:
        got = factored_topk(F, G, 30, chunk_size=5, col_chunk_size=9)
        want = dense_reference(F, G, 30)
        assert [(i, j) for i, j, _ in as_list(got)] == [(i, j) for i, j, _ in want]
