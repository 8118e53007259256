"""The same command with the same seed gives bit-identical results.json numbers on CPU: every
analysis family (weights, geometry with t-SNE, effective attention and null spaces, token
identifiability with its MLP, attribution by random tangents)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tgeom.cli import main

#  Fields that legitimately differ between two runs (where they were written).
VOLATILE = {"out", "output", "elapsed_s", "seconds", "wall_s"}


def run(argv: list[str]) -> None:
    old = sys.argv
    sys.argv = ["tgeom", *argv]
    try:
        main()
    except SystemExit as exc:
        assert not exc.code, exc.code
    finally:
        sys.argv = old


def stable(data: object) -> object:
    if isinstance(data, dict):
        return {k: stable(v) for k, v in data.items() if k not in VOLATILE}
    if isinstance(data, list):
        return [stable(v) for v in data]
    return data


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("det-corpus")
    for topic, text in {"a": "alpha beta gamma delta ", "b": "one two three four five "}.items():
        (root / topic).mkdir()
        for i in range(4):
            (root / topic / f"{i}.txt").write_text(text * (8 + i))
    return root


COMMANDS = {
    "weights topk": ["weights", "topk", "{model}", "--block", "1", "--head", "2", "--k", "15"],
    "weights atlas": ["weights", "atlas", "{model}", "--k", "4"],
    "weights align": ["weights", "align", "{model}", "{model}", "--per-block", "16", "--seed", "3"],
    "weights validate": [
        *("weights", "validate", "{model}", "--corpus", "{corpus}", "--k", "5", "--sim-k", "5"),
        *("--seq-len", "16"),
    ],
    "geometry run": [
        *("geometry", "run", "{model}", "{corpus}", "--seq-len", "12", "--seed", "5"),
        *("--ctx-map", "tsne"),
    ],
    "attention effective": [
        "attention",
        "effective",
        "{model}",
        "--text",
        "alpha beta gamma delta epsilon",
    ],
    "attention nullspace": [
        *("attention", "nullspace", "{model}", "--corpus", "{corpus}", "--seq-len", "12"),
    ],
    "identify tokens": [
        *("identify", "tokens", "{model}", "--corpus", "{corpus}", "--seq-len", "12"),
        *("--max-windows-per-topic", "8", "--seed", "2"),
    ],
    "identify attribution": [
        *("identify", "attribution", "{model}", "--text", "one two three four five six"),
        *("--mode", "estimate", "--samples", "8", "--seed", "4"),
    ],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_same_seed_same_numbers(tiny_model_dir, corpus, tmp_path, command, capsys):
    model = str(tiny_model_dir("llama"))
    outputs = []
    for attempt in ("first", "second"):
        out = tmp_path / attempt
        args = [a.format(model=model, corpus=corpus) for a in COMMANDS[command]]
        run([*args, "--out", str(out)])
        outputs.append(stable(json.loads((out / "results.json").read_text())))
    capsys.readouterr()
    assert outputs[0] == outputs[1]
