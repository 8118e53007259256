"""Degenerate results pass loudly (issue 21): each warning of an analysis is one line
``tgeom: warning: ...`` on stderr and one entry of ``warnings`` in ``results.json``; an adequate
input gives neither. Runs ``tgeom.cli.main`` in-process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tgeom.cli import main


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    old = sys.argv
    sys.argv = ["tgeom", *argv]
    try:
        with pytest.raises(SystemExit) as done:
            main()
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    assert not done.value.code, err
    return out, err


def warning_lines(err: str) -> list[str]:
    return [line[len("tgeom: warning: ") :] for line in err.splitlines() if "warning" in line]


def assert_warned(out_dir: Path, err: str, needles: list[str]) -> None:
    recorded = json.loads((out_dir / "results.json").read_text())["warnings"]
    assert warning_lines(err) == recorded and len(recorded) == len(needles), err
    for line, needle in zip(recorded, needles, strict=True):
        assert needle in line and "\n" not in line


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("warn-corpus")
    texts = {"sea": "waves roll over the sea. ", "sky": "clouds drift in a sky. "}
    for topic, text in texts.items():
        (root / topic).mkdir()
        (root / topic / "t.txt").write_text(text * 12)
    return root


def test_effective_attention_without_a_possible_null_space_warns(tiny_model_dir, tmp_path, capsys):
    model = str(tiny_model_dir("bert"))  # d_head 8, character tokens
    short, long = tmp_path / "short", tmp_path / "long"
    argv = ["attention", "effective", model, "--text", "sea", "--out", str(short)]
    _, err = run_cli(argv, capsys)
    assert_warned(short, err, ["the sequence has 3 tokens, not more than d_head = 8"])
    argv = ["attention", "effective", model, "--text", "the sea rolls", "--out", str(long)]
    _, err = run_cli(argv, capsys)
    assert_warned(long, err, [])


def test_geometry_on_a_handful_of_windows_warns(tiny_model_dir, corpus, tmp_path, capsys):
    model = str(tiny_model_dir("gpt2"))
    few, enough = tmp_path / "few", tmp_path / "enough"
    argv = ["geometry", "run", model, str(corpus), "--seq-len", "8"]
    _, err = run_cli([*argv, "--max-windows-per-topic", "2", "--out", str(few)], capsys)
    assert_warned(few, err, ["smallest topic has 2 window(s)", "4 windows for 7 positions"])
    _, err = run_cli([*argv, "--max-windows-per-topic", "8", "--out", str(enough)], capsys)
    assert_warned(enough, err, [])


@pytest.mark.slow
def test_readme_effective_attention_example_has_a_null_space(tmp_path, capsys):
    """The README's ``attention effective`` example runs without a warning: its text is longer
    than MiniLM's d_head (it used to be 9 tokens: Pearson 1.000 by construction)."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    start = readme.index("tgeom attention effective minilm")
    command = readme[start : readme.index("\n", readme.index('."', start))]
    text = command.split('--text "', 1)[1].rsplit('"', 1)[0].replace("\\\n  ", "")
    out = tmp_path / "eff"
    argv = ["attention", "effective", "minilm", "--text", text, "--out", str(out)]
    _, err = run_cli(argv, capsys)
    assert_warned(out, err, [])
    result = json.loads((out / "results.json").read_text())
    assert len(result["tokens"]) > result["d_head"] == 32
    assert min(h["null_dim"] for h in result["heads"]) >= len(result["tokens"]) - 32 > 0
