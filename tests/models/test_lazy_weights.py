"""Canonical weights read per block on demand (SPEC section 1, "Precision, placement, size"):
no second copy of the model, the same tensors as reading every block at once."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from tgeom.models.weights import LayerSequence, LayerWeights, Norm, QKNorm, Rotary
from tiny_models import FAMILIES


def _tensors(layer: LayerWeights) -> dict[str, torch.Tensor]:
    """Every tensor of a block by field name (norm gains and biases included)."""
    out: dict[str, torch.Tensor] = {}
    for f in fields(layer):
        value = getattr(layer, f.name)
        if isinstance(value, Norm):
            out[f"{f.name}.weight"] = value.weight
            if value.bias is not None:
                out[f"{f.name}.bias"] = value.bias
        elif isinstance(value, QKNorm):
            out[f"{f.name}.weight"] = value.weight
        elif isinstance(value, Rotary):
            out[f"{f.name}.inv_freq"] = value.inv_freq
        elif value is not None:
            out[f.name] = value
    return out


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("family", FAMILIES)
def test_lazy_layers_equal_the_eager_extraction_bit_for_bit(tiny_model, family):
    """Blocks read on demand, out of order and again after leaving the cache, are bit-for-bit the
    blocks read all at once, and grouped K/V heads repeat their KV head as ``repeat_kv`` does."""
    lm = tiny_model(family)
    cw = lm.weights()
    assert isinstance(cw.layers, LayerSequence)
    n = len(cw.layers)
    eager = [lm.adapter.extract_layer(lm.hf, lm.summary, i) for i in range(n)]
    reads: list[int] = []

    def read(i: int) -> LayerWeights:
        reads.append(i)
        return lm.adapter.extract_layer(lm.hf, lm.summary, i)

    lazy = LayerSequence(n, read, keep=1)
    order = [n - 1, 0, n - 1, 0, 0, -1]
    for index in order:
        got, want = _tensors(lazy[index]), _tensors(eager[index])
        assert got.keys() == want.keys()
        for name, tensor in want.items():
            assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
            assert torch.equal(got[name], tensor), f"block {index}: {name}"
    assert reads == [n - 1, 0, n - 1, 0, n - 1]  # the repeated 0 came from the cache
    assert [_tensors(a).keys() for a in cw.layers] == [_tensors(b).keys() for b in eager]
    assert len(cw.layers[:]) == n and cw.layers[-1] is cw.layers[n - 1]
    with pytest.raises(IndexError):
        cw.layers[n]
    s = lm.summary
    group = s.n_heads // s.n_kv_heads
    for layer in cw.layers:
        for h in range(s.n_heads):  # head h reads KV head h // group
            first = h - h % group
            assert torch.equal(layer.W_K[h], layer.W_K[first])
            assert torch.equal(layer.W_V[h], layer.W_V[first])


@pytest.mark.parametrize("family", FAMILIES)
def test_canonical_projections_share_the_model_parameters_storage(tiny_model, family):
    """Loading allocates no second copy: a block's W_Q, W_O, W_in, W_out (and W_gate, and W_K /
    W_V without grouped KV heads) are views of the Hugging Face parameters, and the model-wide
    embedding is the parameter itself."""
    lm = tiny_model(family)
    cw = lm.weights()
    params = {_storage(p) for p in lm.hf.parameters()}
    views = ["W_Q", "W_O", "W_in", "W_out"]
    if lm.summary.gated_mlp:
        views.append("W_gate")
    if lm.summary.n_kv_heads == lm.summary.n_heads:
        views += ["W_K", "W_V"]
    for index, layer in enumerate(cw.layers):
        for name in views:
            assert _storage(getattr(layer, name)) in params, f"block {index}: {name} is a copy"
    if not lm.summary.embedding_projection:  # OPT's folded projection is a product
        assert _storage(cw.W_E) in params
