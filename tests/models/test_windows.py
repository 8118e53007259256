"""Sliding-window attention in the canonical form and the reference forward (SPEC section 1),
proved on a tiny GPT-Neo (one global and one local layer, window 4), whose loading is still
refused because effective attention and null spaces do not honour windows."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import transformers

from tgeom.capture import capture
from tgeom.errors import TgeomError
from tgeom.models import LoadedModel, load_model
from tgeom.models.adapters import gpt_neo, supported_model_types
from tgeom.models.reference import attention_bias, block_attention, reference_forward
from tiny_models import save_tiny_model

WINDOW = 4


@pytest.fixture(scope="module")
def neo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("gpt_neo", tmp_path_factory.mktemp("tiny-gpt-neo"))


@pytest.fixture(scope="module")
def neo(neo_dir: Path) -> LoadedModel:
    """The tiny GPT-Neo through its adapter directly (load_model refuses it)."""
    hf = transformers.GPTNeoForCausalLM.from_pretrained(
        neo_dir, dtype=torch.float32, attn_implementation="eager"
    )
    hf.eval().requires_grad_(False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(neo_dir)
    return LoadedModel(hf, tokenizer, str(neo_dir), gpt_neo, gpt_neo.summarize(hf))


def test_gpt_neo_is_refused_in_one_line_and_not_listed(neo_dir):
    assert "gpt_neo" not in supported_model_types()
    with pytest.raises(TgeomError, match=r"'gpt_neo' is not supported yet: .*sliding window"):
        load_model(str(neo_dir), device="cpu")


def test_summary_carries_one_window_per_layer(neo):
    assert neo.summary.attention_windows == (0, WINDOW)
    assert neo.weights().attn_scale == 1.0


@pytest.mark.parametrize("padded", [False, True])
def test_reference_forward_with_windows_matches_hf_at_every_layer(neo, padded):
    ids = torch.randint(4, 96, (2, 15), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 9:] = 0
        ids[1, 9:] = 0
    captured = capture(neo, ids, mask)
    reference = reference_forward(neo.weights(), ids, mask)
    real = mask.bool()
    diffs = [float((captured.hidden[i][real] - reference[i][real]).abs().max()) for i in range(3)]
    assert max(diffs) < 1e-4, diffs
    # The window acts: without it the local layer's output is far off.
    cw = neo.weights()
    global_only = dataclasses.replace(cw.summary, attention_windows=())
    unwindowed = dataclasses.replace(cw, summary=global_only)
    off = reference_forward(unwindowed, ids, mask)[2]
    assert float((captured.hidden[2][real] - off[real]).abs().max()) > 1e-2


def test_local_layer_attends_only_to_its_window(neo):
    """Each query of the local layer puts weight on its last 4 keys (itself included) only, and
    the reference's windowed probabilities are the model's own, in both layers."""
    T = 12
    ids = torch.randint(4, 96, (1, T), generator=torch.Generator().manual_seed(1))
    captured = capture(neo, ids, attentions=True)
    cw = neo.weights()
    for layer in range(cw.summary.n_layers):
        x = cw.layers[layer].ln_attn(captured.hidden[layer])
        probs = block_attention(cw, layer, x, attention_bias(cw, None, 1, T))
        assert (probs - captured.attentions[layer]).abs().max() < 1e-5
    local = captured.attentions[1][0]  # [H, T, T]
    i, j = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    outside = (j > i) | (i - j >= WINDOW)
    assert float(local[:, outside].abs().max()) == 0.0
    assert float(local[:, ~outside].min()) > 0.0


@pytest.mark.parametrize(
    ("family", "windows"),
    [("mistral", (4, 4)), ("qwen2", (0, 3))],  # Qwen2: layers >= max_window_layers = 1
)
def test_mistral_and_qwen2_windows_come_from_the_config_and_act(tiny_model, family, windows):
    """Mistral windows every layer; Qwen2 the layers its config marks ``sliding_attention``.
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
