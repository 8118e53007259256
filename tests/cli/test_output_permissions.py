"""Outputs get the user's normal permissions (the umask), whether written in place (figures) or
atomically (results.json, statistics, the GGUF cache); an atomic write that fails leaves nothing.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tgeom.results import atomic_replace, atomic_write_text

UMASK = 0o027  # neither tempfile's private 0600 nor the common 0644


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def expected(path: Path) -> int:
    return (0o777 if path.is_dir() else 0o666) & ~UMASK


@pytest.fixture
def umask():
    old = os.umask(UMASK)
    try:
        yield UMASK
    finally:
        os.umask(old)


def test_atomic_writes_get_the_umask_modes(tmp_path, umask):
    text = tmp_path / "results.json"
    atomic_write_text(text, "{}\n")
    atomic_write_text(text, "{}\n")  # replacing an existing file too
    with atomic_replace(tmp_path / "converted", folder=True) as staging:
        (staging / "config.json").write_text("{}")
    for path in (text, tmp_path / "converted", tmp_path / "converted" / "config.json"):
        assert mode(path) == expected(path), path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "results.json"]


@pytest.mark.parametrize("folder", [False, True])
def test_failed_atomic_write_leaves_nothing(tmp_path, folder):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="midway"), atomic_replace(target, folder=folder) as tmp:
        (tmp / "part" if folder else tmp).write_text("half")
        raise RuntimeError("midway")
    assert list(tmp_path.iterdir()) == []


def test_cli_outputs_get_the_umask_modes(tiny_model_dir, tmp_path):
    """``geometry run`` writes results.json and the statistics atomically, figures and HTML in
    place: all of them, and the folder, get the modes the umask gives (results.json was 0600)."""
    corpus = tmp_path / "corpus"
    for topic, text in {"letters": "abcdefghij klmnop ", "digits": "0123456789 "}.items():
        (corpus / topic).mkdir(parents=True)
        for name in ("a", "b"):
            (corpus / topic / f"{name}.txt").write_text(text * 20, encoding="utf-8")
    out = tmp_path / "out"
    model = tiny_model_dir("gpt2")
    done = subprocess.run(
        [
            *(sys.executable, "-m", "tgeom", "geometry", "run", str(model), str(corpus)),
            *("--seq-len", "16", "--out", str(out), "--hidden", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        umask=UMASK,
    )
    assert done.returncode == 0, done.stderr
    written = [out, *out.rglob("*")]
    names = {p.name for p in written}
    assert {"results.json", "geometry_stats.safetensors", "variance_shares.png"} <= names
    assert {p.name: oct(mode(p)) for p in written} == {p.name: oct(expected(p)) for p in written}
