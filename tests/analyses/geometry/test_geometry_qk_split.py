"""The QK-logit split into pos-pos / pos-ctx / ctx-pos / ctx-ctx parts [SZ]."""

from __future__ import annotations

import pytest
import torch

from tgeom.analyses.geometry import GeometryStats
from tgeom.analyses.geometry.attention import (
    PARTS,
    logit_parts,
    positional_share,
    qk_logit_parts,
    split_inputs,
)
from tgeom.models.reference import attention_bias


def planted_stats(lm, n_windows=6, n_positions=9, seed=0) -> GeometryStats:
    g = torch.Generator().manual_seed(seed)
    L1, d = lm.summary.n_layers + 1, lm.summary.d_model
    hidden = torch.randn(L1, n_windows, n_positions, d, generator=g, dtype=torch.float64)
    topic_ids = torch.arange(n_windows) % 2
    return GeometryStats.from_hidden(
        hidden, topic_ids, ["a", "b"], meta={"options": {"keep_first": False}}
    )


@pytest.mark.parametrize(
    "family",
    ["gpt2", "llama", "bert", "neox", "opt_post_ln", "distilbert", "gptj", "phi", "gpt_neo"],
)
def test_parts_sum_to_the_logits_of_the_reconstructed_input(tiny_model, family):
    """pos-pos + pos-ctx + ctx-pos + ctx-ctx = the scaled QK logits of x = P(t) + C(c), computed
    the obvious way (biases, rotary at each position), for every context and head."""
    lm = tiny_model(family)
    cw = lm.weights()
    stats = planted_stats(lm)
    layer = 1
    P, C, positions = split_inputs(stats, cw, layer)
    lw = cw.layers[layer]
    x = P[None] + C[:, None]  # [C, T, d]
    q = torch.einsum("ctd,hde->chte", x, lw.W_Q.double()) + lw.b_Q.double()[None, :, None]
    k = torch.einsum("ctd,hde->chte", x, lw.W_K.double()) + lw.b_K.double()[None, :, None]
    if cw.rotary is not None:
        q, k = cw.rotary.apply(q, positions), cw.rotary.apply(k, positions)
    logits = torch.einsum("chte,chse->chts", q, k) * cw.attn_scale  # [C, H, T, T]
    parts = logit_parts(stats, cw, layer)
    assert torch.allclose(sum(parts.values()), logits, atol=1e-10)
    # pos-pos does not depend on the context; ctx parts vanish when ctx is zero.
    assert torch.equal(parts["pos-pos"][0], parts["pos-pos"][-1])


def test_summary_shares_and_rms(tiny_model):
    lm = tiny_model("llama")
    cw = lm.weights()
    stats = planted_stats(lm, seed=3)
    parts = logit_parts(stats, cw, 0)
    summary = qk_logit_parts(stats, cw, 0, heads=[1])
    (row,) = summary["heads"]
    allowed = attention_bias(cw, None, 1, parts["pos-pos"].shape[-1])[0, 0] == 0
    for name in PARTS:
        rms = float((parts[name][:, 1][:, allowed] ** 2).mean()) ** 0.5
        assert abs(row[f"rms_{name}"] - rms) < 1e-12 * max(1.0, rms)
    assert abs(sum(row[f"share_{p}"] for p in PARTS) - 1) < 1e-12
    assert summary["rotary_applied"]


def test_positional_share_matches_dense_computation():
    g = torch.Generator().manual_seed(1)
    W_Q, W_K = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)
    P = torch.randn(12, 16, generator=g, dtype=torch.float64)
    share = positional_share(W_Q, W_K, P, k=3)
    U = torch.linalg.svd(P - P.mean(0), full_matrices=False).Vh[:3].T
    W = W_Q.double() @ W_K.double().T
    assert abs(share - float((U.T @ W @ U).norm() ** 2 / W.norm() ** 2)) < 1e-12
    assert 0 <= share <= 1
