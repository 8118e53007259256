"""Alignment of two models in vocabulary space [DAR] 5.1: closed form, invariance, matching."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from tgeom.analyses.embedding.alignment import (
    PARAMETER_GROUPS,
    align_models,
    check_shared_vocabulary,
    group_vectors,
    raw_pearson,
    vocabulary_moments,
    vocabulary_pearson,
)
from tgeom.errors import TgeomError
from tgeom.models import load_model
from tgeom.models.weights import CanonicalWeights, LayerWeights
from tiny_models import save_tiny_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny tensors: one thread avoids OpenMP overhead on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def brute_force_pearson(x: np.ndarray, y: np.ndarray, E_A: np.ndarray, E_B: np.ndarray) -> float:
    return float(pearsonr(E_A @ x, E_B @ y).statistic)


@pytest.mark.parametrize(("V", "d_A", "d_B"), [(50, 7, 5), (200, 16, 16), (30, 3, 9)])
def test_closed_form_pearson_equals_brute_force_over_vocabulary(V: int, d_A: int, d_B: int) -> None:
    gen = torch.Generator().manual_seed(V + d_A)
    E_A = torch.randn(V, d_A, generator=gen, dtype=torch.float64) + 0.3
    E_B = torch.randn(V, d_B, generator=gen, dtype=torch.float64) - 0.2
    X = torch.randn(6, d_A, generator=gen, dtype=torch.float64)
    Y = torch.randn(4, d_B, generator=gen, dtype=torch.float64)
    rho = vocabulary_pearson(X, Y, vocabulary_moments(E_A, E_B, chunk_size=17))
    expected = np.array(
        [
            [brute_force_pearson(x, y, E_A.numpy(), E_B.numpy()) for y in Y.numpy()]
            for x in X.numpy()
        ]
    )
    np.testing.assert_allclose(rho.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_closed_form_pearson_of_zero_vector_is_nan() -> None:
    E = torch.randn(20, 4, dtype=torch.float64)
    rho = vocabulary_pearson(torch.zeros(1, 4), torch.randn(2, 4), vocabulary_moments(E, E))
    assert torch.isnan(rho).all()


def test_raw_pearson_equals_numpy_corrcoef() -> None:
    X, Y = torch.randn(3, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    expected = np.corrcoef(X.numpy(), Y.numpy())[:3, 3:]
    np.testing.assert_allclose(raw_pearson(X, Y).numpy(), expected, rtol=1e-10)


def random_layer(like: LayerWeights, gen: torch.Generator) -> LayerWeights:
    def rand(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else 0.02 * torch.randn(t.shape, generator=gen)

    changes = {
        f.name: rand(getattr(like, f.name))
        for f in dataclasses.fields(like)
        if f.name not in ("ln_attn", "ln_mlp")
    }
    return dataclasses.replace(like, **changes)


def rotated_permuted_copy(
    cw: CanonicalWeights, Q: torch.Tensor, layer_perm: list[int], head_perms: list[list[int]]
) -> CanonicalWeights:
    """Model B: layer j of B is layer ``layer_perm[j]`` of A with heads ``head_perms[j]``, and
    the residual basis rotated by Q (embeddings and every weight together)."""
    layers = []
    for j, a in enumerate(layer_perm):
        lw, hp = cw.layers[a], head_perms[j]
        layers.append(
            dataclasses.replace(
                lw,
                W_Q=Q.T @ lw.W_Q[hp],
                W_K=Q.T @ lw.W_K[hp],
                W_V=Q.T @ lw.W_V[hp],
                W_O=lw.W_O[hp] @ Q,
                W_in=Q.T @ lw.W_in,
                W_out=lw.W_out @ Q,
            )
        )
    return dataclasses.replace(cw, W_E=cw.W_E @ Q, W_U=cw.W_U @ Q, layers=layers)


@pytest.fixture
def four_layer_model(tiny_model) -> CanonicalWeights:  # type: ignore[no-untyped-def]
    cw = tiny_model("gpt2").weights()
    gen = torch.Generator().manual_seed(3)
    extra = [random_layer(lw, gen) for lw in cw.layers]
    return dataclasses.replace(cw, layers=[*cw.layers, *extra])


def test_alignment_recovers_permutation_of_rotated_copy(four_layer_model) -> None:  # type: ignore[no-untyped-def]
    A = four_layer_model
    d, H = A.W_E.shape[1], A.layers[0].W_Q.shape[0]
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(1)))
    layer_perm = [2, 0, 3, 1]
    head_perms = [
        torch.randperm(H, generator=torch.Generator().manual_seed(j)).tolist() for j in range(4)
    ]
    B = rotated_permuted_copy(A, Q, layer_perm, head_perms)

    self_result = align_models(A, A, per_block=None)
    result = align_models(A, B, per_block=None)

    expected_layers = sorted((a, j) for j, a in enumerate(layer_perm))
    for group in (*PARAMETER_GROUPS, "mean"):
        # Embedding-space similarity is invariant under the rotation: B's columns are A's permuted.
        torch.testing.assert_close(
            result.similarity[group],
            self_result.similarity[group][:, layer_perm],
            atol=1e-6,
            rtol=0,
        )
        assert sorted(result.block_matching[group]) == expected_layers
    for match in result.head_matching:
        hp = head_perms[match.block_b]
        assert sorted(match.pairs) == sorted((hp[h], h) for h in range(H))
    # Raw coordinates are not invariant: the diagonal advantage of matched layers disappears.
    assert self_result.raw_similarity is not None and result.raw_similarity is not None
    for group in PARAMETER_GROUPS:
        raw_self = self_result.raw_similarity[group][:, layer_perm]
        assert (result.raw_similarity[group] - raw_self).abs().max() > 5e-3
        matched_self = torch.tensor([raw_self[a, j] for j, a in enumerate(layer_perm)])
        matched_rot = torch.tensor(
            [result.raw_similarity[group][a, j] for j, a in enumerate(layer_perm)]
        )
        assert matched_rot.mean() < matched_self.mean()


def test_alignment_subsampling_is_seeded(four_layer_model) -> None:  # type: ignore[no-untyped-def]
    first = align_models(four_layer_model, four_layer_model, per_block=8, seed=5, match_heads=False)
    again = align_models(four_layer_model, four_layer_model, per_block=8, seed=5, match_heads=False)
    other = align_models(four_layer_model, four_layer_model, per_block=8, seed=6, match_heads=False)
    torch.testing.assert_close(first.similarity["mean"], again.similarity["mean"])
    assert not torch.allclose(first.similarity["mean"], other.similarity["mean"])


def test_group_vectors_pair_subhead_halves(tiny_model) -> None:  # type: ignore[no-untyped-def]
    lw = tiny_model("llama").weights().layers[1]
    dh = lw.W_Q.shape[2]
    torch.testing.assert_close(group_vectors(lw, "W_V")[2 * dh + 3], lw.W_V[2][:, 3])
    torch.testing.assert_close(group_vectors(lw, "W_O")[2 * dh + 3], lw.W_O[2][3])
    torch.testing.assert_close(group_vectors(lw, "ffn_key")[7], lw.W_in[:, 7])
    with pytest.raises(TgeomError, match="unknown parameter group"):
        group_vectors(lw, "W_X")


def fake_model(source: str, vocab: dict[str, int]) -> SimpleNamespace:
    tokenizer = SimpleNamespace(get_vocab=lambda: vocab)
    return SimpleNamespace(
        source=source, summary=SimpleNamespace(vocab_size=len(vocab)), tokenizer=tokenizer
    )


def test_vocabulary_mismatch_in_size_is_a_one_line_error() -> None:
    a = fake_model("a", {"x": 0, "y": 1})
    b = fake_model("b", {"x": 0, "y": 1, "z": 2})
    with pytest.raises(TgeomError, match="2 tokens and b has 3") as info:
        check_shared_vocabulary(a, b, "alignment")  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_vocabulary_mismatch_in_tokens_names_the_token(tiny_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    hostile = load_model(str(save_tiny_model("gpt2", tmp_path / "h", hostile=True)), device="cpu")
    with pytest.raises(TgeomError, match="token 94 is"):
        check_shared_vocabulary(tiny_model("gpt2"), hostile, "alignment")
    check_shared_vocabulary(tiny_model("gpt2"), tiny_model("llama"), "alignment")
