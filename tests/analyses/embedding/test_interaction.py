"""QK/OV top pairs: equal to the dense interaction matrix, oriented as SPEC section 3 says."""

from __future__ import annotations

import copy

import pytest
import torch

from tgeom.analyses.embedding.atlas import head_atlas
from tgeom.analyses.embedding.filters import token_mask
from tgeom.analyses.embedding.interaction import (
    head_top_pairs,
    ov_top_pairs,
    qk_factor,
    qk_top_pairs,
)
from tgeom.errors import TgeomError


def dense_top(matrix, k, largest=True, row_mask=None, col_mask=None):
    V, C = matrix.shape
    entries = [
        (-float(matrix[i, j]) if largest else float(matrix[i, j]), i, j)
        for i in range(V)
        for j in range(C)
        if (row_mask is None or row_mask[i]) and (col_mask is None or col_mask[j])
    ]
    return [(i, j) for _, i, j in sorted(entries)[:k]]


@pytest.mark.parametrize(
    "family",
    [
        "gpt2",
        "llama",
        "opt_post_ln",
        "distilbert",
        "gptj",
        "phi",
        "gpt_neo",
        "phi3",
        "gemma",
        "gemma2",
        "bloom",
    ],
)
@pytest.mark.parametrize("largest", [True, False])
def test_qk_and_ov_pairs_equal_the_dense_matrices(tiny_model, family, largest):
    lm = tiny_model(family)
    cw = lm.weights()
    E = cw.W_U.double()
    lw = cw.layers[1]
    mask = token_mask(lm)
    QK = E @ lw.W_Q[2].double() @ lw.W_K[2].double().T @ E.T
    OV = E @ lw.W_V[2].double() @ lw.W_O[2].double() @ E.T
    for result, dense in [
        (qk_top_pairs(cw, 1, 2, 15, largest=largest, row_mask=mask, col_mask=mask), QK),
        (ov_top_pairs(cw, 1, 2, 15, largest=largest, row_mask=mask, col_mask=mask), OV),
    ]:
        got = list(zip(result.rows.tolist(), result.cols.tolist(), strict=True))
        assert got == dense_top(dense, 15, largest, mask, mask)
        want_values = torch.tensor([float(dense[i, j]) for i, j in got], dtype=torch.float64)
        torch.testing.assert_close(result.values.double(), want_values, rtol=1e-5, atol=1e-8)


