"""``tgeom corpus``: JSON output, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from tgeom.cli import app
from tgeom.errors import TgeomError

CAP_2 = ("--max-windows-per-topic", "2")


def make_folder(root: Path) -> Path:
    (root / "space").mkdir(parents=True)
    (root / "space" / "a.txt").write_text("The rocket reached orbit today. " * 20, "utf-8")
    (root / "space" / "b.txt").write_text("Short.", "utf-8")
    (root / "food").mkdir()
    (root / "food" / "c.txt").write_text("Bread rises when the yeast works. " * 20, "utf-8")
    return root


def run_tgeom(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tgeom", "corpus", *args], capture_output=True, text=True
    )


def test_corpus_json_reports_topics_documents_and_windows(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "docs")
    result = CliRunner().invoke(
        app, ["corpus", str(folder), "--model", "minilm", "--seq-len", "16", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["source"] == str(folder) and report["model"] == "minilm"
    assert report["seq_len"] == 16
    topics = {row["topic"]: row for row in report["topics"]}
    assert [row["topic"] for row in report["topics"]] == ["food", "space"]
    assert topics["space"]["documents"] == 2 and topics["food"]["documents"] == 1
    assert topics["space"]["windows"] > 0 and topics["food"]["windows"] > 0
    assert report["n_windows"] == sum(row["windows"] for row in report["topics"])
    assert report["n_skipped_docs"] == 1  # "Short." has fewer than 16 tokens

    capped = CliRunner().invoke(
        app,
        ["corpus", str(folder), "--model", "minilm", "--seq-len", "16", "--json", *CAP_2],
    )
    assert [row["windows"] for row in json.loads(capped.output)["topics"]] == [2, 2]


def test_corpus_table_lists_every_topic(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "docs")
    result = CliRunner().invoke(app, ["corpus", str(folder), "--model", "minilm", "--seq-len", "8"])
    assert result.exit_code == 0, result.output
    assert "food" in result.output and "space" in result.output and "skipped" in result.output


def test_missing_corpus_path_exits_2_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    result = run_tgeom(str(missing), "--model", "minilm", "--seq-len", "16")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("tgeom: error: ") and str(missing) in result.stderr


def test_seq_len_beyond_model_context_is_a_one_line_error(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "docs")
    result = CliRunner().invoke(
        app, ["corpus", str(folder), "--model", "minilm", "--seq-len", "4096"]
    )
    assert isinstance(result.exception, TgeomError)  # main() turns it into exit code 2
    message = str(result.exception)
    assert "4096" in message and "512" in message and "\n" not in message
