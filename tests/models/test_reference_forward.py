"""The adapters' proof: a forward from canonical weights reproduces every hidden state."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tgeom.capture import capture
from tgeom.models import LoadedModel
from tgeom.models.reference import block_attention, logits, reference_forward
from tiny_models import FAMILIES, TINY_CONFIGS

TOLERANCE = 1e-4
CAUSAL_LM_FAMILIES = [
    family
    for family, (class_name, _) in TINY_CONFIGS.items()
    if class_name.endswith(("ForCausalLM", "LMHeadModel"))
]


def max_layer_diffs(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor | None) -> list[float]:
    captured = capture(lm, ids, mask)
    reference = reference_forward(lm.weights(), ids, mask)
    real = (mask if mask is not None else torch.ones_like(ids)).bool()
    assert captured.hidden.shape[0] == len(reference) == lm.summary.n_layers + 1
    return [
        float((captured.hidden[i][real] - reference[i][real]).abs().max())
        for i in range(len(reference))
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_forward_matches_hf_at_every_layer(tiny_model, family):
    lm = tiny_model(family)
    ids = torch.randint(4, 96, (3, 20), generator=torch.Generator().manual_seed(1))
    diffs = max_layer_diffs(lm, ids, None)
    assert max(diffs) < TOLERANCE, diffs


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_forward_matches_hf_with_right_padding(tiny_model, family):
    lm = tiny_model(family)
    ids = torch.randint(4, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = 1 if family == "roberta" else 0  # the pad token
    assert max(max_layer_diffs(lm, ids, mask)) < TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_forward_matches_hf_with_left_padding(tiny_model, family):
    """Left padding moves real tokens' positions where a family numbers real tokens only
    (RoBERTa, OPT: ``positions_skip_padding``); every other family keeps ``0..T-1``."""
    lm = tiny_model(family)
    ids = torch.randint(4, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ids[1, :5] = 1 if family == "roberta" else 0  # the pad token
    assert max(max_layer_diffs(lm, ids, mask)) < TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_attention_matches_hf_attentions(tiny_model, family):
    lm = tiny_model(family)
    cw = lm.weights()
    ids = torch.randint(4, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    captured = capture(lm, ids, attentions=True)
    from tgeom.models.reference import attention_bias

    bias = attention_bias(cw, None, 2, 10)
    for layer, lw in enumerate(cw.layers):
        x = captured.hidden[layer]
        x = lw.ln_attn(x) if cw.summary.norm_placement == "pre" else x
        probs = block_attention(cw, layer, x, bias)
        assert (probs - captured.attentions[layer]).abs().max() < 1e-5


@pytest.mark.parametrize("family", CAUSAL_LM_FAMILIES)
def test_canonical_unembedding_reproduces_the_lm_heads_logits(tiny_model, family):
    """``final_norm(hidden[L]) @ W_U.T + b_U`` is the model's own next-token logits: W_U, b_U and
    the final norm are right (OPT-350m's layout folds ``project_out`` into W_U)."""
    lm = tiny_model(family)
    ids = torch.randint(4, 96, (2, 9), generator=torch.Generator().manual_seed(6))
    expected = lm.hf(input_ids=ids).logits
    got = logits(lm.weights(), capture(lm, ids).hidden[-1])
    assert float((got - expected).abs().max()) <= 1e-5 * max(1.0, float(expected.abs().max()))


def _qk_norm_broken(lw, mistake: str):
    """``lw`` with its QK-norm dropped, its gains set to 1 or its scope swapped."""
    if mistake == "dropped":
        return dataclasses.replace(lw, q_norm=None, k_norm=None)

    def broken(norm):
        if mistake == "unit gains":
            return dataclasses.replace(norm, weight=torch.ones_like(norm.weight))
        return dataclasses.replace(norm, scope="all" if norm.scope == "head" else "head")

    return dataclasses.replace(lw, q_norm=broken(lw.q_norm), k_norm=broken(lw.k_norm))


@pytest.mark.parametrize("family", ["qwen3", "olmo2"])
@pytest.mark.parametrize("mistake", ["dropped", "unit gains", "scope swapped"])
def test_qk_norm_acts_in_the_tiny_models(tiny_model, family, mistake):
    """The proof catches every QK-norm mistake: the tiny models' random gains and projections
    make a forward without QK-norm, with unit gains or with the other scope (per head vs all
    heads) miss the model's hidden states by far more than the tolerance."""
    lm = tiny_model(family)
    cw = lm.weights()
    assert lm.summary.qk_norm == {"qwen3": "head", "olmo2": "all"}[family]
    assert all(lw.q_norm is not None and lw.k_norm is not None for lw in cw.layers)
    ids = torch.randint(4, 96, (2, 16), generator=torch.Generator().manual_seed(7))
    captured = capture(lm, ids).hidden
    broken = dataclasses.replace(cw, layers=[_qk_norm_broken(lw, mistake) for lw in cw.layers])
    reference = reference_forward(broken, ids)
    assert float((captured[-1] - reference[-1]).abs().max()) > 1000 * TOLERANCE


def test_hidden_last_is_before_final_norm(tiny_model):
    lm = tiny_model("llama")
    ids = torch.randint(4, 96, (1, 8), generator=torch.Generator().manual_seed(4))
    out = lm.hf(input_ids=ids, output_hidden_states=True)
    captured = capture(lm, ids)
    final = lm.weights().final_norm(captured.hidden[-1])
    # Hugging Face's last hidden state is normalised; ours is the raw residual stream.
    assert torch.allclose(out.hidden_states[-1], final, atol=1e-5)
    assert not torch.allclose(out.hidden_states[-1], captured.hidden[-1], atol=1e-3)


@pytest.mark.slow
def test_reference_forward_matches_minilm(minilm):
    ids = minilm.tokenizer(
        ["The cat sat on the mat.", "Geometry of hidden states, read in the vocabulary."],
        return_tensors="pt",
        padding=True,
    )
    diffs = max_layer_diffs(minilm, ids["input_ids"], ids["attention_mask"])
    assert max(diffs) < TOLERANCE, diffs


SMOLLM2_TEXT = "The quick brown fox jumps over the lazy dog. Transformers read tokens in context."


@pytest.mark.slow
def test_reference_forward_matches_smollm2_in_float32_to_rounding(smollm2):
    """SmolLM2's residual stream reaches |h| ~ 2.3e4 at BOS (massive activations), where one
    float32 step is ~2e-3, so 1e-4 absolute is below the representable spacing there. Each layer
    must agree to 1e-4 or, where the stream has grown past that, to 8 float32 steps of the
    largest entry the stream has held so far (errors ride the residual stream forward)."""
    ids = smollm2.tokenizer(SMOLLM2_TEXT, return_tensors="pt")["input_ids"]
    captured = capture(smollm2, ids)
    reference = reference_forward(smollm2.weights(), ids)
    largest = 0.0
    for layer, ref in enumerate(reference):
        hf = captured.hidden[layer]
        largest = max(largest, float(hf.abs().max()))
        bound = max(TOLERANCE, 8 * float(torch.finfo(torch.float32).eps) * largest)
        assert float((hf - ref).abs().max()) <= bound, layer
