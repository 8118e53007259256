"""Planted heads (SPEC section 7, "Proofs"): a hand-set GPT-2 whose heads do known things comes
back with the scores those things mean, through the model's own forward pass.

The residual stream (d = 256) holds three orthogonal 64-dimensional blocks, all orthogonal to
the all-ones direction (so LayerNorm only rescales, by the same factor at every position):
``tok`` (a random unit code ``c_v`` per token), ``pos`` (one-hot position) and ``prev`` (empty
at the input). MLPs are zero, norms are gain 1 and bias 0, biases are 0.

- block 0 head 0, previous token: query = position t shifted to t - 1, key = position; it
  copies the attended token's code into ``prev``.
- block 0 head 1, same token: query and key both read ``tok`` (QK positive semi-definite:
  ``qk_same_token`` = 1); writes nothing.
- block 0 head 2, first token: every query reads position 0; writes nothing.
- block 1 head 0, induction: query reads ``tok``, key reads ``prev`` (the token before the
  key), so position t attends to the token after the previous occurrence of its own token;
  its OV copies ``tok`` (``ov_copying`` = 1).
- block 1 head 1: uniform attention, OV = minus a copy (``ov_copying`` = -1).
- every other head: all zero (uniform attention over the causal prefix, writes nothing).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers

from tgeom.analyses.heads.behaviour import induction_batch, induction_scores, text_behaviour
from tgeom.analyses.heads.spectral import spectral_scores
from tgeom.corpus import load_corpus
from tgeom.corpus.windows import make_windows
from tgeom.models import load_model
from tiny_models import TINY_CONFIGS, build_tiny_tokenizer

D, DH, N_POS = 256, 64, 64
T = 32  # window length of the text


def planted_gpt2(folder):
    config = copy.deepcopy(TINY_CONFIGS["gpt2"][1])
    config.n_embd, config.n_positions = D, N_POS
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(0)
    basis = torch.cat(
        [torch.ones(D, 1), torch.randn(D, D - 1, generator=g, dtype=torch.float64)], 1
    )
    Q = torch.linalg.qr(basis).Q  # column 0 along the all-ones direction, the rest orthogonal
    U_tok, U_pos, U_prev = Q[:, 1:65], Q[:, 65:129], Q[:, 129:193]
    codes = torch.randn(config.vocab_size, DH, generator=g, dtype=torch.float64)
    codes /= codes.norm(dim=1, keepdim=True)
    s0, s1 = math.sqrt(D / 2), math.sqrt(D / 3)  # LayerNorm's scale: |x|^2 = 2, then 3
    shift = torch.diag(torch.ones(N_POS - 1, dtype=torch.float64), -1)  # e_t -> e_{t-1}
    to_first = torch.zeros(N_POS, N_POS, dtype=torch.float64)
    to_first[:, 0] = 1.0  # e_t -> e_0
    # per block and head: (W_Q, W_K, W_V, W_O) as [d, dh], [d, dh], [d, dh], [dh, d]
    heads = {
        (0, 0): (2.0 * U_pos @ shift, U_pos, U_tok, U_prev.T / s0),
        (0, 1): (U_tok, U_tok, None, None),
        (0, 2): (2.0 * U_pos @ to_first, U_pos, None, None),
        (1, 0): (4.0 * U_tok, U_prev, U_tok, U_tok.T / s1),
        (1, 1): (None, None, U_tok, -0.01 * U_tok.T),
    }
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.transformer.wte.weight.copy_(codes @ U_tok.T)
        model.transformer.wpe.weight.copy_(U_pos.T)
        for block in model.transformer.h:
            block.ln_1.weight.fill_(1.0)
            block.ln_2.weight.fill_(1.0)
        model.transformer.ln_f.weight.fill_(1.0)
        for (b, h), mats in heads.items():
            attn = model.transformer.h[b].attn
            for which, W in zip(range(3), mats[:3], strict=True):  # Conv1D: [in, out]
                if W is not None:
                    attn.c_attn.weight[:, which * D + h * DH : which * D + (h + 1) * DH] = W
            if mats[3] is not None:
                attn.c_proj.weight[h * DH : (h + 1) * DH] = mats[3]
    model.save_pretrained(folder, safe_serialization=True)
    build_tiny_tokenizer(folder)
    return load_model(str(folder), device="cpu")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_gpt2(tmp_path_factory.mktemp("planted-gpt2"))


@pytest.fixture(scope="module")
def text(planted):
    """Windows of T characters of real English text (the built-in corpus, char tokenizer)."""
    windows = make_windows(load_corpus("builtin"), planted.tokenizer, T, max_windows_per_topic=2)
    return windows.token_ids[:24]


def others(scores, *planted_heads):
    """The scores of every head except ``planted_heads`` ((block, head) pairs)."""
    return [
        float(scores[b, h])
        for b in range(scores.shape[0])
        for h in range(scores.shape[1])
        if (b, h) not in planted_heads
    ]


def test_planted_behaviour_on_text(planted, text):
    scores = text_behaviour(planted, text).scores()
    prev, first, entropy = scores["prev_token"], scores["first_token"], scores["entropy"]
    assert float(prev[0, 0]) == pytest.approx(1.0, abs=1e-3)
    assert max(others(prev, (0, 0))) < 0.3
    assert float(first[0, 2]) == pytest.approx(1.0, abs=1e-3)
    assert float(entropy[0, 2]) < 1e-2 and float(entropy[0, 0]) < 1e-2
    # a zero head attends uniformly over its causal prefix: closed forms
    uniform_prev = sum(1 / (t + 1) for t in range(1, T)) / (T - 1)
    uniform_first = sum(1 / (t + 1) for t in range(T)) / T
    uniform_entropy = sum(math.log(t + 1) for t in range(T)) / T
    for b, h in ((0, 3), (1, 1), (1, 2), (1, 3)):
        assert float(prev[b, h]) == pytest.approx(uniform_prev, abs=1e-6)
        assert float(first[b, h]) == pytest.approx(uniform_first, abs=1e-6)
        assert float(entropy[b, h]) == pytest.approx(uniform_entropy, abs=1e-6)


def test_planted_induction_head(planted):
    batch = induction_batch(planted, 20, 8, seed=0)
    scores = induction_scores(planted, batch).scores()
    assert float(scores[1, 0]) > 0.9
    assert max(others(scores, (1, 0))) < 0.3


def test_planted_spectral_scores(planted):
    result = spectral_scores(planted.weights())
    assert result.score("ov_copying", 1, 0) == pytest.approx(1.0, abs=1e-9)  # induction copies
    assert result.score("ov_copying", 1, 1) == pytest.approx(-1.0, abs=1e-9)
    assert result.score("qk_same_token", 0, 1) == pytest.approx(1.0, abs=1e-9)
    for name in ("ov_copying", "qk_same_token"):  # an all-zero head has no score
        assert math.isnan(result.score(name, 0, 3))
