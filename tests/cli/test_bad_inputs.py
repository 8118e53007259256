"""Every CLI command against every bad input: one line, exit code 2, no traceback, no output left.

Runs ``tgeom.cli.main`` in-process (same code path as the console script, minus interpreter
start-up) so that the whole matrix stays fast; ``tests/models/test_load.py`` and the CLI tests
of each group also run a few cases as real subprocesses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tgeom.cli import main
from tgeom.models import offline_model_path
from tiny_models import save_tiny_model


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    old = sys.argv
    sys.argv = ["tgeom", *argv]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = old
    return int(exit_info.value.code or 0), capsys.readouterr().err


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bad models, corpora and output paths, built once."""
    root = tmp_path_factory.mktemp("bad")
    paths: dict[str, Path] = {}
    good = save_tiny_model("gpt2", root / "good")
    paths["good"] = good
    paths["no_config"] = root / "no-config"
    paths["no_config"].mkdir()
    (paths["no_config"] / "model.safetensors").write_bytes(b"")
    paths["not_gguf"] = root / "fake.gguf"
    paths["not_gguf"].write_bytes(b"\x00" * 64)
    paths["truncated_gguf"] = root / "truncated.gguf"
    with offline_model_path("smollm2").open("rb") as handle:
        paths["truncated_gguf"].write_bytes(handle.read(1_000_000))
    paths["unsupported"] = root / "t5"
    paths["unsupported"].mkdir()
    (paths["unsupported"] / "config.json").write_text(json.dumps({"model_type": "t5"}))
    save_file({"x": torch.zeros(1)}, str(paths["unsupported"] / "model.safetensors"))
    paths["pickled"] = root / "pickled"
    paths["pickled"].mkdir()
    (paths["pickled"] / "config.json").write_text((good / "config.json").read_text())
    torch.save({"w": torch.zeros(1)}, paths["pickled"] / "pytorch_model.bin")
    paths["nan"] = save_tiny_model("gpt2", root / "nan")
    tensors = load_file(str(paths["nan"] / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("h.0.mlp.c_fc.weight"))
    tensors[key][3, 3] = float("inf")
    save_file(tensors, str(paths["nan"] / "model.safetensors"), metadata={"format": "pt"})
    paths["other_vocab"] = save_tiny_model("llama", root / "other-vocab")
    tok = json.loads((paths["other_vocab"] / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    swapped = {("Q" if k == "q" else "q" if k == "Q" else k): v for k, v in vocab.items()}
    tok["model"]["vocab"] = swapped
    (paths["other_vocab"] / "tokenizer.json").write_text(json.dumps(tok))
    paths["empty_corpus"] = root / "empty-corpus"
    paths["empty_corpus"].mkdir()
    (paths["empty_corpus"] / "a.txt").write_text("   \n")
    paths["latin1"] = root / "latin1.txt"
    paths["latin1"].write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    paths["good_corpus"] = root / "good.txt"
    paths["good_corpus"].write_text("plain words for windows " * 40)
    paths["tiny_corpus"] = root / "tiny.txt"
    paths["tiny_corpus"].write_text("a few words")
    paths["no_text_jsonl"] = root / "bad.jsonl"
    paths["no_text_jsonl"].write_text('{"text": "fine line"}\n{"topic": "x"}\n')
    paths["a_file"] = root / "plain-file"
    paths["a_file"].write_text("not a folder")
    paths["foreign_out"] = root / "foreign-out"
    paths["foreign_out"].mkdir()
    (paths["foreign_out"] / "thesis.tex").write_text("precious")
    return paths


MODEL_CASES = {
    "missing": ("{root}/does-not-exist", "does not exist"),
    "no_config": ("{no_config}", "no config.json"),
    "not_gguf": ("{not_gguf}", "not a GGUF file"),
    "truncated_gguf": ("{truncated_gguf}", "cannot read GGUF file"),
    "unsupported": ("{unsupported}", "unsupported architecture 't5'"),
    "pickled": ("{pickled}", "pickle checkpoints"),
    "nan": ("{nan}", "NaN or inf in layers.0.W_in"),
}

MODEL_COMMANDS = {
    "info": ["info", "{model}"],
    "weights topk": ["weights", "topk", "{model}", "--layer", "0", "--head", "0", "--out", "{out}"],
    "weights atlas": ["weights", "atlas", "{model}", "--k", "2", "--out", "{out}"],
    "weights lens": ["weights", "lens", "{model}", "--text", "hello there", "--out", "{out}"],
    "corpus": ["corpus", "{good_corpus}", "--model", "{model}", "--seq-len", "8"],
    "geometry run": [
        "geometry",
        "run",
        "{model}",
        "{good_corpus}",
        "--seq-len",
        "8",
        "--out",
        "{out}",
    ],
    "attention effective": [
        "attention",
        "effective",
        "{model}",
        "--text",
        "hi there",
        "--out",
        "{out}",
    ],
    "identify tokens": [
        "identify",
        "tokens",
        "{model}",
        "--corpus",
        "{good_corpus}",
        "--out",
        "{out}",
    ],
    "identify attribution": [
        "identify",
        "attribution",
        "{model}",
        "--text",
        "hi",
        "--out",
        "{out}",
    ],
    "report": ["report", "{model}", "--corpus", "{good_corpus}", "--out", "{out}", "--quiet"],
}


def fill(args: list[str], values: dict[str, str]) -> list[str]:
    return [a.format(**values) for a in args]


def assert_clean_failure(code: int, err: str, needle: str, out: Path | None = None) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("tgeom: error: "), err
    assert needle in lines[0], lines[0]
    if out is not None:
        assert not out.exists() or not (out / "results.json").exists()
        assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


# `tgeom corpus` reads only the tokenizer (and checks the architecture): weights are not its
# concern, so a NaN checkpoint is not an error there.
MODEL_MATRIX = [
    (command, case)
    for command in MODEL_COMMANDS
    for case in MODEL_CASES
    if not (command == "corpus" and case == "nan")
]


@pytest.mark.parametrize(("command", "case"), MODEL_MATRIX)
def test_bad_model_fails_cleanly(bad, tmp_path, capsys, command, case):
    source, needle = MODEL_CASES[case]
    values = {k: str(v) for k, v in bad.items()} | {"root": str(tmp_path)}
    model = source.format(**values)
    out = tmp_path / "out"
    argv = fill(
        MODEL_COMMANDS[command],
        {"model": model, "out": str(out), "good_corpus": str(bad["good_corpus"])},
    )
    code, err = run_main(argv, capsys)
    assert_clean_failure(code, err, needle, out)


CORPUS_CASES = {
    "empty": ("{empty_corpus}", "empty"),
    "non-utf8": ("{latin1}", "UTF-8"),
    "too short": ("{tiny_corpus}", "longer than every document"),
    "jsonl without text": ("{no_text_jsonl}", "line 2"),
    "missing": ("{a_file}-missing", "does not exist"),
}


@pytest.mark.parametrize("case", list(CORPUS_CASES))
def test_bad_corpus_fails_cleanly(bad, capsys, case):
    source, needle = CORPUS_CASES[case]
    corpus = source.format(**{k: str(v) for k, v in bad.items()})
    code, err = run_main(["corpus", corpus, "--model", str(bad["good"]), "--seq-len", "16"], capsys)
    assert_clean_failure(code, err, needle)


def test_seq_len_beyond_model_context(bad, capsys):
    text = bad["a_file"].parent / "long.txt"
    text.write_text("long text " * 200)
    code, err = run_main(
        ["corpus", str(text), "--model", str(bad["good"]), "--seq-len", "999"], capsys
    )
    assert_clean_failure(code, err, "999")


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [("--layer", "7", "layer 7 is out of range"), ("--head", "9", "head 9 is out of range")],
)
def test_layer_or_head_out_of_range(bad, tmp_path, capsys, flag, value, needle):
    args = {"--layer": "0", "--head": "0", flag: value}
    argv = ["weights", "topk", str(bad["good"]), "--out", str(tmp_path / "o")]
    for name, v in args.items():
        argv += [name, v]
    code, err = run_main(argv, capsys)
    assert_clean_failure(code, err, needle, tmp_path / "o")


def test_mismatched_vocabularies(bad, tmp_path, capsys):
    argv = [
        "weights",
        "align",
        str(bad["good"]),
        str(bad["other_vocab"]),
        "--out",
        str(tmp_path / "o"),
    ]
    code, err = run_main(argv, capsys)
    assert_clean_failure(code, err, "vocabular", tmp_path / "o")


def test_unwritable_output(bad, capsys):
    out = bad["a_file"] / "sub"  # a folder inside a plain file cannot be created
    argv = ["weights", "topk", str(bad["good"]), "--layer", "0", "--head", "0", "--out", str(out)]
    code, err = run_main(argv, capsys)
    assert_clean_failure(code, err, "cannot create output folder")


def test_report_refuses_a_folder_that_is_not_a_report(bad, capsys):
    argv = [
        "report",
        str(bad["good"]),
        "--corpus",
        str(bad["latin1"]),
        "--out",
        str(bad["foreign_out"]),
        "--quiet",
    ]
    code, err = run_main(argv, capsys)
    assert_clean_failure(code, err, "--force")
    assert sorted(p.name for p in bad["foreign_out"].iterdir()) == ["thesis.tex"]
