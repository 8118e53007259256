"""CLI: ``tgeom weights project|topk|atlas|lens`` write results.json and figures; bad input -> 2."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tgeom.cli import app
from tgeom.models import load_model

runner = CliRunner()


def invoke(*args: str) -> dict:  # type: ignore[type-arg]
    result = runner.invoke(app, ["weights", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    out = Path(args[args.index("--out") + 1])
    return json.loads((out / "results.json").read_text())


def run_tgeom(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "tgeom", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_topk_writes_pairs_with_the_required_keys(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("llama"))
    out = tmp_path / "topk"
    proc = run_tgeom(
        "weights", "topk", model, "--block", "1", "--head", "2", "--circuit", "qk",
        "--k", "7", "--ascii-only", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    payload = json.loads((out / "results.json").read_text())
    assert payload["command"] == "weights topk" and payload["model"].endswith(Path(model).name)
    assert payload["circuit"] == "qk" and payload["block"] == 1 and payload["head"] == 2
    assert payload["filters"] == {
        "drop_special": True,
        "ascii_only": True,
        "ascii_test": "decoded text",
        "alpha_only": False,
    }
    assert "rotary" in payload["rope_note"]
    pairs = payload["pairs"]
    assert len(pairs) == 7
    assert all(set(p) == {"row", "col", "row_token", "col_token", "value"} for p in pairs)
    values = [p["value"] for p in pairs]
    assert values == sorted(values, reverse=True)
    assert (out / "top_pairs.png").stat().st_size > 0


def test_topk_tl_embedding_is_recorded(tiny_model_dir, tmp_path):
    payload = invoke(
        "topk", str(tiny_model_dir("llama")), "--block", "0", "--head", "1", "--circuit", "ov",
        "--embedding", "tl", "--k", "3", "--out", str(tmp_path / "tl"),
    )  # fmt: skip
    assert payload["embedding_convention"] == "tl"
    assert (payload["row_embedding"], payload["col_embedding"]) == ("W_E", "W_U")
    result = runner.invoke(
        app,
        ["weights", "topk", str(tiny_model_dir("llama")), "--block", "0", "--head", "1",
         "--embedding", "both", "--out", str(tmp_path / "bad")],
    )  # fmt: skip
    assert "--embedding must be out (W_U), in (W_E) or tl" in str(result.exception)


@pytest.mark.slow
def test_minilm_topk_records_the_input_embedding_it_reads(tmp_path):
    # MiniLM has no output head: its pairs are read through W_E, and results must say so.
    for embedding in ("out", "tl"):
        payload = invoke(
            "topk", "minilm", "--block", "2", "--head", "0", "--circuit", "ov", "--k", "3",
            "--embedding", embedding, "--out", str(tmp_path / embedding),
        )  # fmt: skip
        assert payload["embedding"] == payload["row_embedding"] == "W_E"
        assert payload["col_embedding"] == "W_E"
    neuron = invoke(
        "project", "minilm", "--neuron", "0:0", "--k", "3", "--out", str(tmp_path / "p"),
    )  # fmt: skip
    assert neuron["embedding"] == "W_E"


def test_topk_block_out_of_range_exits_2_with_one_line(tiny_model_dir, tmp_path):
    proc = run_tgeom(
        "weights", "topk", str(tiny_model_dir("gpt2")), "--block", "9", "--head", "0",
        "--out", str(tmp_path / "bad"),
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "tgeom: error: block 9 is out of range: valid blocks are 0..1."
    ]


def test_topk_negative_lists_most_negative_first(tiny_model_dir, tmp_path):
    payload = invoke(
        "topk", str(tiny_model_dir("gpt2")), "--block", "0", "--head", "1", "--circuit", "ov",
        "--k", "5", "--negative", "--out", str(tmp_path / "neg"),
    )  # fmt: skip
    values = [p["value"] for p in payload["pairs"]]
    assert payload["largest"] is False and values == sorted(values) and values[0] < 0


def test_project_neuron_and_subhead(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("gpt2"))
    neuron = invoke(
        "project", model, "--neuron", "1:3", "--side", "value", "--k", "4",
        "--out", str(tmp_path / "n"),
    )  # fmt: skip
    assert neuron["parameter"] == {"kind": "neuron", "block": 1, "neuron": 3, "side": "value"}
    assert len(neuron["top"]) == 4 and neuron["embedding"] == "W_U"
    assert neuron["top"][0]["score"] >= neuron["top"][-1]["score"]
    sub = invoke(
        "project", model, "--head", "0:2", "--subhead", "q", "--index", "1", "--fold-norm",
        "--embedding", "in", "--k", "3", "--out", str(tmp_path / "s"),
    )  # fmt: skip
    assert sub["fold_norm"] is True and sub["embedding"] == "W_E"
    assert sub["parameter"]["subhead"] == "q"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--k", "3"], "exactly one of --neuron"),
        (["--neuron", "x", "--k", "3"], "BLOCK:INDEX"),
        (["--neuron", "0:999", "--k", "3"], "valid neurons are"),
        (["--neuron", "0:1", "--k", "0"], "k must be a positive"),
        (["--neuron", "0:1", "--alpha-only", "--ascii-only", "--k", "2"], None),
    ],
)
def test_project_bad_input_is_one_line(tiny_model_dir, tmp_path, args, message):
    result = runner.invoke(
        app, ["weights", "project", str(tiny_model_dir("gpt2")), *args, "--out", str(tmp_path)]
    )
    if message is None:
        assert result.exit_code == 0
    else:
        assert message in str(result.exception)


def test_atlas_writes_csv_and_results(tiny_model_dir, tmp_path):
    out = tmp_path / "atlas"
    payload = invoke("atlas", str(tiny_model_dir("gpt2")), "--k", "2", "--quiet", "--out", str(out))
    with (out / "atlas.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == payload["n_rows"] == 2 * 4 * 2 * 2
    assert set(rows[0]) == set(payload["columns"])
    assert {r["circuit"] for r in rows} == {"qk", "ov"}


def test_atlas_selects_blocks_heads_and_circuit(tiny_model_dir, tmp_path):
    out = tmp_path / "atlas"
    payload = invoke(
        "atlas", str(tiny_model_dir("gpt2")), "--k", "2", "--blocks", "1", "--heads", "0,2",
        "--circuit", "ov", "--quiet", "--out", str(out),
    )  # fmt: skip
    with (out / "atlas.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert (payload["blocks"], payload["heads"], payload["circuits"]) == ([1], [0, 2], ["ov"])
    assert {(r["block"], r["head"], r["circuit"]) for r in rows} == {
        ("1", "0", "ov"),
        ("1", "2", "ov"),
    }
    assert len(rows) == payload["n_rows"] == 2 * 2
    for option, value, message in (
        ("--circuit", "xy", "--circuit must be qk, ov or qk,ov"),
        ("--heads", "1;2", "--heads must be comma-separated integers"),
        ("--head", "7", "head 7 is out of range: valid heads are 0..3"),
    ):
        proc = run_tgeom(
            "weights", "atlas", str(tiny_model_dir("gpt2")), option, value, "--quiet",
            "--out", str(tmp_path / "bad"),
        )  # fmt: skip
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1
        assert lines[0].startswith(f"tgeom: error: {message}")


def frequent_run(command: str, *args: str) -> tuple[dict, str]:  # type: ignore[type-arg]
    result = runner.invoke(app, ["weights", command, *args])
    assert result.exit_code == 0, (result.output, result.exception)
    out = Path(args[args.index("--out") + 1])
    return json.loads((out / "results.json").read_text()), result.output


def test_frequent_restricts_every_reported_token_of_every_top_k_command(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("llama"))
    lm = load_model(model, device="cpu")
    corpus = tmp_path / "corpus.jsonl"
    texts = ["the cat sat on the mat", "a dog ate the hat", "hello there, world"] * 7
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    counts = Counter(ch for t in texts for ch in t)
    ranked = sorted(counts, key=lambda ch: (-counts[ch], lm.tokenizer.convert_tokens_to_ids(ch)))
    allowed = {lm.tokenizer.convert_tokens_to_ids(ch) for ch in ranked[:9]}  # no special among them
    freq = ["--frequent", "9", "--frequent-corpus", str(corpus)]
    description = f"9 most frequent tokens of corpus {str(corpus)!r} (of 96), special tokens"

    topk, printed = frequent_run(
        "topk", model, "--block", "1", "--head", "2", "--circuit", "ov", "--k", "30", *freq,
        "--out", str(tmp_path / "topk"),
    )  # fmt: skip
    got = [(p["row"], p["col"]) for p in topk["pairs"]]
    cw = lm.weights()
    E = cw.W_U.double()
    OV = E @ cw.layers[1].W_V[2].double() @ cw.layers[1].W_O[2].double() @ E.T
    dense = sorted(
        ((-float(OV[i, j]), i, j) for i in sorted(allowed) for j in sorted(allowed)),
    )
    assert got == [(i, j) for _, i, j in dense[:30]]
    assert topk["vocabulary"]["description"].startswith(description)
    assert topk["vocabulary"]["n_tokens"] == 9 and "vocabulary: 9 most frequent" in printed

    atlas, printed = frequent_run(
        "atlas", model, "--k", "3", "--quiet", *freq, "--out", str(tmp_path / "atlas")
    )
    assert {r["row"] for r in atlas["rows"]} | {r["col"] for r in atlas["rows"]} <= allowed
    assert atlas["vocabulary"]["frequent"] == 9 and "vocabulary: 9 most frequent" in printed

    project, _ = frequent_run(
        "project", model, "--neuron", "0:3", "--k", "20", *freq, "--out", str(tmp_path / "p")
    )
    assert {r["token_id"] for r in project["top"] + project["bottom"]} == allowed

    lens, printed = frequent_run(
        "lens", model, "--text", "the cat", "--k", "3", *freq, "--out", str(tmp_path / "lens")
    )
    ids = {i for row in lens["by_hidden"] for pos in row["positions"] for i in pos["top_ids"]}
    assert ids <= allowed and lens["vocabulary"]["drop_special"] is False
    assert "vocabulary: 9 most frequent" in printed

    result = runner.invoke(
        app,
        ["weights", "topk", model, "--block", "0", "--head", "0", "--frequent-corpus",
         str(corpus), "--out", str(tmp_path / "bad")],
    )  # fmt: skip
    assert "--frequent-corpus needs --frequent N" in str(result.exception)


def test_lens_writes_hidden_states_and_heatmap(tiny_model_dir, tmp_path):
    out = tmp_path / "lens"
    payload = invoke("lens", str(tiny_model_dir("gpt2")), "--text", "a $b c", "--out", str(out))
    assert len(payload["by_hidden"]) == 3
    assert (payload["n_blocks"], payload["n_hidden"]) == (2, 3)
    assert payload["tokens"] == ["a", " ", "$", "b", " ", "c"]
    assert len(payload["by_hidden"][2]["positions"][0]["top_tokens"]) == 5
    assert (out / "logit_lens.png").stat().st_size > 0
