"""Spectral head scores: equal to the dense [V, V] eigenvalue computation in float64 (SPEC 7)."""

from __future__ import annotations

import copy

import pytest
import torch

from tgeom.analyses.embedding.filters import token_mask
from tgeom.analyses.heads.spectral import (
    eigen_ratio,
    eigenvalues,
    ov_eigenvalues,
    spectral_scores,
    vocabulary_gram,
)
from tgeom.errors import TgeomError


def dense_factor(E, W, norm, head, gain):
    """By hand: ``E W[head]`` ([V, dh]) and, with QK-norm, each row divided by its RMS over the
    head ('head') or over every head's projection ('all'), times the gain."""
    x = E @ W[head].double()
    if norm is None:
        return x
    if norm.scope == "head":
        ms = x.pow(2).mean(-1, keepdim=True)
    else:
        every = torch.stack([E @ W[g].double() for g in range(W.shape[0])])  # [H, V, dh]
        ms = every.pow(2).mean((0, 2))[:, None]
    return gain[head].double() * x / torch.sqrt(ms + norm.eps)


def dense_circuits(cw, block, head, E_qk, E_ov):
    """The [V', V'] QK and OV matrices of one head, formed densely in float64."""
    lw = cw.layers[block]
    (Er, Ec) = E_qk
    FQ = dense_factor(Er, lw.W_Q, lw.q_norm, head, lw.q_norm.weight if lw.q_norm else None)
    FK = dense_factor(Ec, lw.W_K, lw.k_norm, head, lw.k_norm.weight if lw.k_norm else None)
    (Or, Oc) = E_ov
    OV = Or @ lw.W_V[head].double() @ lw.W_O[head].double() @ Oc.T
    return FQ @ FK.T, OV


def dense_ratio(M):
    lam = eigenvalues(M)  # torch.linalg.eigvals on one thread (fast on shared cores)
    return float(lam.real.sum() / lam.abs().sum())


def power_traces(M, n=3):
    """tr(M^k), k = 1..n: equal for two matrices with the same nonzero eigenvalues."""
    out, P = [], torch.eye(M.shape[0], dtype=M.dtype)
    for _ in range(n):
        P = P @ M
        out.append(float(torch.trace(P)))
    return out


@pytest.mark.parametrize(
    ("family", "embedding"),
    [("gpt2", "out"), ("llama", "out"), ("llama", "tl"), ("qwen3", "out"), ("olmo2", "in")],
)
def test_spectral_scores_equal_the_dense_eigenvalues(tiny_model, family, embedding):
    lm = tiny_model(family)
    cw = lm.weights()
    mask = token_mask(lm)  # special tokens dropped, as weights topk does by default
    keep = mask.nonzero()[:, 0]
    result = spectral_scores(cw, E=embedding, mask=mask, chunk_rows=17)  # several chunks
    E_in, E_out = cw.W_E.double()[keep], cw.W_U.double()[keep]
    if embedding == "tl":
        E_qk, E_ov = (E_in, E_in), (E_in, E_out)
    else:
        E = E_out if embedding == "out" else E_in
        E_qk, E_ov = (E, E), (E, E)
    assert result.n_tokens == len(keep)
    for block in range(len(cw.layers)):
        for head in range(cw.summary.n_heads):
            QK, OV = dense_circuits(cw, block, head, E_qk, E_ov)
            for name, M in (("qk_same_token", QK), ("ov_copying", OV)):
                got = result.score(name, block, head)
                assert got == pytest.approx(dense_ratio(M), abs=1e-9), (name, block, head)
    # beyond the ratio, the [dh, dh] eigenvalues are the dense matrix's nonzero ones
    core_lam = ov_eigenvalues(cw.layers[1], vocabulary_gram(E_ov[0], E_ov[1]))
    for head in range(cw.summary.n_heads):
        _, OV = dense_circuits(cw, 1, head, E_qk, E_ov)
        lam = core_lam[head]
        traces = [float((lam**k).sum().real) for k in (1, 2, 3)]
        assert traces == pytest.approx(power_traces(OV), rel=1e-9, abs=1e-9)


