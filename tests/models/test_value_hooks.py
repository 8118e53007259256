"""Values and attention probabilities taken by hooks during the model's own forward pass: the
hooked ``V`` equals ``x W_V + b_V`` from the canonical weights (every family, GQA included), and
the hooked probabilities are the ones the model returns."""

from __future__ import annotations

import pytest
import torch

from tgeom.capture import stream_hidden
from tgeom.models.reference import values as canonical_values
from tiny_models import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_hooked_values_and_attention_equal_canonical_and_returned(tiny_model, family):
    lm = tiny_model(family)
    ids = torch.randint(4, 96, (2, 11), generator=torch.Generator().manual_seed(3))
    hidden, values, weights = {}, {}, {}
    output = stream_hidden(
        lm,
        ids,
        hidden.__setitem__,
        attentions=True,
        values=values.__setitem__,
        attention_weights=weights.__setitem__,
    )
    cw = lm.weights()
    L, H, dh = lm.summary.n_layers, lm.summary.n_heads, lm.summary.d_head
    assert sorted(values) == sorted(weights) == list(range(L))
    for layer in range(L):
        lw = cw.layers[layer]
        x = lw.ln_attn(hidden[layer]) if cw.summary.norm_placement == "pre" else hidden[layer]
        expected = canonical_values(lw, x)  # [B, H, T, dh] from the canonical weights
        assert values[layer].shape == (2, H, 11, dh)
        scale = float(expected.abs().max())
        assert float((values[layer] - expected).abs().max()) <= 1e-5 * scale, layer
        assert torch.equal(weights[layer], output.attentions[layer])
