"""CLI: tgeom heads (SPEC section 7): heads.csv and results.json, the same numbers as the
separate commands, the one-topic warning, bad input in one line."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tgeom.analyses.heads.atlas import columns_of


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tgeom", *args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("heads-cli-corpus")
    for topic in ("a", "b"):
        (root / topic).mkdir()
        (root / topic / "t.txt").write_text(f"{topic}: some words, then more words. " * 40)
    return root


def heads_args(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        *("heads", str(model), "--corpus", str(corpus), "--out", str(out)),
        *("--seq-len", "20", "--max-windows-per-topic", "3", "--frequent", "0", "--quiet"),
        *extra,
    ]


@pytest.fixture(scope="module")
def written(tiny_model_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("heads-cli") / "out"
    done = run(*heads_args(tiny_model_dir("gpt2"), corpus, out))
    assert done.returncode == 0, done.stderr
    return out, done


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_heads_csv_and_results_json(written):
    out, done = written
    rows = read_csv(out / "heads.csv")
    with (out / "heads.csv").open(encoding="utf-8") as handle:
        assert next(csv.reader(handle)) == list(columns_of(False))
    assert [(r["layer"], r["head"]) for r in rows] == [
        (str(b), str(h)) for b in range(2) for h in range(4)
    ]
    results = json.loads((out / "results.json").read_text())
    assert results["command"] == "heads" and results["csv"] == "heads.csv"
    assert results["columns"] == list(columns_of(False))
    for row, stored in zip(rows, results["rows"], strict=True):
        assert float(row["null_dim"]) == stored["null_dim"]
        assert float(row["pearson_raw_effective"]) == stored["pearson_raw_effective"]
        assert row["top_ov"] == stored["top_ov"]
    assert [e["layer"] for e in results["layer_atlas"]] == [0, 1]
    assert {t["topic"] for t in results["layer_atlas"][0]["topics"]} == {"a", "b"}
    assert results["corpus_pass"]["n_windows"] == 6
    assert "top heads per score" in done.stdout


def test_top_pairs_equal_weights_topk(written, tiny_model_dir, tmp_path):
    out, _ = written
    rows = read_csv(out / "heads.csv")
    for circuit in ("qk", "ov"):
        done = run(
            *("weights", "topk", str(tiny_model_dir("gpt2")), "--block", "1", "--head", "2"),
            *("--circuit", circuit, "--k", "5", "--out", str(tmp_path / circuit)),
        )
        assert done.returncode == 0, done.stderr
        pairs = json.loads((tmp_path / circuit / "results.json").read_text())["pairs"]
        want = "; ".join(f"{p['row_token']!r}→{p['col_token']!r}" for p in pairs)
        assert rows[1 * 4 + 2][f"top_{circuit}"] == want


def test_one_topic_warns_and_writes_the_table(tiny_model_dir, tmp_path):
    (tmp_path / "one.txt").write_text("only one topic here, words and words. " * 40)
    out = tmp_path / "out"
    done = run(*heads_args(tiny_model_dir("gpt2"), tmp_path / "one.txt", out))
    assert done.returncode == 0, done.stderr
    assert "tgeom: warning: the corpus has 1 topic" in done.stderr
    assert len(read_csv(out / "heads.csv")) == 8
    results = json.loads((out / "results.json").read_text())
    assert any("has 1 topic" in w for w in results["warnings"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--induction-length", "1"), "--induction-length must be at least 2"),
        (("--induction-length", "40"), "beyond the context"),
        (("--max-windows-per-topic", "1", "--seq-len", "60"), "needs at least 2"),
        (("--blocks", "5"), "block"),
        (("--blocks", "x"), "--blocks must be comma-separated"),
    ],
)
def test_bad_input_exits_2_in_one_line(tiny_model_dir, tmp_path, extra, message):
    (tmp_path / "one.txt").write_text("short text, few windows. " * 5)
    out = tmp_path / "out"
    done = run(*heads_args(tiny_model_dir("gpt2"), tmp_path / "one.txt", out), *extra)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tgeom: error:") and message in lines[0]
    assert not out.exists()