def hf_qk_norm_factors(lm, block, head, E):
    """``F_Q, F_K [V, d_head]`` built with the Hugging Face model's own modules: each token's
    projection (no bias) through its q_norm / k_norm: per head (Qwen3, Gemma 3,
    ``[V, H, d_head]``) or over the whole projection of all heads (OLMo 2, ``[V, H d_head]``);
    key head ``h`` reads KV
    head ``h // (H / K)``."""
    attn = lm.blocks()[block].self_attn
    H, K, dh = lm.summary.n_heads, lm.summary.n_kv_heads, lm.summary.d_head
    with torch.no_grad():
        q, k = E @ attn.q_proj.weight.T, E @ attn.k_proj.weight.T
        if lm.summary.qk_norm == "head":
            q, k = attn.q_norm(q.view(-1, H, dh)), attn.k_norm(k.view(-1, K, dh))
        else:
            q, k = attn.q_norm(q).view(-1, H, dh), attn.k_norm(k).view(-1, K, dh)
    return q[:, head].double(), k[:, head // (H // K)].double()


@pytest.mark.parametrize("family", ["qwen3", "olmo2", "gemma3_text"])
@pytest.mark.parametrize("largest", [True, False])
def test_qk_norm_pairs_equal_the_dense_normalised_matrix(tiny_model, family, largest):
    """QK-norm heads: the top pairs of ``n_q(E W_Q) n_k(E W_K)^T`` (SPEC section 1), the dense
    float64 matrix built from the model's own norm modules; the raw ``E W_Q W_K^T E^T`` gives
    other pairs, so a reading that ignored QK-norm fails. OV is unaffected by QK-norm."""
    lm = tiny_model(family)
    cw = lm.weights()
    E = cw.W_U
    mask = token_mask(lm)
    for block, head in ((0, 3), (1, 2)):
        F_Q, F_K = hf_qk_norm_factors(lm, block, head, E)
        QK = F_Q @ F_K.T
        result = qk_top_pairs(cw, block, head, 15, largest=largest, row_mask=mask, col_mask=mask)
        got = list(zip(result.rows.tolist(), result.cols.tolist(), strict=True))
        assert got == dense_top(QK, 15, largest, mask, mask)
        want = torch.tensor([float(QK[i, j]) for i, j in got], dtype=torch.float64)
        torch.testing.assert_close(result.values.double(), want, rtol=1e-5, atol=1e-8)
        lw = cw.layers[block]
        raw = E.double() @ lw.W_Q[head].double() @ lw.W_K[head].double().T @ E.double().T
        assert got != dense_top(raw, 15, largest, mask, mask)
        note = result.to_json()["qk_norm_note"]
        assert (
            "QK-norm" in note
            and {"qwen3": "per head", "olmo2": "all heads", "gemma3_text": "per head"}[family]
            in note
        )
        ov = ov_top_pairs(cw, block, head, 15, largest=largest, row_mask=mask, col_mask=mask)
        OV = E.double() @ lw.W_V[head].double() @ lw.W_O[head].double() @ E.double().T
        assert list(zip(ov.rows.tolist(), ov.cols.tolist(), strict=True)) == dense_top(
            OV, 15, largest, mask, mask
        )
        assert ov.qk_norm_note is None
        chunked = qk_factor(E, lw.W_Q, lw.q_norm, head, chunk_rows=7)  # 96 tokens, 14 chunks
        torch.testing.assert_close(chunked.double(), F_Q, rtol=1e-5, atol=1e-6)
    # The atlas reuses OLMo 2's all-heads token scales across a block's heads: same pairs.
    atlas = head_atlas(
        cw, 5, circuits=("qk",), row_mask=mask, col_mask=mask, largest=largest, quiet=True
    )
    assert atlas.qk_norm_note == result.qk_norm_note
    for block in range(2):
        for head in range(4):
            alone = qk_top_pairs(cw, block, head, 5, largest=largest, row_mask=mask, col_mask=mask)
            rows = [(r.row, r.col) for r in atlas.rows if (r.block, r.head) == (block, head)]
            assert rows == list(zip(alone.rows.tolist(), alone.cols.tolist(), strict=True))
    assert qk_top_pairs(tiny_model("llama").weights(), 0, 0, 2).qk_norm_note is None


@pytest.mark.parametrize("largest", [True, False])
def test_tl_convention_reads_inputs_with_w_e_and_outputs_with_w_u(tiny_model, largest):
    cw = tiny_model("llama").weights()  # untied: W_E and W_U differ
    assert not torch.equal(cw.W_E, cw.W_U)
    E_in, E_out = cw.W_E.double(), cw.W_U.double()
    lw = cw.layers[0]
    QK = E_in @ lw.W_Q[1].double() @ lw.W_K[1].double().T @ E_in.T  # query in, key in
    OV = E_in @ lw.W_V[1].double() @ lw.W_O[1].double() @ E_out.T  # source in, promoted out
    mask = token_mask(tiny_model("llama"))
    for circuit, dense, cols in (("qk", QK, "W_E"), ("ov", OV, "W_U")):
        result = head_top_pairs(
            cw, 0, 1, circuit, 12, largest=largest, row_mask=mask, col_mask=mask, E="tl"
        )
        got = list(zip(result.rows.tolist(), result.cols.tolist(), strict=True))
        assert got == dense_top(dense, 12, largest, mask, mask)
        want = torch.tensor([float(dense[i, j]) for i, j in got], dtype=torch.float64)
        torch.testing.assert_close(result.values.double(), want, rtol=1e-5, atol=1e-8)
        payload = result.to_json()
        assert payload["embedding_convention"] == "tl"
        assert (payload["row_embedding"], payload["col_embedding"]) == ("W_E", cols)
    dar = head_top_pairs(cw, 0, 1, "ov", 12, row_mask=mask, col_mask=mask)
    assert dar.to_json()["embedding_convention"] == "dar" and dar.embedding == "W_U"
    assert dar.rows.tolist() != result.rows.tolist() or dar.cols.tolist() != result.cols.tolist()


def test_a_model_without_lm_head_records_w_e(tiny_model):
    cw = tiny_model("bert").weights()  # BertModel: no MLM head, W_U is W_E
    assert not cw.summary.has_lm_head
    for E in ("out", "in", "tl"):
        payload = head_top_pairs(cw, 0, 0, "ov", 3, E=E).to_json()
        assert (payload["embedding"], payload["row_embedding"], payload["col_embedding"]) == (
            "W_E",
            "W_E",
            "W_E",
        )


def test_an_unknown_embedding_is_refused(tiny_model):
    with pytest.raises(TgeomError, match="embedding must be 'out'"):
        head_top_pairs(tiny_model("gpt2").weights(), 0, 0, "qk", 3, E="both")


def planted(cw, layer, head, a, b, sign=1.0):
    """A copy of ``cw`` whose head maps token a (source) to token b (promoted), rank one."""
    cw = copy.deepcopy(cw)
    E = cw.W_U
    E[a] *= 6.0  # make a and b stand out so that the rank-one OV singles them out
    E[b] *= 6.0
    lw = cw.layers[layer]
    lw.W_V[head].zero_()
    lw.W_O[head].zero_()
    lw.W_V[head][:, 0] = E[a] / E[a].norm()
    lw.W_O[head][0, :] = sign * E[b] / E[b].norm()
    return cw


def test_a_planted_ov_pair_comes_back_as_row_source_col_promoted(tiny_model):
    cw = tiny_model("gpt2").weights()
    a, b = 40, 70
    result = ov_top_pairs(planted(cw, 0, 1, a, b), 0, 1, 1)
    assert (int(result.rows[0]), int(result.cols[0])) == (a, b)
    negative = ov_top_pairs(planted(cw, 0, 1, a, b, sign=-1.0), 0, 1, 1, largest=False)
    assert (int(negative.rows[0]), int(negative.cols[0])) == (a, b)
    assert float(negative.values[0]) < 0


def test_rope_note_only_for_rotary_qk(tiny_model):
    llama, gpt2 = tiny_model("llama").weights(), tiny_model("gpt2").weights()
    assert "rotary" in (qk_top_pairs(llama, 0, 0, 2).rope_note or "")
    assert ov_top_pairs(llama, 0, 0, 2).rope_note is None
    assert qk_top_pairs(gpt2, 0, 0, 2).rope_note is None


def test_alibi_note_for_bloom_qk(tiny_model):
    """BLOOM's scores add ALiBi's positional bias, which the token-only QK pairs leave out."""
    bloom = tiny_model("bloom").weights()
    assert "ALiBi" in (qk_top_pairs(bloom, 0, 0, 2).rope_note or "")
    assert ov_top_pairs(bloom, 0, 0, 2).rope_note is None


def test_pairs_json_has_tokens_and_orientation(tiny_model):
    lm = tiny_model("gpt2")
    result = head_top_pairs(lm.weights(), 0, 0, "ov", 4, E="in")
    payload = result.to_json(lm.vocab_strings)
    assert payload["embedding"] == "W_E"
    assert payload["row_is"].startswith("source")
    first = payload["pairs"][0]
    assert set(first) == {"row", "col", "row_token", "col_token", "value"}
    assert first["row_token"] == lm.vocab_strings[first["row"]]
    values = [p["value"] for p in payload["pairs"]]
    assert values == sorted(values, reverse=True)


@pytest.mark.parametrize(
    ("layer", "head", "circuit", "match"),
    [
        (2, 0, "qk", "block 2 is out of range: valid blocks are 0..1"),
        (0, 4, "ov", "head 4 is out of range: valid heads are 0..3"),
        (0, 0, "xy", "circuit must be qk or ov"),
    ],
)
def test_bad_layer_head_or_circuit_raise(tiny_model, layer, head, circuit, match):
    with pytest.raises(TgeomError, match=match):
        head_top_pairs(tiny_model("gpt2").weights(), layer, head, circuit, 3)


def test_a_filter_that_leaves_no_pair_raises(tiny_model):
    cw = tiny_model("gpt2").weights()
    none = torch.zeros(cw.W_U.shape[0], dtype=torch.bool)
    with pytest.raises(TgeomError, match="leave no token"):
        qk_top_pairs(cw, 0, 0, 3, row_mask=none)
