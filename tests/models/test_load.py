"""Loading: sources, the GGUF cache, safe loading, and one-line errors for bad models."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tgeom.capture import capture
from tgeom.errors import TgeomError
from tgeom.models import load_model, offline_model_path
from tgeom.models.gguf import cached_folder
from tgeom.models.reference import reference_forward
from tiny_models import FAMILIES, save_tiny_model


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tgeom", *args], capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tgeom: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_path_is_a_one_line_error(tmp_path):
    with pytest.raises(TgeomError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"))


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(TgeomError, match=r"no config\.json"):
        load_model(str(tmp_path))


def test_pickle_only_checkpoint_is_refused(tmp_path, tiny_model_dir):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model_dir("gpt2") / "config.json").read_text())
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(TgeomError, match=r"pickle checkpoints \(pytorch_model.bin\).*safetensors"):
        load_model(str(folder))


def test_unsupported_architecture_names_it_and_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(TgeomError, match=r"unsupported architecture 't5'.*gpt2.*llama"):
        load_model(str(tmp_path))


def test_phi_with_qk_layernorm_is_refused_in_one_line(tmp_path):
    """Phi's ``qk_layernorm`` is a QK-norm, which the canonical form does not carry: refused at
    load time, in one line, from the CLI too."""
    folder = save_tiny_model("phi", tmp_path / "phi-qk")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "qk_layernorm": True}))
    with pytest.raises(TgeomError, match=r"qk_layernorm=True"):
        load_model(str(folder), device="cpu")
    assert_one_line_error(run_cli("info", str(folder)), "qk_layernorm=True", "not supported")


def test_nan_weights_are_named(tmp_path):
    folder = save_tiny_model("gpt2", tmp_path / "nan")
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    key = next(k for k in tensors if "h.1.attn.c_attn.weight" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TgeomError, match=r"NaN or inf in layers\.1\.W_Q"):
        load_model(str(folder))


def test_not_a_gguf_file_is_refused(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(TgeomError, match="not a GGUF file"):
        load_model(str(bogus))


def test_truncated_gguf_is_a_one_line_cli_error(tmp_path):
    real = offline_model_path("smollm2")
    truncated = tmp_path / "truncated.gguf"
    with real.open("rb") as handle:
        truncated.write_bytes(handle.read(2_000_000))
    result = run_cli("info", str(truncated))
    assert_one_line_error(result, "cannot read GGUF file", "re-download")
    assert not cached_folder(truncated).exists()  # nothing half-written in the cache


def test_cli_info_missing_model_exit_code_2():
    assert_one_line_error(run_cli("info", "./missing-model-folder"), "does not exist")


@pytest.mark.parametrize(
    "family",
    [
        "gpt2",
        "bert",
        "roberta",
        "distilbert",
        "llama",
        "qwen2",
        "neox",
        "opt",
        "opt_post_ln",
        "gptj",
        "phi",
        "gpt_neo",
    ],
)
def test_summary_of_tiny_models_matches_their_config(tiny_model, family):
    lm = tiny_model(family)
    s = lm.summary
    assert (s.n_layers, s.d_model, s.vocab_size, s.d_mlp) == (2, 32, 96, 48)
    assert s.n_heads == 4 and s.d_head == 8
    cw = lm.weights()
    assert cw.layers[0].W_K.shape == (4, 32, 8)  # KV heads expanded to query heads
    expected_kv = {"llama": 2, "qwen2": 1, "phi": 2}.get(family, 4)
    assert s.n_kv_heads == expected_kv


@pytest.mark.parametrize("family", FAMILIES)
def test_summary_mechanism_flags_match_the_canonical_weights(tiny_model, family):
    """What ``tgeom info`` says about positions is what the canonical weights carry."""
    lm = tiny_model(family)
    s, cw = lm.summary, lm.weights()
    assert (s.position_scheme == "rotary") == (cw.rotary is not None)
    assert (s.position_scheme == "learned") == (cw.W_pos is not None)
    assert (s.position_scheme == "alibi") == (cw.alibi_slopes is not None)
    assert s.rotary_dim == (cw.rotary.rotary_dim if cw.rotary is not None else 0)
    assert s.rotary_interleaved == (cw.rotary is not None and cw.rotary.interleaved)
    assert s.positions_skip_padding == (s.model_type in ("roberta", "xlm-roberta", "opt"))
    assert s.parallel_residual == (family in ("neox", "gptj", "phi"))


@pytest.mark.parametrize(
    ("family", "d_head", "placement", "qk_norm"),
    [("qwen3", 16, "pre", "head"), ("olmo2", 8, "post_sublayer", "all")],
)
def test_summary_of_qk_norm_models(tiny_model, family, d_head, placement, qk_norm):
    """Qwen3's head_dim (16) differs from hidden / heads (8); OLMo 2 normalises sublayer outputs."""
    lm = tiny_model(family)
    s = lm.summary
    assert (s.n_heads, s.n_kv_heads, s.d_head, s.d_model) == (4, 2, d_head, 32)
    assert (s.norm_placement, s.qk_norm) == (placement, qk_norm)
    lw = lm.weights().layers[0]
    assert lw.W_Q.shape == lw.W_K.shape == (4, 32, d_head)
    assert lw.q_norm.weight.shape == lw.k_norm.weight.shape == (4, d_head)


