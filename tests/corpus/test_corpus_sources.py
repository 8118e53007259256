"""load_corpus: every source type from temp files, topic labels, and each bad input's message."""

from __future__ import annotations

import json
import sys
import types
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest

from tgeom.corpus import Corpus, Document, load_corpus
from tgeom.errors import TgeomError


def one_line_error(source: str) -> str:
    with pytest.raises(TgeomError) as info:
        load_corpus(source)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


def test_text_file_is_one_document_with_its_stem_as_topic(tmp_path: Path) -> None:
    path = tmp_path / "bird songs.txt"
    path.write_text("The robin sings at dawn.\nThe wren answers.", encoding="utf-8")
    corpus = load_corpus(str(path))
    assert isinstance(corpus, Corpus)
    assert corpus.documents == [
        Document("The robin sings at dawn.\nThe wren answers.", "bird songs", "bird songs.txt")
    ]
    assert corpus.topics == ["bird songs"]
    assert corpus.source == str(path)


def test_utf8_bom_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffcafé".encode())
    assert load_corpus(str(path)).documents[0].text == "café"


def test_folder_topics_are_subfolders_or_top_level_file_stems(tmp_path: Path) -> None:
    (tmp_path / "space").mkdir()
    (tmp_path / "space" / "a.txt").write_text("orbit", encoding="utf-8")
    (tmp_path / "space" / "deep").mkdir()
    (tmp_path / "space" / "deep" / "b.md").write_text("rocket", encoding="utf-8")
    (tmp_path / "cooking").mkdir()
    (tmp_path / "cooking" / "51060").write_text("bread", encoding="utf-8")  # no suffix: text
    (tmp_path / "loose.txt").write_text("alone", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n")  # not text: ignored
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("secret", encoding="utf-8")
    (tmp_path / "space" / "empty.txt").write_text("  \n", encoding="utf-8")  # blank: dropped

    corpus = load_corpus(str(tmp_path))
    got = [(d.topic, d.doc_id, d.text) for d in corpus.documents]
    assert got == [
        ("cooking", "cooking/51060", "bread"),
        ("loose", "loose.txt", "alone"),
        ("space", "space/a.txt", "orbit"),
        ("space", "space/deep/b.md", "rocket"),
    ]
    assert corpus.topics == ["cooking", "loose", "space"]
    assert corpus.documents_by_topic() == {"cooking": 1, "loose": 1, "space": 2}


def test_jsonl_reads_text_and_optional_topic(tmp_path: Path) -> None:
    path = tmp_path / "posts.jsonl"
    lines = [
        json.dumps({"text": "first post", "topic": "a"}),
        "",
        json.dumps({"text": "second post"}),
        json.dumps({"text": "third", "topic": "b", "extra": 1}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = load_corpus(str(path))
    got = [(d.topic, d.doc_id, d.text) for d in corpus.documents]
    assert got == [
        ("a", "posts.jsonl:1", "first post"),
        ("posts", "posts.jsonl:3", "second post"),
        ("b", "posts.jsonl:4", "third"),
    ]
    assert corpus.topics == ["a", "posts", "b"]


def test_jsonl_line_without_text_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"topic": "x"}\n', encoding="utf-8")
    message = one_line_error(str(path))
    assert "bad.jsonl line 2" in message and '"text"' in message


def test_jsonl_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": unquoted}\n', encoding="utf-8")
    assert "broken.jsonl line 3 is not valid JSON" in one_line_error(str(path))


def test_missing_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.txt"
    message = one_line_error(str(missing))
    assert str(missing) in message and "does not exist" in message


def test_empty_corpus_is_refused(tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_text(" \n\t\n", encoding="utf-8")
    assert "empty" in one_line_error(str(tmp_path / "blank.txt"))
    (tmp_path / "blank.jsonl").write_text('{"text": "   "}\n\n', encoding="utf-8")
    assert "empty" in one_line_error(str(tmp_path / "blank.jsonl"))


def test_folder_without_text_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"\x89PNG")
    assert "no text files" in one_line_error(str(tmp_path))


def test_non_utf8_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "topic").mkdir()
    (tmp_path / "topic" / "good.txt").write_text("fine", encoding="utf-8")
    bad = tmp_path / "topic" / "latin.txt"
    bad.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    message = one_line_error(str(tmp_path))
    assert str(bad) in message and "UTF-8" in message


def test_unknown_file_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    path.write_text("a,b\n", encoding="utf-8")
    message = one_line_error(str(path))
    assert "table.csv" in message and ".csv" in message and "unknown type" in message


def test_hf_source_without_datasets_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "datasets" else real_find_spec(name, *a),
    )
    assert "pip install datasets" in one_line_error("hf:ag_news")


def test_hf_source_reads_text_and_label_names(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeDataset(list):
        column_names = ["text", "label"]
        features = {"label": types.SimpleNamespace(names=["world", "sports"])}

    calls = []

    def load_dataset(name: str, split: str) -> FakeDataset:
        calls.append((name, split))
        return FakeDataset([{"text": "goal!", "label": 1}, {"text": "summit", "label": 0}])

    fake = types.ModuleType("datasets")
    fake.__spec__ = ModuleSpec("datasets", None)
    fake.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)

    corpus = load_corpus("hf:ag_news:test")
    assert calls == [("ag_news", "test")]
    assert [(d.topic, d.text, d.doc_id) for d in corpus.documents] == [
        ("sports", "goal!", "hf:ag_news:0"),
        ("world", "summit", "hf:ag_news:1"),
    ]
    load_corpus("hf:ag_news")
    assert calls[-1] == ("ag_news", "train")
