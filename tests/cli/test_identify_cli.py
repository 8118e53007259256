"""CLI: tgeom attention effective|nullspace, tgeom identify tokens|attribution."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tgeom", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ident-corpus")
    for topic in ("a", "b"):
        (root / topic).mkdir()
        (root / topic / "t.txt").write_text(f"{topic}: some words, then more words. " * 60)
    return root


def test_effective_writes_heads_with_matrices(tiny_model_dir, tmp_path):
    done = run(
        "attention",
        "effective",
        str(tiny_model_dir("bert")),
        "--text",
        "a sentence long enough to exceed eight",
        "--out",
        str(tmp_path / "o"),
    )
    assert done.returncode == 0, done.stderr
    heads = json.loads((tmp_path / "o" / "results.json").read_text())["heads"]
    assert len(heads) == 2 * 4
    for h in heads:
        assert set(h) >= {"block", "head", "raw", "effective", "null_dim"}
        n = len(h["raw"])
        assert n == len(h["raw"][0]) == len(h["effective"]) and h["null_dim"] == n - 8


def test_tokens_writes_hidden_states(tiny_model_dir, corpus, tmp_path):
    done = run(
        "identify",
        "tokens",
        str(tiny_model_dir("llama")),
        "--corpus",
        str(corpus),
        "--seq-len",
        "16",
        "--max-windows-per-topic",
        "6",
        "--out",
        str(tmp_path / "o"),
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "o" / "results.json").read_text())["by_hidden"]
    assert {tuple(sorted(r)) for r in rows} == {("distance", "g", "hidden", "n_tokens", "rate")}
    assert len(rows) == 3 * 3 * 2  # hidden states 0..2 x g x distance


def test_nullspace_and_attribution_write_results(tiny_model_dir, corpus, tmp_path):
    done = run(
        "attention",
        "nullspace",
        str(tiny_model_dir("gpt2")),
        "--corpus",
        str(corpus),
        "--seq-len",
        "16",
        "--max-windows-per-topic",
        "2",
        "--out",
        str(tmp_path / "n"),
    )
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "n" / "results.json").read_text())
    for head in data["null_space"]["heads"]:
        assert head["share_generic"] == 1.0  # random tiny heads are generic
    assert (tmp_path / "n" / "pearson_vs_length.png").exists()
    done = run(
        "identify",
        "attribution",
        str(tiny_model_dir("bert")),
        "--text",
        "hello there",
        "--mode",
        "estimate",
        "--samples",
        "4",
        "--out",
        str(tmp_path / "a"),
    )
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "a" / "results.json").read_text())
    assert data["mode"] == "estimate" and data["samples"] == 4
    n = len(data["tokens"])
    assert len(data["contributions"]) == 3 and len(data["contributions"][1]) == n
    assert all(abs(sum(row) - 1) < 1e-6 for row in data["contributions"][2])
    assert (tmp_path / "a" / "attribution.png").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("attention", "effective", "{m}", "--text", "a", "--out", "{o}"), "fewer than 2 tokens"),
        (("identify", "attribution", "{m}", "--text", "x" * 80, "--out", "{o}"), "model context"),
        (
            (
                "identify",
                "tokens",
                "{m}",
                "--corpus",
                "{c}",
                "--seq-len",
                "16",
                "--max-windows-per-topic",
                "2",
                "--out",
                "{o}",
            ),
            "at least 7 sequences",
        ),
    ],
)
def test_bad_inputs_exit_2_with_one_line(tiny_model_dir, corpus, tmp_path, args, needle):
    values = {"m": str(tiny_model_dir("gpt2")), "o": str(tmp_path / "o"), "c": str(corpus)}
    done = run(*(a.format(**values) for a in args))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]
    assert not (tmp_path / "o" / "results.json").exists()
