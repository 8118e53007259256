"""Validation experiments R_k and Sim_k [DAR] 4, against slow obvious references."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tgeom.analyses.embedding.validation import (
    SIM_PAIRS,
    jaccard,
    mlp_input,
    r_k,
    sim_k,
    topk_tokens,
)
from tgeom.capture import capture
from tgeom.errors import TgeomError
from tgeom.models.reference import attention_bias
from tgeom.runtime import Runtime

CPU = Runtime(torch.device("cpu"), batch_size=3)
# Where each family's MLP starts (its input) and where its neuron activations enter W_out.
MLP_MODULES = {
    "gpt2": ("mlp", "mlp.c_proj"),
    "llama": ("mlp", "mlp.down_proj"),
    "bert": ("intermediate", "output.dense"),
    "neox": ("mlp", "mlp.dense_4h_to_h"),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny tensors: one thread avoids OpenMP overhead on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def numpy_topk(scores: np.ndarray, k: int) -> list[set[int]]:
    return [set(np.argsort(-row, kind="stable")[:k].tolist()) for row in scores]


@pytest.mark.parametrize("largest", [True, False])
def test_topk_tokens_equals_sorting_every_score(largest: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    E, X = torch.randn(50, 6, generator=gen), torch.randn(7, 6, generator=gen)
    ids, scores = topk_tokens(X, E, 5, largest=largest, exclude_ids=[3, 4])
    dense = (X.double() @ E.double().T).numpy() * (1 if largest else -1)
    dense[:, [3, 4]] = -np.inf
    expected = np.argsort(-dense, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(ids.numpy(), expected)
    np.testing.assert_allclose(
        scores.numpy(), (X @ E.T).numpy()[np.arange(7)[:, None], expected], rtol=1e-5
    )


def test_topk_tokens_rejects_k_beyond_the_allowed_vocabulary() -> None:
    with pytest.raises(TgeomError, match=r"valid k are 1..8"):
        topk_tokens(torch.randn(2, 3), torch.randn(10, 3), 9, exclude_ids=[0, 1])


def test_jaccard_equals_set_arithmetic() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.stack([torch.randperm(12, generator=gen)[:5] for _ in range(20)])
    b = torch.stack([torch.randperm(12, generator=gen)[:5] for _ in range(20)])
    expected = [
        len(set(x) & set(y)) / len(set(x) | set(y))
        for x, y in zip(a.tolist(), b.tolist(), strict=True)
    ]
    np.testing.assert_allclose(jaccard(a, b).numpy(), expected)


def test_sim_k_equals_set_overlaps_of_each_pair(tiny_model) -> None:  # type: ignore[no-untyped-def]
    cw = tiny_model("llama").weights()
    result = sim_k(cw, k=6)
    E = cw.W_U.double().numpy()
    for layer, lw in enumerate(cw.layers):
        H, d, dh = lw.W_Q.shape
        halves = {
            "ffn_key_value": (lw.W_in.T, lw.W_out),
            "W_V_W_O": (lw.W_V.permute(0, 2, 1).reshape(H * dh, d), lw.W_O.reshape(H * dh, d)),
            "W_Q_W_K": (
                lw.W_Q.permute(0, 2, 1).reshape(H * dh, d),
                lw.W_K.permute(0, 2, 1).reshape(H * dh, d),
            ),
        }
        for pair, (x, y) in halves.items():
            tx, ty = (
                numpy_topk(x.double().numpy() @ E.T, 6),
                numpy_topk(y.double().numpy() @ E.T, 6),
            )
            expected = np.mean([len(s & t) / len(s | t) for s, t in zip(tx, ty, strict=True)])
            assert result.similarity[pair][layer] == pytest.approx(expected, abs=1e-12)
    assert set(result.shuffled) == set(SIM_PAIRS)


def test_sim_k_of_identical_halves_is_one_and_beats_shuffled(tiny_model) -> None:  # type: ignore[no-untyped-def]
    cw = tiny_model("gpt2").weights()
    same = dataclasses.replace(cw, layers=[dataclasses.replace(lw, W_K=lw.W_Q) for lw in cw.layers])
    result = sim_k(same, k=5, pairs=["W_Q_W_K"])
    assert result.similarity["W_Q_W_K"] == [1.0, 1.0]
    assert all(s < 0.9 for s in result.shuffled["W_Q_W_K"])


@pytest.mark.parametrize("family", list(MLP_MODULES))
def test_mlp_input_equals_the_hf_mlp_input(tiny_model, family: str) -> None:  # type: ignore[no-untyped-def]
    lm = tiny_model(family)
    cw = lm.weights()
    ids = torch.randint(4, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for layer, block in enumerate(lm.blocks()):
        module = block.get_submodule(MLP_MODULES[family][0])
        handles.append(
            module.register_forward_pre_hook(
                lambda _m, a, layer=layer: seen.__setitem__(layer, a[0])
            )
        )
    try:
        hidden = capture(lm, ids).hidden
    finally:
        for h in handles:
            h.remove()
    bias = attention_bias(cw, None, 2, 9)
    for layer in range(len(cw.layers)):
        torch.testing.assert_close(
            mlp_input(cw, layer, hidden[layer], bias), seen[layer], atol=1e-5, rtol=1e-4
        )


def brute_force_r_k(lm, ids: torch.Tensor, k: int, n: int, rank_by: str) -> list[float]:  # type: ignore[no-untyped-def]
    """Per position, per neuron: overlap of python sets; activations read from HF's W_out input."""
    cw = lm.weights()
    acts: dict[int, torch.Tensor] = {}
    handles = [
        block.get_submodule(MLP_MODULES[lm.family][1]).register_forward_pre_hook(
            lambda _m, a, layer=layer: acts.__setitem__(layer, a[0])
        )
        for layer, block in enumerate(lm.blocks())
    ]
    try:
        hidden = capture(lm, ids).hidden.double()
    finally:
        for h in handles:
            h.remove()
    E = cw.W_U.double().numpy()
    out = []
    for layer, lw in enumerate(cw.layers):
        h = hidden[layer + 1]
        normed = cw.final_norm(h.float()).double() if cw.final_norm is not None else h
        lens = numpy_topk(normed.reshape(-1, h.shape[-1]).numpy() @ E.T, k)
        a = acts[layer].double().reshape(-1, acts[layer].shape[-1]).numpy()
        W_out = lw.W_out.double().numpy()
        norms = np.linalg.norm(W_out, axis=1)
        overlaps = []
        for p in range(a.shape[0]):
            score = np.abs(a[p]) * norms if rank_by == "contribution" else a[p]
            for j in np.argsort(-score, kind="stable")[:n]:
                sign = np.sign(a[p, j]) if rank_by == "contribution" else 1.0
                tokens = numpy_topk((sign * W_out[j] @ E.T)[None], k)[0]
                overlaps.append(len(tokens & lens[p]))
        out.append(float(np.mean(overlaps)))
    return out


