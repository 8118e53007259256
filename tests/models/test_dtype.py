"""``load_model(..., dtype=)``: the weights and forward passes in bfloat16 / float16; a precision
the device cannot compute in is refused in one line naming both; GGUF caches keyed by dtype."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tgeom.capture import capture
from tgeom.errors import TgeomError
from tgeom.models import load_model
from tgeom.models.gguf import cached_folder
from tgeom.runtime import DTYPES, check_dtype_runs, resolve_dtype
from tiny_models import FAMILIES, save_tiny_gguf

LOW = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", LOW)
def test_model_and_canonical_weights_come_in_the_dtype(tiny_model_dir, dtype):
    lm = load_model(str(tiny_model_dir("llama")), dtype=dtype, device="cpu")
    assert lm.dtype == dtype and lm.identity["dtype"] == str(dtype).removeprefix("torch.")
    assert {p.dtype for p in lm.hf.parameters()} == {dtype}
    floats = [t for _, t in lm.weights().named_tensors() if t.is_floating_point()]
    assert floats and {t.dtype for t in floats} == {dtype}
    by_name = load_model(str(tiny_model_dir("llama")), dtype=lm.identity["dtype"], device="cpu")
    assert by_name.dtype == dtype


def test_unknown_dtype_is_one_line():
    with pytest.raises(TgeomError, match=r"unknown dtype 'int8'; choose one of float32, bfloat16"):
        resolve_dtype("int8")
    assert resolve_dtype("float16") is torch.float16 and resolve_dtype(torch.bfloat16) is (
        torch.bfloat16
    )


def test_every_dtype_runs_on_this_cpu():
    for dtype in DTYPES.values():
        check_dtype_runs(dtype, torch.device("cpu"))


def test_a_dtype_the_device_cannot_compute_in_names_both():
    # complex32's matmul has no CPU kernel: the probe's failure path on a real missing kernel
    with pytest.warns(UserWarning), pytest.raises(TgeomError) as info:
        check_dtype_runs(torch.complex32, torch.device("cpu"))
    message = str(info.value)
    assert message.startswith("dtype complex32 does not run on device cpu (")
    assert "\n" not in message and "--dtype" in message


def test_gguf_cache_is_keyed_by_dtype_and_written_in_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TGEOM_CACHE", str(tmp_path / "cache"))
    path = save_tiny_gguf(tmp_path)
    f32, bf16 = cached_folder(path), cached_folder(path, torch.bfloat16)
    assert f32 != bf16 and bf16.name == f"{f32.name}-bfloat16"  # float32 keeps its old name
    low = load_model(str(path), dtype="bfloat16", device="cpu")
    assert bf16.is_dir() and not f32.exists()
    assert stored_dtypes(bf16) == {"BF16"}
    full = load_model(str(path), device="cpu")
    assert f32.is_dir() and stored_dtypes(f32) == {"F32"}
    a, b = low.weights(), full.weights()
    assert a.W_E.dtype == torch.bfloat16 and torch.equal(a.W_E, b.W_E.to(torch.bfloat16))


def stored_dtypes(folder: Path) -> set[str]:
    kinds = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            kinds |= {handle.get_slice(name).get_dtype() for name in handle.keys()}  # noqa: SIM118
    return kinds


IDS = torch.arange(4, 60).reshape(2, 28) % 90 + 4  # two windows of 28 real tokens


@pytest.fixture(scope="module")
def float32_hidden(tiny_model_dir):
    cache = {}

    def get(family):
        if family not in cache:
            lm = load_model(str(tiny_model_dir(family)), device="cpu")
            cache[family] = capture(lm, IDS).hidden.double()
        return cache[family]

    return get


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("family", FAMILIES)
def test_low_precision_forward_equals_float32_within_rounding(
    tiny_model_dir, float32_hidden, family, dtype
):
    """Every hidden state of the forward in ``dtype`` is the float32 forward's within
    ``16 u (l + 1) max|h|`` (``u`` the dtype's unit roundoff, ``max|h|`` the largest activation
    up to hidden state l): hidden[0] carries the rounding of the embedding weights (<= u |h|,
    2u with a scale or norm), and each block adds at most ~16 roundings of u relative to the
    largest activation (its rounded weights and its ~8 rounded intermediates: norm, q/k/v,
    scores, softmax, mix, output projection, MLP in and out). Measured on these models: at
    most 11.1 u (gemma3_text, hidden 2, bfloat16) against a budget of 48 u. The captures are
    handed on in float32."""
    lm = load_model(str(tiny_model_dir(family)), dtype=dtype, device="cpu")
    low = capture(lm, IDS).hidden
    assert low.dtype == torch.float32
    full = float32_hidden(family)
    u = torch.finfo(dtype).eps / 2
    scale = full.abs().amax(dim=(1, 2, 3)).cummax(0).values
    for layer in range(full.shape[0]):
        err = float((low[layer].double() - full[layer]).abs().max())
        assert err <= 16 * u * (layer + 1) * float(scale[layer]), (layer, err / (u * scale[layer]))
        assert err > 0  # the forward did run in the low precision


def test_a_forward_that_overflows_float16_is_one_line(tiny_model_dir, tmp_path):
    """GPT-2's token and position embeddings set to 40000 each (finite in float16, whose
    largest number is 65504): their sum, hidden state 0, overflows to inf and is refused."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "big"
    folder.mkdir()
    for item in tiny_model_dir("gpt2").iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    tensors = load_file(str(folder / "model.safetensors"))
    for name in tensors:
        if name.endswith(("wte.weight", "wpe.weight")):
            tensors[name] = torch.full_like(tensors[name], 4e4)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    lm = load_model(str(folder), dtype="float16", device="cpu")
    with pytest.raises(TgeomError) as info:
        capture(lm, IDS)
    assert str(info.value) == (
        "hidden state 0 holds inf or NaN: the forward overflowed in float16; pass --dtype "
        "bfloat16 or float32."
    )
    assert bool(torch.isfinite(capture(load_model(str(folder), device="cpu"), IDS).hidden).all())
