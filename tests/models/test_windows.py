"""GPT-Neo's alternating global and local (sliding-window) layers (SPEC section 1, "Sliding
windows"), on a tiny GPT-Neo: layer 0 global, layer 1 local over 10 keys, d_head 8; and the
windows of the tiny Mistral, Qwen2 and Phi-3."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from tgeom.analyses.identifiability.effective import effective_attention_batch
from tgeom.capture import capture
from tgeom.linalg.nullspace import default_rtol, left_null_space
from tgeom.models import load_model
from tgeom.models.reference import attention_bias, block_attention, reference_forward
from tiny_models import TINY_CONFIGS, save_tiny_model

WINDOW = 10


def test_summary_carries_one_window_per_layer(tiny_model):
    lm = tiny_model("gpt_neo")
    assert lm.summary.attention_windows == (0, WINDOW)
    assert lm.weights().attn_scale == 1.0  # GPT-Neo does not scale q.k


@pytest.mark.parametrize("padded", [False, True])
def test_the_window_acts_in_the_reference_forward(tiny_model, padded):
    """With 15 tokens the local layer's window cuts: the reference forward matches the model's
    hidden states, and without the window it would be far off."""
    lm = tiny_model("gpt_neo")
    ids = torch.randint(4, 96, (2, 15), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 12:] = 0
        ids[1, 12:] = 0
    captured = capture(lm, ids, mask)
    real = mask.bool()
    cw = lm.weights()
    reference = reference_forward(cw, ids, mask)
    assert all(
        float((captured.hidden[i][real] - reference[i][real]).abs().max()) < 1e-4 for i in range(3)
    )
    global_only = dataclasses.replace(cw.summary, attention_windows=())
    off = reference_forward(dataclasses.replace(cw, summary=global_only), ids, mask)[2]
    assert float((captured.hidden[2][real] - off[real]).abs().max()) > 1e-2


def test_local_layer_attends_only_to_its_window(tiny_model):
    """Each query of the local layer weighs its last 10 keys (itself included) only, and the
    reference's probabilities (the window added by block_attention) are the model's."""
    lm = tiny_model("gpt_neo")
    T = 16
    ids = torch.randint(4, 96, (1, T), generator=torch.Generator().manual_seed(1))
    captured = capture(lm, ids, attentions=True)
    cw = lm.weights()
    bias = attention_bias(cw, None, 1, T)
    for layer, lw in enumerate(cw.layers):
        probs = block_attention(cw, layer, lw.ln_attn(captured.hidden[layer]), bias)
        assert (probs - captured.attentions[layer]).abs().max() < 1e-5
    local = captured.attentions[1][0]  # [H, T, T]
    i, j = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    outside = (j > i) | (i - j >= WINDOW)
    assert float(local[:, outside].abs().max()) == 0.0
    assert float(local[:, ~outside].min()) > 0.0


@pytest.mark.parametrize("family", ["gpt_neo", "phi3_window_10"])
def test_effective_attention_uses_each_querys_window(tiny_model, tmp_path, family):
    """Both layers equal [BRU]'s definition per query, slowly: a_i minus its part in the left
    null space of the rows of T = V W_O[h] that query i sees (keys 0..i in a global layer, its
    last 10 in a local one), zero elsewhere; each head keeps its output (A_eff T = A T).
    GPT-Neo: layer 1 local. Phi-3 (the tiny one with windows of 10 > d_head 8, so they have null
    spaces: the tiny phi3's windows of 5 are full rank and leave effective = raw): both local."""
    if family == "gpt_neo":
        lm, windows = tiny_model("gpt_neo"), (0, WINDOW)
    else:
        class_name, config = TINY_CONFIGS["phi3"]
        config = copy.deepcopy(config)
        config.sliding_window = WINDOW
        spec = (class_name, config)
        lm = load_model(str(save_tiny_model("phi3", tmp_path / "phi3", spec=spec)), device="cpu")
        windows = (WINDOW, WINDOW)
    assert lm.summary.attention_windows == windows
    n = 16
    ids = torch.randint(4, 96, (1, n), generator=torch.Generator().manual_seed(2))
    (seq,) = effective_attention_batch(lm, ids)
    cap = capture(lm, ids, attentions=True, values=True)
    cw = lm.weights()
    for layer, window in enumerate(w or n for w in windows):
        for head in range(lm.summary.n_heads):
            T = cap.values[layer, 0, head].double() @ cw.layers[layer].W_O[head].double()
            A = cap.attentions[layer, 0, head].double()
            expected = torch.zeros_like(A)
            for i in range(n):
                lo = max(0, i - window + 1)
                N = left_null_space(T[lo : i + 1], rtol=default_rtol(i + 1 - lo, 32, torch.float32))
                expected[i, lo : i + 1] = A[i, lo : i + 1] - A[i, lo : i + 1] @ N @ N.T
            effective = seq.effective[layer, head]
            assert float((effective - expected).abs().max()) <= 1e-9
            assert (effective @ T - A @ T).norm() <= 1e-9 * (A @ T).norm()
            assert not torch.allclose(effective, A, atol=1e-6)  # windows of 10 > d_head 8


@pytest.mark.parametrize(
    ("family", "windows"),
    [("mistral", (4, 4)), ("qwen2", (0, 3)), ("phi3", (5, 5))],  # Qwen2: layers >= 1
)
def test_mistral_qwen2_and_phi3_windows_come_from_the_config_and_act(tiny_model, family, windows):
    """Mistral and Phi-3 window every layer; Qwen2 the layers its config marks
    ``sliding_attention``.
    The model's own (eager) attention is zero outside each window and equals the reference's;
    without the windows the reference forward is far off the model's hidden states."""
    lm = tiny_model(family)
    cw = lm.weights()
    assert lm.summary.attention_windows == windows
    T = 11
    ids = torch.randint(4, 96, (2, T), generator=torch.Generator().manual_seed(7))
    captured = capture(lm, ids, attentions=True)
    i, j = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    for layer, window in enumerate(windows):
        x = cw.layers[layer].ln_attn(captured.hidden[layer])
        probs = block_attention(cw, layer, x, attention_bias(cw, None, 2, T))
        assert (probs - captured.attentions[layer]).abs().max() < 1e-5
        outside = (j > i) | (i - j >= (window or T))
        assert float(captured.attentions[layer][:, :, outside].abs().max()) == 0.0
        assert float(captured.attentions[layer][:, :, ~outside].min()) > 0.0
    unwindowed = dataclasses.replace(
        cw, summary=dataclasses.replace(cw.summary, attention_windows=())
    )
    off = reference_forward(unwindowed, ids)[-1]
    assert float((captured.hidden[-1] - off).abs().max()) > 1e-2