def test_whole_vocabulary_without_a_mask(tiny_model):
    lm = tiny_model("llama")  # grouped KV, untied
    cw = lm.weights()
    result = spectral_scores(cw, blocks=[1])
    E = cw.W_U.double()
    assert result.blocks == [1] and result.n_tokens == E.shape[0]
    for head in range(cw.summary.n_heads):
        QK, OV = dense_circuits(cw, 1, head, (E, E), (E, E))
        assert result.score("qk_same_token", 1, head) == pytest.approx(dense_ratio(QK), abs=1e-9)
        assert result.score("ov_copying", 1, head) == pytest.approx(dense_ratio(OV), abs=1e-9)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_identity_circuits_score_one_and_negated_minus_one(tiny_model, family):
    """OV (and QK) equal to the identity on the kept vocabulary: score 1; negated: -1."""
    lm = tiny_model(family)
    cw = copy.deepcopy(lm.weights())
    dh = cw.summary.d_head
    ids = torch.arange(10, 10 + dh)  # as many tokens as d_head: the identity has full rank
    mask = torch.zeros(cw.W_U.shape[0], dtype=torch.bool)
    mask[ids] = True
    E = cw.W_U[ids].double()
    P = torch.linalg.pinv(E).float()  # [d, dh]: E P = I
    lw = cw.layers[1]
    lw.W_V[0], lw.W_O[0] = P, P.T  # OV = E P P^T E^T = I
    lw.W_V[1], lw.W_O[1] = P, -P.T
    lw.W_Q[2], lw.W_K[2] = P, P  # QK = I (every token attends to itself)
    lw.W_Q[3], lw.W_K[3] = P, -P
    dense = E @ lw.W_V[0].double() @ lw.W_O[0].double() @ E.T
    assert torch.allclose(dense, torch.eye(dh, dtype=torch.float64), atol=1e-5)
    result = spectral_scores(cw, mask=mask, blocks=[1])
    assert result.score("ov_copying", 1, 0) == pytest.approx(1.0, abs=1e-12)
    assert result.score("ov_copying", 1, 1) == pytest.approx(-1.0, abs=1e-12)
    assert result.score("qk_same_token", 1, 2) == pytest.approx(1.0, abs=1e-12)
    assert result.score("qk_same_token", 1, 3) == pytest.approx(-1.0, abs=1e-12)


def test_eigen_ratio_properties():
    lam = torch.tensor([[2.0, 1.0, 0.0], [-1.0, -3.0, 0.0], [0.0, 0.0, 0.0]])
    assert eigen_ratio(lam).tolist()[:2] == [1.0, -1.0]
    assert torch.isnan(eigen_ratio(lam)[2])  # a zero circuit has no score
    rotation = torch.tensor([1j, -1j])  # a pure rotation: neither copies nor suppresses
    assert float(eigen_ratio(rotation)) == pytest.approx(0.0)


def test_bad_mask_is_one_line(tiny_model):
    cw = tiny_model("gpt2").weights()
    with pytest.raises(TgeomError, match="no token"):
        spectral_scores(cw, mask=torch.zeros(cw.W_U.shape[0], dtype=torch.bool))
    with pytest.raises(TgeomError, match="one entry per token"):
        spectral_scores(cw, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TgeomError, match="out of range"):
        spectral_scores(cw, blocks=[7])


def test_eigenvalues_leave_the_thread_setting_as_it_was():
    before = torch.get_num_threads()
    core = torch.randn(3, 6, 6, dtype=torch.float64)
    lam = eigenvalues(core)
    assert torch.get_num_threads() == before
    traces = lam.sum(-1)
    assert torch.allclose(traces.real, core.diagonal(dim1=-2, dim2=-1).sum(-1), atol=1e-10)
    assert torch.allclose(traces.imag, torch.zeros(3, dtype=torch.float64), atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_real_models_equal_the_dense_eigenvalues_on_a_token_subset(request, name):
    """On real weights (SmolLM2: grouped KV), 300 seeded non-special tokens: [300, 300] dense."""
    lm = request.getfixturevalue(name)
    cw = lm.weights()
    keep_all = token_mask(lm).nonzero()[:, 0]
    chosen = keep_all[torch.randperm(len(keep_all), generator=torch.Generator().manual_seed(0))]
    mask = torch.zeros(cw.W_U.shape[0], dtype=torch.bool)
    mask[chosen[:300]] = True
    E = cw.W_U.double()[mask]
    block = len(cw.layers) - 2
    result = spectral_scores(cw, mask=mask, blocks=[block])
    for head in range(cw.summary.n_heads):
        QK, OV = dense_circuits(cw, block, head, (E, E), (E, E))
        assert result.score("qk_same_token", block, head) == pytest.approx(
            dense_ratio(QK), abs=1e-8
        )
        assert result.score("ov_copying", block, head) == pytest.approx(dense_ratio(OV), abs=1e-8)


def test_results_say_what_the_token_only_qk_leaves_out(tiny_model):
    rotary = spectral_scores(tiny_model("llama").weights(), blocks=[0]).to_json()
    assert "rotary" in rotary["position_note"]
    assert spectral_scores(tiny_model("gpt2").weights(), blocks=[0]).position_note is None
    qk_norm = spectral_scores(tiny_model("qwen3").weights(), blocks=[0])
    assert qk_norm.qk_norm_note is not None and "per head" in qk_norm.qk_norm_note
    assert rotary["embedding"] == {"qk": "W_U", "ov": "W_U"}
