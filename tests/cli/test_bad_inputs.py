"""Every CLI command against every bad input: one line, exit code 2, no traceback, no output left.

The matrix: 19 model-taking commands x 7 bad models (missing path, folder without config.json,
not-a-GGUF, truncated GGUF, unsupported architecture, pickle-only checkpoint, inf weights);
9 corpus-taking commands x 5 bad corpora (empty, non-UTF-8, shorter than T, JSONL line without
text, missing); an unwritable --out for every command that writes one; block, hidden, head,
neuron and split indices out of range; texts under 2 tokens; a corpus too small for the 70/15/15
split; statistics of another model; mismatched vocabularies; seq-len beyond the context; a report
folder holding foreign files.

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
    paths["good_topics"] = root / "topics"
    for topic, text in {
        "sea": "waves roll over the sea ",
        "code": "for x in items: y = x ",
    }.items():
        (paths["good_topics"] / topic).mkdir(parents=True)
        for i in range(3):
            (paths["good_topics"] / topic / f"{i}.txt").write_text(text * (30 + i))
    paths["stats"] = root / "stats"
    paths["classifier"] = root / "classifier"
    for argv in (
        ["geometry", "collect", str(good), str(paths["good_topics"]), "--seq-len", "8"],
        ["weights", "finetune", str(good), "--corpus", str(paths["good_topics"]), "--seq-len", "8"],
    ):
        out = paths["stats"] if argv[0] == "geometry" else paths["classifier"]
        old_argv = sys.argv
        sys.argv = [
            "tgeom",
            *argv,
            "--out",
            str(out),
            *(["--steps", "2"] if argv[0] == "weights" else []),
        ]
        try:
            with pytest.raises(SystemExit) as done:
                main()
            assert not done.value.code, argv
        finally:
            sys.argv = old_argv
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
    "weights topk": ["weights", "topk", "{model}", "--block", "0", "--head", "0", "--out", "{out}"],
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
    "weights project": ["weights", "project", "{model}", "--neuron", "0:1", "--out", "{out}"],
    "weights validate": [
        *("weights", "validate", "{model}", "--corpus", "{good_corpus}", "--seq-len", "8"),
        *("--out", "{out}"),
    ],
    "weights align": ["weights", "align", "{model}", "{good}", "--out", "{out}"],
    "weights finetune": [
        *("weights", "finetune", "{model}", "--corpus", "{good_corpus}", "--seq-len", "8"),
        *("--out", "{out}"),
    ],
    "weights stitch": ["weights", "stitch", "{model}", "{classifier}", "--out", "{out}"],
    "weights diff": ["weights", "diff", "{good}", "{model}", "--out", "{out}"],
    "geometry collect": [
        *("geometry", "collect", "{model}", "{good_corpus}", "--seq-len", "8"),
        *("--out", "{out}"),
    ],
    "geometry qk": ["geometry", "qk", "{model}", "{stats}", "--block", "0"],
    "attention nullspace": [
        *("attention", "nullspace", "{model}", "--corpus", "{good_corpus}", "--seq-len", "8"),
        *("--out", "{out}"),
    ],
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
    argv = fill(MODEL_COMMANDS[command], {**values, "model": model, "out": str(out)})
    code, err = run_main(argv, capsys)
    assert_clean_failure(code, err, needle, out)


CORPUS_CASES = {
    "empty": ("{empty_corpus}", "empty"),
    "non-utf8": ("{latin1}", "UTF-8"),
    "too short": ("{tiny_corpus}", "longer than every document"),
    "jsonl without text": ("{no_text_jsonl}", "line 2"),
    "missing": ("{a_file}-missing", "does not exist"),
}


CORPUS_COMMANDS = {
    "corpus": ["corpus", "{corpus}", "--model", "{good}", "--seq-len", "16"],
    "geometry collect": ["geometry", "collect", "{good}", "{corpus}", "--seq-len", "16"],
    "geometry run": ["geometry", "run", "{good}", "{corpus}", "--seq-len", "16"],
    "attention nullspace": ["attention", "nullspace", "{good}", "--corpus", "{corpus}"],
    "identify tokens": ["identify", "tokens", "{good}", "--corpus", "{corpus}"],
    "weights validate": ["weights", "validate", "{good}", "--corpus", "{corpus}"],
    "weights finetune": ["weights", "finetune", "{good}", "--corpus", "{corpus}"],
    "weights stitch": ["weights", "stitch", "{good}", "{classifier}", "--corpus", "{corpus}"],
    "report": ["report", "{good}", "--corpus", "{corpus}", "--quiet"],
}


# a classifier is evaluated on its own topics: a one-topic file is refused for that first
CORPUS_NEEDLE = {("weights stitch", "too short"): "none of the classifier's topics"}


@pytest.mark.parametrize("case", list(CORPUS_CASES))
@pytest.mark.parametrize("command", list(CORPUS_COMMANDS))
def test_bad_corpus_fails_cleanly(bad, tmp_path, capsys, command, case):
    source, needle = CORPUS_CASES[case]
    needle = CORPUS_NEEDLE.get((command, case), needle)
    values = {k: str(v) for k, v in bad.items()}
    argv = fill(CORPUS_COMMANDS[command], {**values, "corpus": source.format(**values)})
    out = tmp_path / "out"
    if command != "corpus":
        argv += ["--out", str(out)]
    code, err = run_main(argv, capsys)
    assert_clean_failure(code, err, needle, out)


OUT_COMMANDS = [c for c in MODEL_COMMANDS if "{out}" in " ".join(MODEL_COMMANDS[c])]


@pytest.mark.parametrize("command", OUT_COMMANDS)
def test_unwritable_output_for_every_command(bad, capsys, command):
    values = {k: str(v) for k, v in bad.items()}
    values |= {"model": str(bad["good"]), "good_corpus": str(bad["good_topics"])}
    out = bad["a_file"] / "sub"  # a folder inside a plain file cannot be created
    code, err = run_main(fill(MODEL_COMMANDS[command], {**values, "out": str(out)}), capsys)
    assert_clean_failure(code, err, "cannot create output folder")


RANGE_CASES = {
    "project block": (["weights", "project", "{good}", "--neuron", "9:0"], "block 9"),
    "project neuron": (["weights", "project", "{good}", "--neuron", "0:99999"], "neuron 99999"),
    "project head": (["weights", "project", "{good}", "--head", "0:9", "--subhead", "q"], "head 9"),
    "effective block": (
        ["attention", "effective", "{good}", "--text", "{text}", "--block", "9"],
        "block 9",
    ),
    "effective head": (
        ["attention", "effective", "{good}", "--text", "{text}", "--head", "9"],
        "head 9",
    ),
    "qk block": (["geometry", "qk", "{good}", "{stats}", "--block", "9"], "block 9"),
    "measure hidden": (
        ["geometry", "measure", "{stats_copy}", "--hidden", "9"],
        "hidden state 9",
    ),
    "stitch hidden": (
        ["weights", "stitch", "{good}", "{classifier}", "--hidden", "0,99"],
        "split hidden state 99 is out of range",
    ),
}


@pytest.mark.parametrize("case", list(RANGE_CASES))
def test_block_hidden_head_or_neuron_out_of_range(bad, tmp_path, capsys, case):
    import shutil

    argv, needle = RANGE_CASES[case]
    stats_copy = tmp_path / "stats"
    shutil.copytree(bad["stats"], stats_copy)
    values = {k: str(v) for k, v in bad.items()}
    values |= {"text": "waves roll over the sea", "stats_copy": str(stats_copy)}
    argv = fill(argv, values)
    out = tmp_path / "out"
    if "--out" not in argv and argv[:2] not in (["geometry", "qk"], ["geometry", "measure"]):
        argv += ["--out", str(out)]
    code, err = run_main(argv, capsys)
    assert_clean_failure(code, err, needle, out)


@pytest.mark.parametrize(
    "argv",
    [
        ["attention", "effective", "{good}", "--text", ""],
        ["identify", "attribution", "{good}", "--text", ""],
        ["weights", "lens", "{good}", "--text", ""],
    ],
)
def test_text_shorter_than_two_tokens(bad, tmp_path, capsys, argv):
    values = {k: str(v) for k, v in bad.items()}
    out = tmp_path / "out"
    code, err = run_main([*fill(argv, values), "--out", str(out)], capsys)
    assert_clean_failure(code, err, "text", out)


def test_corpus_too_small_for_the_identifiability_split(bad, tmp_path, capsys):
    argv = ["identify", "tokens", str(bad["good"]), "--corpus", str(bad["good_topics"])]
    argv += ["--seq-len", "8", "--max-windows-per-topic", "1", "--out", str(tmp_path / "out")]
    code, err = run_main(argv, capsys)
    assert_clean_failure(code, err, "sequences", tmp_path / "out")


def test_statistics_of_another_model(bad, tmp_path, capsys):
    argv = ["geometry", "qk", str(bad["other_vocab"]), str(bad["stats"]), "--block", "0"]
    code, err = run_main(argv, capsys)
    assert_clean_failure(code, err, "another model")


def test_seq_len_beyond_model_context(bad, capsys):
    text = bad["a_file"].parent / "long.txt"
    text.write_text("long text " * 200)
    code, err = run_main(
        ["corpus", str(text), "--model", str(bad["good"]), "--seq-len", "999"], capsys
    )
    assert_clean_failure(code, err, "999")


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [("--block", "7", "block 7 is out of range"), ("--head", "9", "head 9 is out of range")],
)
def test_block_or_head_out_of_range(bad, tmp_path, capsys, flag, value, needle):
    args = {"--block": "0", "--head": "0", flag: value}
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
    argv = ["weights", "topk", str(bad["good"]), "--block", "0", "--head", "0", "--out", str(out)]
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
