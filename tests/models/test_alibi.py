"""ALiBi in the canonical form and the reference forward (SPEC section 1, "ALiBi"), on the tiny
BLOOM: 6 heads (not a power of two, so the slopes take BLOOM's interleaved extra heads)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

from tgeom.capture import capture
from tgeom.models.reference import attention_bias, block_attention, reference_forward
from tgeom.models.weights import alibi_slopes


def test_slopes_are_blooms_for_every_head_count():
    """Our slopes equal the ones BLOOM's own code builds, bit for bit, for 1..130 heads."""
    for n in range(1, 131):
        assert torch.equal(alibi_slopes(n), _get_alibi_slopes(n, torch.device("cpu"))), n
    assert alibi_slopes(6).tolist() == [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]


def test_canonical_weights_carry_the_slopes(tiny_model):
    lm = tiny_model("bloom")
    cw = lm.weights()
    assert lm.summary.position_scheme == "alibi"
    assert cw.W_pos is None and cw.rotary is None
    assert torch.equal(cw.alibi_slopes, alibi_slopes(6))
    assert "alibi_slopes" in dict(cw.named_tensors())


def test_bias_is_slope_times_key_distance_over_real_tokens(tiny_model):
    """The bias written out entry by entry: slope[h] * (s - t) where key s is visible from query
    t (causal, not padding), t and s numbered over real tokens; the mask elsewhere."""
    cw = tiny_model("bloom").weights()
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 1, 0]])
    bias = attention_bias(cw, mask, 2, 6)
    assert bias.shape == (2, 6, 6, 6)
    for b in range(2):
        real = [i for i in range(6) if mask[b, i]]
        for h in range(6):
            for t in real:  # a padded query's row is never read
                for s in range(6):
                    if s <= t and mask[b, s]:
                        want = float(cw.alibi_slopes[h]) * (real.index(s) - real.index(t))
                        assert abs(float(bias[b, h, t, s]) - want) < 1e-6
                    else:
                        assert float(bias[b, h, t, s]) == torch.finfo(bias.dtype).min


@pytest.mark.parametrize("padded", [False, True])
def test_alibi_acts_in_the_reference_forward(tiny_model, padded):
    """The reference forward matches the model (left padding moves BLOOM's key positions);
    without ALiBi, or with its slopes in the wrong head order, it is far off."""
    lm = tiny_model("bloom")
    ids = torch.randint(4, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :5] = 0
        ids[1, :5] = 0
    real = mask.bool()
    captured = capture(lm, ids, mask)
    cw = lm.weights()

    def off(weights):
        hidden = reference_forward(weights, ids, mask)
        return max(float((captured.hidden[i][real] - hidden[i][real]).abs().max()) for i in (1, 2))

    assert off(cw) < 1e-4
    assert off(dataclasses.replace(cw, alibi_slopes=None)) > 1.0
    assert off(dataclasses.replace(cw, alibi_slopes=cw.alibi_slopes.flip(0))) > 1.0


def test_reference_attention_is_blooms_with_padding(tiny_model):
    """Each layer's attention probabilities equal the model's own, with left padding."""
    lm = tiny_model("bloom")
    cw = lm.weights()
    ids = torch.randint(4, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids[0, :4] = 0
    captured = capture(lm, ids, mask, attentions=True)
    bias = attention_bias(cw, mask, 2, 12)
    for layer, lw in enumerate(cw.layers):
        probs = block_attention(cw, layer, lw.ln_attn(captured.hidden[layer]), bias)
        rows = mask.bool()  # queries that are real tokens
        assert (
            float((probs - captured.attentions[layer]).abs().permute(0, 2, 1, 3)[rows].max()) < 1e-5
        )


def test_info_names_alibi(tiny_model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "tgeom", "info", "--json", str(tiny_model_dir("bloom"))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["family"], info["position_scheme"], info["rotary_dim"]) == ("bloom", "alibi", 0)