@pytest.mark.parametrize(
    ("family", "rank_by"),
    [("gpt2", "contribution"), ("llama", "activation"), ("llama", "contribution")],
)
def test_r_k_equals_brute_force_overlaps(tiny_model, family: str, rank_by: str) -> None:  # type: ignore[no-untyped-def]
    lm = tiny_model(family)
    ids = torch.randint(4, 96, (5, 8), generator=torch.Generator().manual_seed(4))
    result = r_k(lm, ids, CPU, k=7, n_neurons=4, rank_by=rank_by)
    assert result.n_positions == 40
    np.testing.assert_allclose(result.overlap, brute_force_r_k(lm, ids, 7, 4, rank_by), atol=1e-9)
    assert len(result.shuffled) == len(lm.weights().layers)


def test_r_k_shuffle_changes_nothing_when_every_neuron_is_selected(tiny_model) -> None:  # type: ignore[no-untyped-def]
    lm = tiny_model("gpt2")
    ids = torch.randint(4, 96, (2, 6), generator=torch.Generator().manual_seed(5))
    d_mlp = lm.weights().layers[0].W_out.shape[0]
    result = r_k(lm, ids, CPU, k=5, n_neurons=d_mlp, rank_by="activation")
    np.testing.assert_allclose(result.shuffled, result.overlap, atol=1e-12)


def test_r_k_rejects_bad_options(tiny_model) -> None:  # type: ignore[no-untyped-def]
    lm = tiny_model("gpt2")
    ids = torch.randint(4, 96, (1, 4))
    with pytest.raises(TgeomError, match=r"valid k are 1\.\.96"):
        r_k(lm, ids, CPU, k=97)
    with pytest.raises(TgeomError, match="rank-by"):
        r_k(lm, ids, CPU, rank_by="loudest")
    with pytest.raises(TgeomError, match="n-neurons"):
        r_k(lm, ids, CPU, n_neurons=0)


def test_sim_k_subsamples_pairs_with_a_seed(tiny_model) -> None:  # type: ignore[no-untyped-def]
    cw = tiny_model("gpt2").weights()
    first = sim_k(cw, k=5, max_pairs=10, seed=2)
    again = sim_k(cw, k=5, max_pairs=10, seed=2)
    assert first.n_pairs == {"ffn_key_value": 10, "W_V_W_O": 10, "W_Q_W_K": 10}
    assert first.similarity == again.similarity and first.shuffled == again.shuffled
