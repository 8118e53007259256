"""Length-dependent rotary (Phi-3's LongRoPE, dynamic NTK): tgeom's context stops where the
rotary frequencies read at load stop being the model's own, so longer inputs are refused."""

from __future__ import annotations

import copy

import pytest
import torch

from tgeom.errors import TgeomError
from tgeom.models import load_model
from tgeom.models.reference import reference_forward
from tiny_models import TINY_CONFIGS, save_tiny_model

ORIGINAL = 16  # the pretraining context of the tiny LongRoPE model; it claims 64


@pytest.fixture(scope="module")
def longrope_phi3(tmp_path_factory: pytest.TempPathFactory):
    class_name, base = TINY_CONFIGS["phi3"]
    config = copy.deepcopy(base)
    head_dim = config.hidden_size // config.num_attention_heads
    rotary_pairs = int(head_dim * config.partial_rotary_factor) // 2
    config.rope_parameters = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "partial_rotary_factor": config.partial_rotary_factor,
        "short_factor": [1.0] * rotary_pairs,
        "long_factor": [4.0] * rotary_pairs,
        "original_max_position_embeddings": ORIGINAL,
    }
    config.original_max_position_embeddings = ORIGINAL
    folder = save_tiny_model("phi3", tmp_path_factory.mktemp("longrope"), spec=(class_name, config))
    return load_model(str(folder), device="cpu")


def _hf_vs_reference(lm, n_tokens: int) -> float:
    ids = torch.randint(
        3, lm.summary.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        hf = lm.hf(input_ids=ids, output_hidden_states=True).hidden_states
    ref = reference_forward(lm.weights(), ids, None)
    # hidden[1] (first block's output) is before any final norm in both
    return float((hf[1] - ref[1]).abs().max())


def test_longrope_context_is_the_original_pretraining_length(longrope_phi3) -> None:
    assert longrope_phi3.summary.n_ctx == ORIGINAL
    # within it the canonical rotary is the model's own ...
    assert _hf_vs_reference(longrope_phi3, ORIGINAL) < 1e-4
    # ... beyond it Hugging Face switches to the long factors, which a fixed rotary cannot follow
    assert _hf_vs_reference(longrope_phi3, ORIGINAL + 8) > 1e-2


def test_longrope_model_refuses_inputs_beyond_its_original_context(longrope_phi3) -> None:
    vocab = [t for t in longrope_phi3.vocab_strings[3:] if t.strip()]
    long_text = " ".join(vocab[: ORIGINAL + 8])
    with pytest.raises(TgeomError, match="context"):
        longrope_phi3.encode_text(long_text)
