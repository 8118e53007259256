"""GGUF files: converted once into the cache, read from it after; an architecture tgeom cannot
analyse is refused from the header, before converting; a failed conversion leaves nothing."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from tgeom.errors import TgeomError
from tgeom.models import load_model
from tgeom.models.gguf import _MODEL_TYPES, cached_folder, gguf_architecture
from tiny_models import save_tiny_gguf


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``$TGEOM_CACHE`` of this test's own."""
    root = tmp_path / "cache"
    monkeypatch.setenv("TGEOM_CACHE", str(root))
    return root


def cached_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def write_header_only_gguf(path: Path, architecture: str, cut: bool = True) -> Path:
    """A GGUF of ``architecture`` with a model's metadata and one tensor, whose data is cut off
    (unless not ``cut``): only a reader that stops at the metadata gets through it."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(f"tiny-{architecture}")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_head_count(4)
    writer.add_tensor("token_embd.weight", np.ones((96, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if cut:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 96 * 32 * 4 + 100])
    return path


def test_tiny_gguf_converts_back_to_the_model_it_was_written_from(tmp_path, cache):
    path = save_tiny_gguf(tmp_path)
    assert gguf_architecture(path) == "llama"
    converted = load_model(str(path), device="cpu")
    original = load_model(str(tmp_path / "hf"), device="cpu")
    a, b = converted.weights(), original.weights()
    assert torch.equal(a.W_E, b.W_E) and torch.equal(a.W_U, b.W_U)
    for x, y in zip(a.layers, b.layers, strict=True):
        for name in ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_gate", "W_out"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
    ids = original.tokenizer("the grey sea", return_tensors="pt").input_ids
    assert converted.tokenizer("the grey sea").input_ids == ids[0].tolist()
    torch.testing.assert_close(converted.hf(ids).logits, original.hf(ids).logits)
    folder = cached_folder(path)
    assert folder.parent == cache / "gguf"
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask  # not tempfile's 0700
    for written in folder.iterdir():  # model.safetensors: not safetensors' 0600
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask, written.name


def test_second_load_reads_the_cache_not_the_gguf(tmp_path, cache):
    """Once converted, a load reads the cached folder: with the GGUF's bytes blanked (its size
    and time kept, so its cache key is the same) it still loads, to the same weights, and the
    cached files are not rewritten."""
    path = save_tiny_gguf(tmp_path)
    first = load_model(str(path), device="cpu")
    files = cached_files(cache)
    assert files and all(f.is_relative_to(cached_folder(path)) for f in files)
    written = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files}
    stat = path.stat()
    path.write_bytes(bytes(stat.st_size))  # no GGUF any more: converting it would fail
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = load_model(str(path), device="cpu")
    assert torch.equal(again.weights().W_E, first.weights().W_E)
    assert {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in cached_files(cache)} == written


def test_unsupported_architecture_is_refused_before_converting(tmp_path, cache):
    """Gemma 3's GGUF was converted whole (316 s, 1.1 GB left in the cache) before tgeom said
    it cannot analyse it. Now the header says so: this file's tensors are cut off, so only a
    refusal that reads no further than the metadata names the architecture (Mamba's: a state
    space model, no attention for tgeom to read)."""
    path = write_header_only_gguf(tmp_path / "mamba.gguf", "mamba")
    assert gguf_architecture(path) == "mamba"
    with pytest.raises(TgeomError, match=r"architecture 'mamba'.*\(it reads .*llama.*\)"):
        load_model(str(path))
    assert not cache.exists()


@pytest.mark.parametrize("architecture", [*_MODEL_TYPES, "llama", "phi3"])
def test_model_type_of_an_architecture_is_the_one_transformers_gives(tmp_path, architecture):
    """The check before converting names each GGUF architecture by the model type transformers
    converts it to (Gemma 3's GGUF becomes gemma3_text, the type an adapter would list)."""
    from transformers import AutoConfig

    path = write_header_only_gguf(tmp_path / "m.gguf", architecture, cut=False)
    config = AutoConfig.from_pretrained(tmp_path, gguf_file=path.name, local_files_only=True)
    assert config.model_type == _MODEL_TYPES.get(architecture, architecture)


def test_failed_conversion_leaves_nothing_in_the_cache(tmp_path, cache):
    path = write_header_only_gguf(tmp_path / "cut.gguf", "llama")  # supported, but cut short
    with pytest.raises(TgeomError, match=r"cannot read GGUF file .*re-download"):
        load_model(str(path))
    assert cached_files(cache) == []


@pytest.mark.parametrize("keep", [3, 12, 40])
def test_cut_header_is_a_one_line_error(tmp_path, keep):
    whole = save_tiny_gguf(tmp_path)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:keep])
    expected = "not a GGUF file" if keep < 4 else "cannot read the header of GGUF file"
    with pytest.raises(TgeomError, match=expected):
        gguf_architecture(cut)
