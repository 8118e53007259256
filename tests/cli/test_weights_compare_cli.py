"""CLI smoke tests: ``tgeom weights validate|align|finetune|stitch|diff``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tgeom.analyses.embedding.classifier import save_classifier
from tgeom.analyses.embedding.finetune import finetune_classifier
from tgeom.cli import app
from tgeom.errors import TgeomError
from tgeom.models import load_model
from tiny_models import save_tiny_model

runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny tensors: one thread avoids OpenMP overhead on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def invoke(*args: str) -> dict:  # type: ignore[type-arg]
    result = runner.invoke(app, ["weights", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    out = Path(args[args.index("--out") + 1])
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def classifier_dir(tiny_model_dir, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    lm = load_model(str(tiny_model_dir("gpt2")), device="cpu")
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 2
    ids = torch.where(
        labels[:, None] == 0,
        torch.randint(4, 50, (40, 10), generator=gen),
        torch.randint(50, 96, (40, 10), generator=gen),
    )
    clf, _ = finetune_classifier(lm, ids, labels, ["low", "high"], steps=5, lr=1e-3, head_lr=3e-2)
    return save_classifier(clf, lm.weights(), tmp_path_factory.mktemp("clf") / "clf")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """A folder corpus: sub-folder = topic."""
    root = tmp_path_factory.mktemp("corpus")
    texts = {"low": "abcdefghijklm " * 30, "high": "NOPQRSTUVWXYZ! " * 30}
    for topic, text in texts.items():
        (root / topic).mkdir()
        for i in range(3):
            (root / topic / f"doc{i}.txt").write_text(text[i:] + "\n", encoding="utf-8")
    return root


def test_align_writes_similarity_matrices_and_a_heatmap(tiny_model_dir, tmp_out) -> None:  # type: ignore[no-untyped-def]
    a, b = str(tiny_model_dir("gpt2")), str(tiny_model_dir("llama"))
    doc = invoke("align", a, b, "--out", str(tmp_out), "--per-block", "16")
    assert doc["command"] == "weights align"
    sim = doc["alignment"]["similarity"]
    assert set(sim) == {"ffn_key", "ffn_value", "W_Q", "W_K", "W_V", "W_O", "mean"}
    assert len(sim["mean"]) == 2 and len(sim["mean"][0]) == 2
    assert len(doc["alignment"]["block_matching"]["mean"]) == 2
    assert (tmp_out / "alignment.png").stat().st_size > 0


def test_stitch_reports_accuracy_per_split_hidden_state_against_chance(
    tiny_model_dir, classifier_dir, tmp_out
) -> None:  # type: ignore[no-untyped-def]
    doc = invoke("stitch", str(tiny_model_dir("llama")), str(classifier_dir), "--out", str(tmp_out))
    stitching = doc["stitching"]
    (run,) = stitching["runs"]
    assert run["hidden"] == [0, 1, 2] and len(run["accuracy"]) == 3
    assert 0.0 < stitching["chance"] < 1.0
    assert (tmp_out / "stitching.png").stat().st_size > 0


def test_diff_of_a_classifier_lists_head_rows(tiny_model_dir, classifier_dir, tmp_out) -> None:  # type: ignore[no-untyped-def]
    doc = invoke(
        "diff", str(tiny_model_dir("gpt2")), str(classifier_dir), "--out", str(tmp_out), "--k", "3"
    )
    rows = doc["diff"]["rows"]
    assert [r["label"] for r in rows if r["group"] == "head"] == ["low", "high"]
    assert any(r["group"] == "ffn_value" and r["norm"] > 0 for r in rows)
    assert all(len(r["top_tokens"]) == 3 and len(r["bottom_tokens"]) == 3 for r in rows)
    assert all(r["bottom_scores"][0] < r["top_scores"][0] for r in rows)
    assert "-delta" in doc["diff"]["options"]["tokens"]
    assert (tmp_out / "diff_norms.png").stat().st_size > 0
    again = ["diff", str(tiny_model_dir("gpt2")), str(classifier_dir), "--out", str(tmp_out / "b")]
    printed = runner.invoke(app, ["weights", *again, "--k", "3"]).output
    assert "+delta (top):" in printed and "-delta (bottom):" in printed
    assert len(rows) > 10  # rows left out of the summary are counted and located
    assert f"{len(rows) - 10} more rows in {tmp_out / 'b' / 'results.json'}" in printed.splitlines()


def test_finetune_then_stitch_with_itself_from_a_corpus(
    tiny_model_dir, corpus_dir, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    model = str(tiny_model_dir("gpt2"))
    clf_dir = tmp_path / "clf"
    doc = invoke(
        "finetune",
        model,
        "--corpus",
        str(corpus_dir),
        "--out",
        str(clf_dir),
        "--seq-len",
        "8",
        "--steps",
        "4",
        "--max-windows-per-topic",
        "10",
    )
    assert sorted(doc["topics"]) == ["high", "low"]
    assert doc["training"]["n_eval"] >= 1
    stitched = invoke(
        "stitch",
        model,
        str(clf_dir),
        "--corpus",
        str(corpus_dir),
        "--out",
        str(tmp_path / "st"),
        "--hidden",
        "0,2",
        "--max-windows-per-topic",
        "5",
    )
    assert stitched["stitching"]["runs"][0]["hidden"] == [0, 2]


def validate_args(model: str, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "validate",
        model,
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--k",
        "5",
        "--sim-k",
        "5",
        "--n-neurons",
        "3",
        "--seq-len",
        "8",
        "--max-windows-per-topic",
        "2",
        *extra,
    ]


def test_validate_writes_r_k_and_sim_k_with_their_definitions(
    tiny_model_dir, corpus_dir, tmp_out
) -> None:  # type: ignore[no-untyped-def]
    doc = invoke(
        *validate_args(str(tiny_model_dir("gpt2")), corpus_dir, tmp_out, "--max-pairs", "0")
    )
    rk, sk = doc["r_k"], doc["sim_k"]
    assert sk["options"]["max_pairs"] is None and sk["n_pairs"]["ffn_key_value"] == 48  # all
    assert rk["definition"] == "paper" and sk["definition"] == "paper"
    assert set(rk["overlap"]) == {"ffn_key", "ffn_value", "W_V", "W_O"}
    assert all(len(v) == 2 and all(0 <= x <= 1 for x in v) for v in rk["shuffled"].values())
    assert rk["n_positions"] == 32  # 4 windows of 8 tokens, fewer than --max-positions 1000
    assert "/ k" in rk["options"]["formula"] and "|x @ E.T|" in sk["options"]["formula"]
    assert set(sk["similarity"]) == {"ffn_key_value", "W_V_W_O", "W_Q_W_K"}
    assert (tmp_out / "validation.png").stat().st_size > 0


def test_validate_tgeom_definitions_are_named_options(tiny_model_dir, corpus_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    extra = ("--r-k-definition", "tgeom", "--sim-k-definition", "tgeom", "--rank-by", "activation")
    doc = invoke(*validate_args(str(tiny_model_dir("gpt2")), corpus_dir, tmp_path / "o", *extra))
    assert doc["r_k"]["definition"] == "tgeom" and list(doc["r_k"]["overlap"]) == ["ffn_value"]
    assert doc["r_k"]["options"]["rank_by"] == "activation"
    assert doc["sim_k"]["definition"] == "tgeom"
    bad = validate_args(str(tiny_model_dir("gpt2")), corpus_dir, tmp_path / "x", "--rank-by", "a")
    result = runner.invoke(app, ["weights", *bad])
    assert isinstance(result.exception, TgeomError)
    assert "tgeom definition of R_k only" in str(result.exception)
    assert not (tmp_path / "x").exists()


def test_align_with_different_vocabularies_exits_2_with_one_line(tiny_model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    other = save_tiny_model("gpt2", tmp_path / "hostile", hostile=True)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tgeom",
            "weights",
            "align",
            str(tiny_model_dir("gpt2")),
            str(other),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("tgeom: error:")]
    assert len(lines) == 1 and "share a vocabulary" in lines[0] and "token 94" in lines[0]
    assert "Traceback" not in proc.stderr
