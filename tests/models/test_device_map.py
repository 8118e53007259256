"""``device_map="auto"`` (accelerate) and offloaded blocks, as far as a CPU shows them; the
memory check before loading (SPEC section 1, "Precision, placement, size")."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import cpu_offload
from test_load import assert_one_line_error, run_cli

from tgeom.analyses.identifiability import effective_attention
from tgeom.capture import capture
from tgeom.errors import TgeomError
from tgeom.models import load_model
from tgeom.models.load import LoadedModel
from tgeom.models.weights import CanonicalWeights

IDS = torch.tensor([[5, 17, 33, 8, 41, 12, 9, 60]])


def _same_weights(a: CanonicalWeights, b: CanonicalWeights) -> None:
    named_a, named_b = dict(a.named_tensors()), dict(b.named_tensors())
    assert named_a.keys() == named_b.keys()
    for name, tensor in named_b.items():
        assert named_a[name].device.type == "cpu", name
        assert torch.equal(named_a[name], tensor), name


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_device_map_auto_on_cpu_equals_plain_loading(tiny_model, tiny_model_dir, family):
    plain = tiny_model(family)
    auto = load_model(str(tiny_model_dir(family)), device_map="auto")
    assert auto.device == torch.device("cpu")
    assert auto.identity == {
        "model": auto.source,
        "dtype": "float32",
        "device_map": "auto",
        "devices": ["cpu"],
    }  # results.json says how the model was placed
    assert plain.identity == {"model": plain.source, "dtype": "float32"}
    _same_weights(auto.weights(), plain.weights())
    assert torch.equal(capture(auto, IDS).hidden, capture(plain, IDS).hidden)


def test_offloaded_blocks_read_their_weights_on_demand(tiny_model, tiny_model_dir):
    """Blocks accelerate offloaded (meta parameters, values in its weights map, moved in around
    each forward: what ``device_map="auto"`` does with blocks beyond the GPUs) give the same
    canonical weights, hidden states and effective attention, and stay offloaded."""
    plain = tiny_model("llama")
    base = load_model(str(tiny_model_dir("llama")), device="cpu")
    cpu_offload(base.hf, execution_device=torch.device("cpu"))
    assert {p.device.type for p in base.hf.parameters()} == {"meta"}
    lm = LoadedModel(base.hf, base.tokenizer, base.source, base.adapter, plain.summary)
    _same_weights(lm.weights(), plain.weights())
    assert {p.device.type for p in base.hf.parameters()} == {"meta"}  # offloaded again
    assert lm.device == torch.device("cpu")
    assert torch.equal(capture(lm, IDS).hidden, capture(plain, IDS).hidden)
    got, want = effective_attention(lm, IDS), effective_attention(plain, IDS)
    for a, b in zip(got.sequences, want.sequences, strict=True):
        assert torch.equal(a.raw, b.raw) and torch.equal(a.effective, b.effective)


def test_a_model_that_does_not_fit_is_refused_with_the_bytes(tiny_model, tiny_model_dir):
    """One line naming the bytes the weights need (float32: 4 per parameter) and the bytes the
    devices hold, before any weight is read."""
    needed = 4 * sum(p.numel() for p in tiny_model("llama").hf.parameters())
    folder = str(tiny_model_dir("llama"))
    with pytest.raises(TgeomError) as caught:
        load_model(folder, device_map="auto", max_memory={"cpu": 10_000})
    message = str(caught.value)
    assert "\n" not in message
    assert f"need {needed:,} bytes" in message and "hold 10,000 bytes" in message
    with pytest.raises(TgeomError, match="device_map must be 'auto'"):
        load_model(folder, device_map="balanced")


def test_cli_device_map_auto_gives_the_plain_results(tiny_model_dir, tmp_path):
    """``--device-map auto`` on a model-taking command (CPU here): the same results.json as
    without, which it records; a device map tgeom does not offer is one line, exit 2."""
    folder = str(tiny_model_dir("llama"))
    outputs = []
    for extra, name in (([], "plain"), (["--device-map", "auto"], "auto")):
        args = ["weights", "topk", folder, "--block", "1", "--head", "3", "--out"]
        result = run_cli(*args, str(tmp_path / name), *extra)
        assert result.returncode == 0, result.stderr
        outputs.append(json.loads((tmp_path / name / "results.json").read_text()))
    placement = {"device_map": "auto", "devices": ["cpu"]}
    assert outputs[1] == {**outputs[0], **placement} and len(outputs[0]["pairs"]) == 20
    assert_one_line_error(run_cli("info", folder, "--device-map", "balanced"), "device_map")
