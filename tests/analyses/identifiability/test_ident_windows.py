"""Effective attention and null spaces of sliding-window layers (SPEC section 1, "Sliding
windows"): a query's null space and effective row are those of its window's rows of ``T``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tgeom.analyses.identifiability import null_space_dims
from tgeom.analyses.identifiability.effective import effective_attention_batch
from tgeom.analyses.identifiability.windows import window_effective_attention, window_null_dims
from tgeom.capture import capture
from tgeom.linalg.nullspace import default_rtol, left_null_space
from tgeom.models import LoadedModel, load_model
from tgeom.models.weights import attention_window
from tiny_models import save_tiny_model, windowed_mistral


def distinct_tokens(rows: int, n: int) -> torch.Tensor:
    """``[rows, n]`` ids with no token repeated in a row (a RoPE model's layer-0 values repeat
    with their tokens, which would make even short windows rank deficient)."""
    return torch.stack(
        [
            torch.randperm(92, generator=torch.Generator().manual_seed(s))[:n] + 4
            for s in range(rows)
        ]
    )


def per_query_svd_reference(lm: LoadedModel, ids: torch.Tensor, layer: int, head: int):
    """The definition, slowly: per query i, the left null space N_i of the window's rows
    T[lo_i:i+1] (T = V W_O[h], float64 SVD) and ``a_i - a_i N_i N_i^T`` there, zero elsewhere.
    Returns the effective matrix, the raw one, T, and the largest null dimension over queries."""
    cap = capture(lm, ids, attentions=True, values=True)
    T = cap.values[layer, 0, head].double() @ lm.weights().layers[layer].W_O[head].double()
    A = cap.attentions[layer, 0, head].double()
    n, d = T.shape
    window = attention_window(lm.summary, layer) or n
    expected = torch.zeros_like(A)
    nulls = []
    for i in range(n):
        lo = max(0, i - window + 1)
        N = left_null_space(T[lo : i + 1], rtol=default_rtol(i + 1 - lo, d, torch.float32))
        a = A[i, lo : i + 1]
        expected[i, lo : i + 1] = a - a @ N @ N.T
        nulls.append(N.shape[1])
    return expected, A, T, max(nulls)


@pytest.mark.parametrize(("family", "window"), [("mistral", 4), ("phi3", 5)])
def test_windows_no_longer_than_d_head_leave_attention_unchanged(tiny_model, family, window):
    """Tiny Mistral (window 4, d_head 16) and Phi-3 (window 5, d_head 8): no window has a null
    space, so effective attention is the raw attention for every query (the whole sequence's 20
    rows once leaked weight onto keys the query cannot see: max |eff - raw| was 0.13 on the
    Mistral)."""
    lm = tiny_model(family)
    assert set(lm.summary.attention_windows) == {window} and lm.summary.d_head > window
    ids = distinct_tokens(2, 20)
    for seq in effective_attention_batch(lm, ids):
        assert float((seq.effective - seq.raw.double()).abs().max()) <= 1e-12
        assert (seq.null_dim == 0).all() and (seq.rank == window).all()
    assert (null_space_dims(lm, ids).null_dim == 0).all()


@pytest.fixture(scope="module")
def windowed(tmp_path_factory: pytest.TempPathFactory):
    """``windowed(w)``: a tiny Mistral windowing both layers over w keys, d_head 2."""
    cache: dict[int, LoadedModel] = {}

    def get(window: int) -> LoadedModel:
        if window not in cache:
            folder: Path = tmp_path_factory.mktemp(f"mistral-w{window}")
            spec = windowed_mistral(window, head_dim=2)
            saved = save_tiny_model("mistral", folder, spec=spec)
            cache[window] = load_model(str(saved), device="cpu")
        return cache[window]

    return get


@pytest.mark.parametrize("window", [3, 4, 5, 6, 7, 8])
def test_windowed_effective_attention_equals_the_per_query_svd_definition(windowed, window):
    """Windows of 3-8 keys over d_head 2: every window of 3 or more keys has a null space. Each
    head equals the per-query SVD definition, puts no weight outside a query's window, keeps
    each query's head output (A_eff T = A T row by row), and reports the largest null
    dimension over its queries (generic: window - d_head), in the rank-only run too."""
    lm = windowed(window)
    n = 14
    ids = distinct_tokens(1, n)
    (seq,) = effective_attention_batch(lm, ids)
    keys = torch.arange(n)
    outside = (keys[None, :] > keys[:, None]) | (keys[:, None] - keys[None, :] >= window)
    for layer in range(lm.summary.n_layers):
        for head in range(lm.summary.n_heads):
            expected, A, T, null_dim = per_query_svd_reference(lm, ids, layer, head)
            effective = seq.effective[layer, head]
            assert float((effective - expected).abs().max()) <= 1e-9
            assert float(effective[outside].abs().max()) == 0.0
            assert (effective @ T - A @ T).norm(dim=-1).max() <= 1e-9 * (A @ T).norm()
            assert not torch.allclose(effective, A, atol=1e-6)  # something was removed
            assert int(seq.null_dim[layer, head]) == null_dim == window - 2
    assert torch.equal(null_space_dims(lm, ids).null_dim[0], seq.null_dim)


def test_a_query_row_depends_only_on_its_window(windowed):
    """Layer 0 of a RoPE model: values depend on the token alone and scores on relative
    positions, so the last query of 16 tokens (window: keys 11..15) sees what the last query of
    those 5 tokens alone sees. Its effective row must then be the same: the text before the
    window has no say in its null space."""
    lm = windowed(5)
    ids = distinct_tokens(1, 16)
    (full,) = effective_attention_batch(lm, ids)
    (tail,) = effective_attention_batch(lm, ids[:, 11:])
    assert torch.allclose(full.raw[0, :, -1, 11:], tail.raw[0, :, -1, :], atol=1e-6)
    assert torch.allclose(full.effective[0, :, -1, 11:], tail.effective[0, :, -1, :], atol=1e-6)
    assert not torch.allclose(full.effective[0, :, -1, 11:], full.raw[0, :, -1, 11:].double())


def test_window_path_on_prefix_length_windows_equals_the_causal_path():
    """With a window as long as the sequence every window is the prefix: the windowed routine
    equals the causal per-prefix one (random heads, grouped queries, a rank-deficient prefix)."""
    from tgeom.analyses.identifiability.causal import prefix_effective_attention

    g = torch.Generator().manual_seed(0)
    n, dh, H, K = 9, 3, 4, 2
    V = torch.randn(2, K, n, dh, generator=g, dtype=torch.float64)
    V[0, 1, 4] = V[0, 1, 2]  # a repeated row
    right = torch.randn(H, dh, dh, generator=g, dtype=torch.float64)
    scores = torch.randn(2, H, n, n, generator=g, dtype=torch.float64)
    A = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -torch.inf).softmax(-1)
    rtol_for = lambda m: default_rtol(m, 16, torch.float32)  # noqa: E731
    smin = torch.linalg.svdvals(right)[..., -1]
    expected, prefix_rank = prefix_effective_attention(A, V, rtol_for, right=right, right_smin=smin)
    effective, rank = window_effective_attention(A, V, rtol_for, n, right=right)
    assert torch.allclose(effective, expected, atol=1e-10)
    assert torch.equal(rank, prefix_rank)
    null, last_rank = window_null_dims(rank, n)
    assert torch.equal(null, n - prefix_rank[..., -1])  # the largest is the whole prefix's
    assert torch.equal(last_rank, prefix_rank[..., -1])


def test_window_null_dims_take_the_largest_over_queries_and_its_rank():
    rank = torch.tensor([[1, 2, 2, 2, 3, 3]])  # windows of 4: m = 1, 2, 3, 4, 4, 4
    null, at = window_null_dims(rank, 4)
    assert null.tolist() == [2] and at.tolist() == [2]  # query 3: 4 keys, rank 2


def test_global_layers_beside_windowed_ones_keep_their_results(tiny_model):
    """Tiny Qwen2: layer 0 global (d_head 8 < 20 keys: prefix null spaces), layer 1 windowed
    over 3 keys (none); both equal the per-query definition."""
    lm = tiny_model("qwen2")
    assert lm.summary.attention_windows == (0, 3)
    ids = distinct_tokens(1, 20)
    (seq,) = effective_attention_batch(lm, ids)
    for layer in range(2):
        for head in range(lm.summary.n_heads):
            expected, _, _, null_dim = per_query_svd_reference(lm, ids, layer, head)
            assert float((seq.effective[layer, head] - expected).abs().max()) <= 1e-9
            assert int(seq.null_dim[layer, head]) == null_dim == (12 if layer == 0 else 0)
    assert torch.equal(seq.effective[1], seq.raw[1].double())


def test_null_space_tables_and_pearson_of_windowed_layers(windowed):
    """results.json of a windowed model: the windows, the generic null dimension per layer
    (max(0, min(d_s, w) - d_head)), every random head generic; Pearson(raw, effective) over the
    windows' entries only (the zeros outside a window are not data); the batch-by-batch survey
    gives the same tables."""
    from tgeom.analyses.identifiability import effective_attention
    from tgeom.analyses.identifiability.effective import pearson
    from tgeom.analyses.identifiability.survey import attention_survey
    from tgeom.capture.distributed import Shard
    from tgeom.models.weights import window_keys
    from tgeom.runtime import Runtime

    lm = windowed(5)
    ids = distinct_tokens(3, 14)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # 4 tokens: shorter than the window, no null space (4 - 2 = 2 generic)
    data = null_space_dims(lm, ids, mask).to_json()
    assert data["attention_windows"] == [5, 5]
    assert [row["expected_generic"] for row in data["by_length"]] == [[2, 2], [3, 3]]
    assert all(head["share_generic"] == 1.0 for head in data["heads"])
    whole = effective_attention(lm, ids, mask, Runtime(torch.device("cpu"), batch_size=3))
    seq = whole.sequences[0]
    inside = window_keys(14, 5)
    for layer, head in ((0, 0), (1, 3)):
        expected = pearson(seq.raw[layer, head][inside], seq.effective[layer, head][inside])
        assert abs(float(whole.pearson[0, layer, head]) - expected) <= 1e-12
    assert whole.to_json()["attention_windows"] == [5, 5]
    nulls, summary = attention_survey(
        lm, ids, mask, Runtime(torch.device("cpu"), batch_size=2), Shard()
    )
    assert torch.equal(nulls.null_dim, torch.stack([s.null_dim for s in whole.sequences]))
    assert nulls.to_json()["by_length"] == data["by_length"]
    torch.testing.assert_close(summary.pearson.values, whole.pearson.values, rtol=0, atol=1e-12)


def test_a_warning_names_the_windowed_layers_without_null_spaces(tiny_model, windowed):
    """Sequences longer than d_head, but windows no longer than it: those layers' effective
    attention is raw attention by construction, and the results say so (one line naming them);
    windows longer than d_head get no warning."""
    from tgeom.analyses.identifiability import effective_attention

    ids = distinct_tokens(1, 20)
    (line,) = effective_attention(tiny_model("mistral"), ids).warnings
    assert line.startswith("layers 0, 1 see windows of at most 4 keys, not more than d_head = 16")
    (line,) = null_space_dims(tiny_model("qwen2"), ids).warnings
    assert line.startswith("layers 1 see windows of at most 3 keys")
    assert effective_attention(windowed(5), ids).warnings == []
