"""The paper's four-part picture of the QK logits (pos-pos / pos-ctx / ctx-pos / ctx-ctx) [SZ]:
figure data, its parts RMS values, never shares."""

from __future__ import annotations

import pytest
import torch

from tgeom.analyses.embedding.classifier import map_weights
from tgeom.analyses.geometry import GeometryStats
from tgeom.analyses.geometry.attention import (
    PARTS,
    four_part_picture,
    logit_parts,
    positional_share,
    split_inputs,
)
from tgeom.models.reference import attention_bias, block_attention
from tgeom.models.weights import layer_rotary


def planted_stats(lm, n_windows=6, n_positions=9, seed=0) -> GeometryStats:
    g = torch.Generator().manual_seed(seed)
    L1, d = lm.summary.n_layers + 1, lm.summary.d_model
    hidden = torch.randn(L1, n_windows, n_positions, d, generator=g, dtype=torch.float64)
    topic_ids = torch.arange(n_windows) % 2
    return GeometryStats.from_hidden(
        hidden, topic_ids, ["a", "b"], meta={"options": {"keep_first": False}}
    )


def qk_norm_by_hand(x, norm):
    """QK-norm of ``x [C, H, T, dh]`` written out: gain times x over the RMS of each head's
    coordinates (scope 'head') or of all heads' coordinates of the token (scope 'all')."""
    dims = (-1,) if norm.scope == "head" else (1, 3)
    rms = (x.pow(2).mean(dims, keepdim=True) + norm.eps).sqrt()
    return norm.weight.double()[None, :, None, :] * x / rms


@pytest.mark.parametrize(
    "family",
    [
        "gpt2",
        "llama",
        "bert",
        "neox",
        "opt_post_ln",
        "distilbert",
        "gptj",
        "phi",
        "gpt_neo",
        "qwen3",
        "olmo2",
        "phi3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "bloom",
    ],
)
def test_parts_sum_to_the_logits_of_the_reconstructed_input(tiny_model, family):
    """pos-pos + pos-ctx + ctx-pos + ctx-ctx (+ alibi) = the logits of x = P(t) + C(c),
    computed the obvious way (biases, rotary at each position, BLOOM's ALiBi slope[h] * (s - t)),
    for every context and head."""
    lm = tiny_model(family)
    cw = lm.weights()
    stats = planted_stats(lm)
    for layer in range(cw.summary.n_layers):
        P, C, positions = split_inputs(stats, cw, layer)
        lw = cw.layers[layer]
        x = P[None] + C[:, None]  # [C, T, d]
        q = torch.einsum("ctd,hde->chte", x, lw.W_Q.double()) + lw.b_Q.double()[None, :, None]
        k = torch.einsum("ctd,hde->chte", x, lw.W_K.double()) + lw.b_K.double()[None, :, None]
        if lw.q_norm is not None:  # QK-norm before rotary, as the model does
            q, k = qk_norm_by_hand(q, lw.q_norm), qk_norm_by_hand(k, lw.k_norm)
        rotary = layer_rotary(cw, layer)  # Gemma 3's layer 0: the local RoPE base
        if rotary is not None:
            q, k = rotary.apply(q, positions), rotary.apply(k, positions)
        logits = torch.einsum("chte,chse->chts", q, k) * cw.attn_scale  # [C, H, T, T]
        if cw.alibi_slopes is not None:
            for h, slope in enumerate(cw.alibi_slopes.tolist()):
                for t, query in enumerate(positions.tolist()):
                    for s, key in enumerate(positions.tolist()):
                        logits[:, h, t, s] += slope * (key - query)
        parts = logit_parts(stats, cw, layer)
        assert list(parts) == list(PARTS) + (["alibi"] if family == "bloom" else [])
        assert torch.allclose(sum(parts.values()), logits, atol=1e-10)
        # pos-pos does not depend on the context, unless QK-norm divides it by the token's scale.
        same = torch.equal(parts["pos-pos"][0], parts["pos-pos"][-1])
        assert same == (lw.q_norm is None)


def test_qk_norm_parts_sum_to_the_models_own_attention_logits(tiny_model):
    """OLMo 2 attends to the residual stream itself (no norm before attention), so on hidden
    states with no residual (``h = mu + pos_t + ctx_c`` exactly) the split's input is the true
    attention input: the parts, each divided by its token's own QK-norm scale, sum to the
    model's logits and give its attention (the reference forward in float64)."""
    lm = tiny_model("olmo2")
    cw64 = map_weights(lm.weights(), lambda _n, t: t.double())
    g = torch.Generator().manual_seed(4)
    L1, C, T, d = lm.summary.n_layers + 1, 5, 7, lm.summary.d_model
    pos = torch.randn(L1, 1, T, d, generator=g, dtype=torch.float64)
    ctx = torch.randn(L1, C, 1, d, generator=g, dtype=torch.float64)
    mu = torch.randn(L1, 1, 1, d, generator=g, dtype=torch.float64)
    hidden = mu + (pos - pos.mean(2, keepdim=True)) + (ctx - ctx.mean(1, keepdim=True))
    stats = GeometryStats.from_hidden(hidden, torch.arange(C) % 2, ["a", "b"])
    for block in range(lm.summary.n_layers):
        logits = sum(logit_parts(stats, cw64, block).values())  # [C, H, T, T]
        bias = attention_bias(cw64, None, C, T)
        want = block_attention(cw64, block, hidden[block], bias)
        assert torch.allclose(torch.softmax(logits + bias, dim=-1), want, atol=1e-12)