def test_qwen3_windows_follow_its_layer_types(tiny_model):
    """Qwen3 windows the layers its config marks sliding_attention, as Qwen2 does, and the window
    acts together with QK-norm: the reference forward without it misses the last hidden state."""
    lm = tiny_model("qwen3")
    assert lm.hf.config.layer_types == ["full_attention", "sliding_attention"]
    assert lm.summary.attention_windows == (0, 4)
    ids = torch.randint(4, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    hidden = capture(lm, ids).hidden
    cw = lm.weights()
    assert float((reference_forward(cw, ids)[2] - hidden[2]).abs().max()) < 1e-4
    no_window = dataclasses.replace(cw.summary, attention_windows=())
    off = reference_forward(dataclasses.replace(cw, summary=no_window), ids)[2]
    assert float((off - hidden[2]).abs().max()) > 1e-2


def test_cli_info_json(tiny_model_dir):
    result = run_cli("info", str(tiny_model_dir("llama")), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["family"] == "llama" and info["n_kv_heads"] == 2 and info["norm"] == "rmsnorm"


@pytest.mark.slow
def test_real_model_summaries_match_spec(minilm, smollm2):
    m, s = minilm.summary, smollm2.summary
    assert (m.family, m.n_layers, m.n_heads, m.d_model, m.d_head, m.vocab_size) == (
        "bert",
        6,
        12,
        384,
        32,
        30522,
    )
    assert m.position_scheme == "learned" and not m.has_lm_head
    assert (s.family, s.n_layers, s.n_heads, s.n_kv_heads, s.d_model, s.d_head) == (
        "llama",
        30,
        9,
        3,
        576,
        64,
    )
    assert s.vocab_size == 49152 and s.tied_embeddings and s.position_scheme == "rotary"


@pytest.mark.slow
def test_smollm2_loads_again_from_its_cached_folder(smollm2):
    """The first load converted the GGUF; a later one reads the cached safetensors and rewrites
    nothing (how long each takes: bench/bench_load.py; the cache read itself, with the GGUF
    blanked: tests/models/test_gguf.py)."""
    folder = cached_folder(offline_model_path("smollm2"))
    files = sorted(p for p in folder.iterdir() if p.is_file())
    assert folder / "model.safetensors" in files
    written = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files}
    again = load_model("smollm2", device="cpu")
    assert {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files} == written
    assert torch.equal(again.weights().W_E, smollm2.weights().W_E)


def test_local_sources_make_no_network_call(tiny_model_dir, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    lm = load_model(str(tiny_model_dir("gpt2")), device="cpu")
    assert lm.summary.family == "gpt2"
    assert Path(lm.source).is_absolute()


def test_finite_check_is_exact_when_a_weight_sum_overflows(tiny_model):
    """The load-time check sums each tensor first; a sum that overflows on finite entries must
    not be taken for NaN weights, and one NaN among them is still named."""
    import dataclasses

    cw = tiny_model("gpt2").weights()
    layer = cw.layers[0]
    huge = torch.full_like(layer.W_Q, torch.finfo(layer.W_Q.dtype).max)
    assert not torch.isfinite(huge.sum())
    patched = dataclasses.replace(cw, layers=[dataclasses.replace(layer, W_Q=huge), *cw.layers[1:]])
    patched.check_finite()  # every entry finite: no error
    huge[0, 0, 1] = float("nan")
    with pytest.raises(TgeomError, match=r"NaN or inf in layers\.0\.W_Q"):
        patched.check_finite()
