"""The two layer indices, named apart in every results.json and option (issue 21).

``hidden`` indexes hidden states 0..L (0 = the embedding output, h = the output of block h-1),
``block`` indexes transformer blocks 0..L-1 (block b reads hidden b and writes hidden b+1). Each
command runs once on a tiny 2-block model; its results.json must use the right name with the
right range, hold no key that says ``layer``, and its options must accept the new names, refuse
out-of-range values and refuse the old ``--layer`` with one line naming the replacement.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from json_keys import keys_saying_layer
from tgeom.cli import main
from tgeom.models import load_model

TEXT = "the boat left at dawn"


def run_main(argv: list[str]) -> int:
    old = sys.argv
    sys.argv = ["tgeom", *argv]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = old
    return int(exit_info.value.code or 0)


def _corpus(folder: Path) -> Path:
    texts = {"letters": "abcdefghij klmnop " * 12, "digits": "0123456789 " * 20}
    for topic, text in texts.items():
        (folder / topic).mkdir(parents=True)
        (folder / topic / "a.txt").write_text(text, encoding="utf-8")
        (folder / topic / "b.txt").write_text(text[::-1], encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each command run once on the tiny GPT-2 (L = 2 blocks): its results.json by name."""
    root = tmp_path_factory.mktemp("layer-indices")
    model = str(tiny_model_dir("gpt2"))
    n_blocks = load_model(model, device="cpu").summary.n_layers
    corpus = str(_corpus(root / "corpus"))
    geo = root / "geo"
    commands = {
        "geometry measure": [
            *("geometry", "run", model, corpus, "--seq-len", "16", "--out", str(geo)),
            *("--hidden", str(n_blocks)),  # the last hidden state is in range
        ],
        "geometry qk": ["geometry", "qk", model, str(geo), "--block", str(n_blocks - 1)],
        "weights topk": ["weights", "topk", model, "--block", "1", "--head", "0", "--k", "3"],
        "weights project": ["weights", "project", model, "--neuron", "1:3", "--k", "3"],
        "weights atlas": ["weights", "atlas", model, "--k", "2", "--blocks", "0,1", "--quiet"],
        "weights lens": ["weights", "lens", model, "--text", TEXT, "--k", "2"],
        "weights align": ["weights", "align", model, model, "--per-block", "8"],
        "weights validate": [
            *("weights", "validate", model, "--corpus", corpus, "--seq-len", "8"),
            *("--max-windows-per-topic", "2", "--k", "5", "--sim-k", "5", "--max-pairs", "8"),
        ],
        "weights finetune": [
            *("weights", "finetune", model, "--corpus", corpus, "--seq-len", "8"),
            *("--steps", "2", "--max-windows-per-topic", "10"),
        ],
        "weights stitch": ["weights", "stitch", model, str(root / "weights finetune")],
        "weights diff": ["weights", "diff", model, str(root / "weights finetune"), "--k", "3"],
        "attention effective": [
            *("attention", "effective", model, "--text", TEXT, "--block", str(n_blocks - 1)),
        ],
        "attention nullspace": [
            *("attention", "nullspace", model, "--corpus", corpus, "--seq-len", "16"),
            *("--max-windows-per-topic", "2"),
        ],
        "identify tokens": [
            *("identify", "tokens", model, "--corpus", corpus, "--seq-len", "12"),
            *("--max-windows-per-topic", "6"),
        ],
        "identify attribution": [
            *("identify", "attribution", model, "--text", TEXT, "--mode", "estimate"),
            *("--samples", "2", "--hidden", str(n_blocks)),
        ],
    }
    outs = {"geometry measure": geo, "geometry qk": geo / "qk"}
    for name, argv in commands.items():
        if name not in outs:
            outs[name] = root / name
            argv += ["--out", str(outs[name])]
    results = {}
    for name, argv in commands.items():
        assert run_main(argv) == 0, name
        results[name] = json.loads((outs[name] / "results.json").read_text())
    clf = outs["weights finetune"]
    return {"n_blocks": n_blocks, "model": model, "geo": geo, "clf": clf, "results": results}


def test_tiny_model_has_two_blocks(runs: dict[str, Any]) -> None:
    assert runs["n_blocks"] == 2  # so hidden runs 0..2 and block 0..1 below


def test_no_results_json_says_layer(runs: dict[str, Any]) -> None:
    for name, document in runs["results"].items():
        assert keys_saying_layer(document) == [], name


def test_geometry_rows_are_hidden_states(runs: dict[str, Any]) -> None:
    L = runs["n_blocks"]
    doc = runs["results"]["geometry measure"]
    assert (doc["n_blocks"], doc["n_hidden"]) == (L, L + 1)
    assert [row["hidden"] for row in doc["by_hidden"]] == list(range(L + 1))
    assert [row["hidden"] for row in doc["massive_channels"]] == list(range(L + 1))
    assert doc["gram_hidden"] == L
    assert (runs["geo"] / f"spiral_2d_hidden{L}.png").is_file()


def test_geometry_qk_is_by_block(runs: dict[str, Any]) -> None:
    L = runs["n_blocks"]
    doc = runs["results"]["geometry qk"]
    assert (doc["n_blocks"], doc["blocks"]) == (L, [L - 1])
    (entry,) = doc["by_block"]
    assert (entry["block"], entry["input_hidden"]) == (L - 1, L - 1)
    assert entry["heads"] and all(row["block"] == L - 1 for row in entry["heads"])


