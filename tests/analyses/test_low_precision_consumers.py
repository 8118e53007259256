"""What reads a bfloat16 model's weights or activations computes in float32 or better: vocabulary
projections, the logit lens, Sim_k and R_k, token identifiability (each crashed or ranked in
bfloat16 before)."""

from __future__ import annotations

import pytest
import torch

from tgeom.analyses.embedding.classifier import map_weights
from tgeom.analyses.embedding.lens import logit_lens
from tgeom.analyses.embedding.projection import project_parameter
from tgeom.analyses.embedding.validation import r_k, sim_k
from tgeom.analyses.identifiability import token_identifiability
from tgeom.capture import capture
from tgeom.models import load_model
from tgeom.runtime import Runtime

TEXT = "The quick brown fox jumps over the lazy dog."
WINDOWS = torch.arange(4, 4 + 24 * 8).reshape(24, 8) % 90 + 4


@pytest.fixture(scope="module")
def llama_bf16(tiny_model_dir):
    return load_model(str(tiny_model_dir("llama")), dtype="bfloat16", device="cpu")


def float32_copy(cw):
    return map_weights(cw, lambda _, t: t.float() if t.is_floating_point() else t)


def test_projection_scores_are_float64_exact_to_float32(llama_bf16):
    got = project_parameter(llama_bf16, block=1, neuron=3, side="key", k=20)
    cw = llama_bf16.weights()
    scores = cw.W_U.double() @ cw.layers[1].W_in[:, 3].double()  # [V], the same bf16 weights
    want = torch.sort(scores, descending=True, stable=True)
    assert got.top.scores.dtype == torch.float32
    assert got.top.token_ids[0].tolist() == want.indices[:20].tolist()
    torch.testing.assert_close(got.top.scores[0].double(), want.values[:20], rtol=1e-6, atol=0)


def test_logit_lens_of_a_bfloat16_model_reads_its_hidden_states_in_float32(llama_bf16):
    lens = logit_lens(llama_bf16, TEXT, k=5)
    cw = llama_bf16.weights()
    hidden = capture(llama_bf16, llama_bf16.encode_text(TEXT)).hidden[:, 0].double()
    normed = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + cw.final_norm.eps)
    logits = (normed * cw.final_norm.weight.double()) @ cw.W_U.double().T  # [L+1, T, V]
    assert lens.top_scores.dtype == torch.float32
    want = torch.gather(logits, 2, lens.top_ids)
    torch.testing.assert_close(lens.top_scores.double(), want, rtol=1e-5, atol=1e-6)
    assert bool((want[..., 0] >= logits.max(-1).values - 1e-5).all())  # the top token is the top


def test_sim_k_of_bfloat16_weights_equals_their_float32_copy(llama_bf16):
    cw = llama_bf16.weights()
    low, wide = sim_k(cw, k=10, seed=3), sim_k(float32_copy(cw), k=10, seed=3)
    assert low.similarity == wide.similarity and low.shuffled == wide.shuffled


def test_r_k_and_identifiability_run_on_a_bfloat16_model(llama_bf16):
    runtime = Runtime(torch.device("cpu"), batch_size=8)
    rk = r_k(llama_bf16, WINDOWS[:4], runtime, k=10, n_neurons=3)
    values = [v for group in rk.overlap.values() for v in group]
    assert len(values) == 2 * len(rk.overlap) and all(0 <= v <= 1 for v in values)
    result = token_identifiability(llama_bf16, WINDOWS, g=("identity", "mlp"), seed=0)
    first = [r for r in result.rows if r["hidden"] == 0 and r["g"] == "identity"]
    assert first and all(row["rate"] == 1.0 for row in first)  # hidden 0 is the input itself
