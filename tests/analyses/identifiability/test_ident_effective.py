"""Effective attention [BRU]: preserves head outputs, null dimension, padding invariance."""

from __future__ import annotations

import pytest
import torch

from tgeom.analyses.identifiability import effective_attention, null_space_dims
from tgeom.analyses.identifiability.effective import effective_attention_batch
from tgeom.capture import capture


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_effective_attention_preserves_head_output(tiny_model, family):
    lm = tiny_model(family)
    ids = torch.randint(4, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    seqs = effective_attention_batch(lm, ids)
    cw = lm.weights()
    cap = capture(lm, ids, values=True)
    for b, seq in enumerate(seqs):
        for layer, lw in enumerate(cw.layers):
            T = cap.values[layer, b].double() @ lw.W_O.double()  # [H, n, d]
            raw, eff = seq.raw[layer] @ T, seq.effective[layer] @ T
            assert (raw - eff).norm() <= 1e-6 * raw.norm()
        # generic random heads: null dim = d_s - d_head when d_s > d_head
        assert (seq.null_dim == 20 - lm.summary.d_head).all()


def test_short_sequences_have_trivial_null_space(tiny_model):
    lm = tiny_model("bert")
    ids = torch.randint(4, 96, (1, 6), generator=torch.Generator().manual_seed(1))  # 6 <= d_head 8
    (seq,) = effective_attention_batch(lm, ids)
    assert (seq.null_dim == 0).all()
    assert torch.equal(seq.raw, seq.effective)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_padding_never_changes_results(tiny_model, family):
    lm = tiny_model(family)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(4, 96, (1, 16), generator=g), torch.randint(4, 96, (1, 11), generator=g)
    padded = torch.zeros(2, 16, dtype=torch.long)
    padded[0], padded[1, :11] = a[0], b[0]
    mask = torch.zeros(2, 16, dtype=torch.long)
    mask[0], mask[1, :11] = 1, 1
    batch = effective_attention_batch(lm, padded, mask)
    single = effective_attention_batch(lm, a) + effective_attention_batch(lm, b)
    for x, y in zip(batch, single, strict=True):
        assert x.raw.shape == y.raw.shape
        assert torch.allclose(x.raw, y.raw, atol=1e-6)
        assert torch.allclose(x.effective, y.effective, atol=1e-5)
        assert torch.equal(x.null_dim, y.null_dim)


def test_summaries_and_null_dims(tiny_model):
    lm = tiny_model("bert")
    ids = torch.randint(4, 96, (3, 14), generator=torch.Generator().manual_seed(3))
    ids[:, 0], ids[:, -1] = lm.tokenizer.bos_token_id, lm.tokenizer.eos_token_id
    result = effective_attention(lm, ids)
    data = result.to_json()
    assert len(data["heads"]) == lm.summary.n_layers * lm.summary.n_heads
    types = result.token_type_attention()
    # Raw attention rows sum to one, so the signed type shares sum to one.
    assert torch.allclose(types["raw_signed"].sum(-1), torch.ones(2, 4, dtype=torch.float64))
    nulls = null_space_dims(lm, ids)
    assert (nulls.null_dim == 14 - 8).all()
    assert result.pearson().shape == (3, 2, 4)


@pytest.mark.slow
def test_effective_attention_equals_full_svd_reference_on_minilm(minilm):
    ids = minilm.tokenizer(
        ["The cat sat on the mat while the dog slept near the warm fire in the old house."] * 1,
        return_tensors="pt",
    )["input_ids"]
    (seq,) = effective_attention_batch(minilm, ids)
    cw = minilm.weights()
    cap = capture(minilm, ids, attentions=True, values=True)
    n = ids.shape[1]
    for layer in (0, 5):
        for head in (0, 7):
            T = cap.values[layer, 0, head].double() @ cw.layers[layer].W_O[head].double()
            U, s, _ = torch.linalg.svd(T, full_matrices=True)
            rank = int((s > 1e-10 * s[0]).sum())
            N = U[:, rank:]
            A = cap.attentions[layer, 0, head].double()
            expected = A - A @ N @ N.T
            assert torch.allclose(seq.effective[layer, head], expected, atol=1e-9)
            assert int(seq.null_dim[layer, head]) == n - rank == max(0, n - 32)