def test_weights_are_by_block(runs: dict[str, Any]) -> None:
    L, docs = runs["n_blocks"], runs["results"]
    assert (docs["weights topk"]["block"], docs["weights topk"]["head"]) == (1, 0)
    assert docs["weights project"]["parameter"]["block"] == 1
    atlas = docs["weights atlas"]
    assert atlas["blocks"] == [0, 1] and {row["block"] for row in atlas["rows"]} == {0, 1}
    pairs = docs["weights align"]["alignment"]["block_matching"]["mean"]
    assert sorted(a for a, _ in pairs) == sorted(b for _, b in pairs) == list(range(L))
    validate = docs["weights validate"]
    assert validate["r_k"]["overlap"] and all(
        len(v) == L for v in validate["r_k"]["overlap"].values()
    )
    assert all(len(v) == L for v in validate["sim_k"]["similarity"].values())
    blocks = {row["block"] for row in docs["weights diff"]["diff"]["rows"]}
    assert blocks - {None} and blocks <= {*range(L), None}


def test_lens_and_stitching_are_by_hidden_state(runs: dict[str, Any]) -> None:
    L, docs = runs["n_blocks"], runs["results"]
    lens = docs["weights lens"]
    assert (lens["n_blocks"], lens["n_hidden"]) == (L, L + 1)
    assert [row["hidden"] for row in lens["by_hidden"]] == list(range(L + 1))
    assert docs["weights stitch"]["stitching"]["runs"][0]["hidden"] == list(range(L + 1))


def test_attention_is_by_block(runs: dict[str, Any]) -> None:
    L, docs = runs["n_blocks"], runs["results"]
    effective = docs["attention effective"]
    assert effective["n_blocks"] == L
    assert {row["block"] for row in effective["heads"]} == set(range(L))
    assert [row["block"] for row in effective["pearson_by_block"]] == list(range(L))
    survey = docs["attention nullspace"]
    assert {row["block"] for row in survey["null_space"]["heads"]} == set(range(L))
    assert all(len(row["by_block"]) == L for row in survey["effective"]["pearson_by_length"])
    rows = survey["effective"]["token_type_attention"]["raw_signed"]
    assert {row["block"] for row in rows} == set(range(L))


def test_identifiability_and_attribution_are_by_hidden_state(runs: dict[str, Any]) -> None:
    L, docs = runs["n_blocks"], runs["results"]
    tokens = docs["identify tokens"]
    assert (tokens["n_blocks"], tokens["n_hidden"]) == (L, L + 1)
    assert {row["hidden"] for row in tokens["by_hidden"]} == set(range(L + 1))
    attribution = docs["identify attribution"]
    assert (attribution["n_blocks"], attribution["n_hidden"]) == (L, L + 1)
    assert [row["hidden"] for row in attribution["by_hidden"]] == list(range(L + 1))
    assert len(attribution["contributions"]) == L + 1


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["geometry", "measure", "{geo}", "--hidden", "3"], "hidden state 3 is out of range"),
        (["geometry", "measure", "{geo}", "--hidden", "-1"], "hidden state -1 is out of range"),
        (["geometry", "measure", "{geo}", "--layer", "1"], "--layer was renamed: pass --hidden"),
        (["geometry", "qk", "{model}", "{geo}", "--block", "2"], "block 2 is out of range"),
        (
            ["geometry", "qk", "{model}", "{geo}", "--layer", "1"],
            "--layer was renamed: pass --block",
        ),
        (["weights", "topk", "{model}", "--block", "2", "--head", "0"], "block 2 is out of range"),
        (["weights", "topk", "{model}", "--block", "-1", "--head", "0"], "block -1 is out"),
        (["weights", "topk", "{model}", "--layer", "1", "--head", "0"], "pass --block"),
        (["weights", "project", "{model}", "--neuron", "2:0"], "block 2 is out of range"),
        (["weights", "atlas", "{model}", "--blocks", "0,2"], "block 2 is out of range"),
        (["weights", "atlas", "{model}", "--layers", "0"], "--layers was renamed: pass --blocks"),
        (["weights", "align", "{model}", "{model}", "--per-layer", "8"], "pass --per-block"),
        (["weights", "stitch", "{model}", "{clf}", "--hidden", "3"], "split hidden state 3 is out"),
        (["weights", "stitch", "{model}", "{clf}", "--layers", "1"], "pass --hidden"),
        (["attention", "effective", "{model}", "--text", "a b c", "--block", "2"], "block 2 is"),
        (["attention", "effective", "{model}", "--text", "a b c", "--layer", "0"], "pass --block"),
        (["identify", "attribution", "{model}", "--text", "a b", "--hidden", "3"], "hidden state"),
    ],
)
def test_options_range_checked_and_old_name_refused(
    runs: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    needle: str,
) -> None:
    import shutil

    geo = tmp_path / "geo"  # a copy: a refused command must leave the original as it was
    shutil.copytree(runs["geo"], geo)
    before = (geo / "results.json").read_bytes()
    values = {"geo": str(geo), "model": runs["model"], "clf": str(runs["clf"])}
    out = tmp_path / "out"
    argv = [arg.format(**values) for arg in argv]
    if argv[:2] not in (["geometry", "qk"], ["geometry", "measure"]):
        argv += ["--out", str(out)]
    code = run_main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("tgeom: error: ")
    assert needle in err
    assert (geo / "results.json").read_bytes() == before
    assert not (out / "results.json").exists()


def test_info_counts_blocks(runs: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert run_main(["info", runs["model"], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_blocks"] == runs["n_blocks"] and keys_saying_layer(info) == []