def test_picture_rms_and_no_shares(tiny_model):
    lm = tiny_model("llama")
    cw = lm.weights()
    stats = planted_stats(lm, seed=3)
    parts = logit_parts(stats, cw, 0)
    summary = four_part_picture(stats, cw, 0, heads=[1])
    (row,) = summary["heads"]
    allowed = attention_bias(cw, None, 1, parts["pos-pos"].shape[-1])[0, 0] == 0
    for name in PARTS:
        rms = float((parts[name][:, 1][:, allowed] ** 2).mean()) ** 0.5
        assert abs(row[f"rms_{name}"] - rms) < 1e-12 * max(1.0, rms)
    assert not any(key.startswith("share_") for key in row)  # the parts are not shares
    assert "not shares" in summary["caption"]
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


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "phi3"])
def test_windowed_blocks_summarise_only_the_pairs_the_model_computes(tiny_model, family):
    """In a sliding-window block every RMS is over the (t, s) pairs with
    ``t - w < s <= t`` only: equal to a slow float64 sum over those pairs, different from the
    all-causal average, and the mask is the one the reference forward uses (its attention is
    zero exactly off it). Global blocks keep the causal average bit for bit."""
    lm = tiny_model(family)
    cw = lm.weights()
    stats = planted_stats(lm, seed=5)
    windows = cw.summary.attention_windows
    assert any(windows)  # the tiny model is windowed
    for block, window in enumerate(windows):
        parts = logit_parts(stats, cw, block)
        n_ctx, _, T, _ = parts["pos-pos"].shape
        summary = four_part_picture(stats, cw, block)
        assert summary["attention_window"] == window
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        if not window:
            assert summary["mask"] == "causal (s <= t)"
            for row in summary["heads"]:
                squares = {
                    p: float((parts[p][:, row["head"]][:, causal] ** 2).mean()) for p in PARTS
                }
                for p in PARTS:
                    assert row[f"rms_{p}"] == squares[p] ** 0.5  # bit for bit
            continue
        assert summary["mask"] == f"sliding window of {window} keys (t - {window} < s <= t)"
        # the reference forward attends exactly to these pairs
        x = torch.randn(1, T, cw.summary.d_model, generator=torch.Generator().manual_seed(1))
        probs = block_attention(cw, block, x, attention_bias(cw, None, 1, T))[0]
        seen = [(t, s) for t in range(T) for s in range(T) if s <= t and t - s < window]
        on = torch.zeros(T, T, dtype=torch.bool)
        on[tuple(zip(*seen, strict=True))] = True
        assert torch.equal(probs > 0, on[None].expand_as(probs))
        assert len(seen) < int(causal.sum())  # the window cuts pairs on these positions
        for row in summary["heads"]:
            h = row["head"]
            brute = {}
            for p in PARTS:
                values = parts[p][:, h]
                total = sum(float(values[c, t, s]) ** 2 for c in range(n_ctx) for t, s in seen)
                brute[p] = total / (n_ctx * len(seen))
            for p in PARTS:
                assert row[f"rms_{p}"] == pytest.approx(brute[p] ** 0.5, rel=1e-12, abs=1e-15)
            all_causal = float((parts["ctx-ctx"][:, h][:, causal] ** 2).mean()) ** 0.5
            assert abs(row["rms_ctx-ctx"] - all_causal) > 1e-3 * all_causal


def test_alibi_part_is_the_reference_forwards_bias(tiny_model):
    """BLOOM: the alibi part is, for every context, the bias the reference forward adds (proven
    against the model's hidden states) on the allowed (t, s) pairs, and the summary reports it
    as its own part."""
    lm = tiny_model("bloom")
    cw = lm.weights()
    stats = planted_stats(lm, n_positions=9)
    parts = logit_parts(stats, cw, 0)
    T = parts["alibi"].shape[-1]
    bias = attention_bias(cw, None, 1, T)[0]  # [H, T, T]
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    for c in range(parts["alibi"].shape[0]):
        assert torch.allclose(parts["alibi"][c][:, allowed], bias[:, allowed].double(), atol=1e-6)
    assert float(parts["alibi"][:, :, allowed].abs().max()) > 1.0  # slope 0.5, distances to 8
    summary = four_part_picture(stats, cw, 0)
    assert summary["parts"] == [*PARTS, "alibi"]
    for row in summary["heads"]:
        rms = float((parts["alibi"][:, row["head"]][:, allowed] ** 2).mean()) ** 0.5
        assert row["rms_alibi"] == pytest.approx(rms, rel=1e-12) and rms > 0
