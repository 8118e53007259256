"""Corpus sources: a text file, a folder of text files, JSONL, a HF dataset, or ``builtin``.

SPEC section 2. Topic labels:

- ``notes.txt``: one document, topic ``notes`` (the file stem).
- a folder: every text file below it (``.txt``, ``.md``, ``.rst``, ``.text`` or no suffix,
  hidden files ignored, sorted by path) is one document; its topic is the name of the
  sub-folder of the given folder it lies in, or its file stem when it lies at the top level.
- ``data.jsonl``: one document per non-blank line, ``{"text": ..., "topic": ...}``; ``topic``
  defaults to the file stem.
- ``hf:<name>[:split]``: a Hugging Face dataset (split ``train`` by default) through the
  optional ``datasets`` package; text from the ``text`` column, topic from ``topic`` or the
  class names of ``label`` when present, else the dataset name.
- ``builtin``: see :mod:`tgeom.corpus.builtin`.

Documents whose text is empty or blank are dropped; a corpus with none left is an error.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from tgeom.corpus.documents import Corpus, Document
from tgeom.errors import TgeomError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", "")
HF_PREFIX = "hf:"
USAGE = "pass a .txt file, a folder of text files, a .jsonl file, hf:<dataset>[:split] or builtin"


def load_corpus(source: str) -> Corpus:
    """Read ``source`` into a :class:`Corpus` (documents in a deterministic order)."""
    source = str(source)  # a pathlib.Path is welcome too
    if source == "builtin":
        from tgeom.corpus.builtin import builtin_documents

        documents = builtin_documents()
    elif source.startswith(HF_PREFIX):
        documents = read_hf_dataset(source[len(HF_PREFIX) :])
    else:
        documents = _read_path(source)
    documents = [doc for doc in documents if doc.text.strip()]
    if not documents:
        raise TgeomError(f"corpus {source} is empty: it has no non-empty document; {USAGE}.")
    return Corpus(documents, source)


def _read_path(source: str) -> list[Document]:
    path = Path(source).expanduser()
    if not path.exists():
        raise TgeomError(f"corpus path {source} does not exist; {USAGE}.")
    if path.is_dir():
        return read_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix in TEXT_SUFFIXES:
        return [Document(read_text(path), path.stem, path.name)]
    raise TgeomError(f"corpus file {path.name} has an unknown type ({suffix}); {USAGE}.")


def read_text(path: Path) -> str:
    """The text of ``path`` as UTF-8 (a BOM is dropped); TgeomError naming the file otherwise."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TgeomError(
            f"{path} is not UTF-8 text (invalid byte at offset {exc.start}); re-encode it as "
            "UTF-8, e.g. iconv -t UTF-8."
        ) from None
    except OSError as exc:
        raise TgeomError(f"cannot read {path}: {exc.strerror or exc}.") from None


def read_folder(folder: Path) -> list[Document]:
    """Every text file below ``folder``, topic = its top sub-folder, else its file stem."""
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in TEXT_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise TgeomError(
            f"corpus folder {folder} has no text files (.txt, .md, .rst or no suffix); {USAGE}."
        )
    documents = []
    for path in files:
        relative = path.relative_to(folder)
        topic = relative.parts[0] if len(relative.parts) > 1 else path.stem
        documents.append(Document(read_text(path), topic, relative.as_posix()))
    return documents


def read_jsonl(path: Path) -> list[Document]:
    """One document per non-blank line of ``path``; ``text`` required, ``topic`` optional."""
    documents = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TgeomError(
                f"{path.name} line {number} is not valid JSON ({exc.msg}); write one JSON "
                'object per line, e.g. {"text": "...", "topic": "..."}.'
            ) from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise TgeomError(
                f'{path.name} line {number} has no "text" string; every line needs '
                '{"text": "...", "topic": "..." (optional)}.'
            )
        topic = record.get("topic", path.stem)
        documents.append(Document(text, str(topic), f"{path.name}:{number}"))
    return documents


def read_hf_dataset(spec: str) -> list[Document]:
    """``<name>[:split]`` through the optional ``datasets`` package."""
    name, _, split = spec.partition(":")
    if not name:
        raise TgeomError("hf: needs a dataset name, as in hf:<name>[:split].")
    if importlib.util.find_spec("datasets") is None:
        raise TgeomError(
            f"reading hf:{spec} needs the datasets package: pip install datasets "
            "(or pass a .txt file, folder or .jsonl)."
        )
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # network, unknown name, unknown split: all bad input here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TgeomError(f"cannot load dataset hf:{spec}: {first}") from None
    columns = list(getattr(dataset, "column_names", []) or [])
    if "text" not in columns:
        raise TgeomError(f"dataset hf:{spec} has no 'text' column (columns: {', '.join(columns)}).")
    topics = _hf_topics(dataset, columns, name)
    return [
        Document(str(row["text"] or ""), topics(row), f"hf:{name}:{i}")
        for i, row in enumerate(dataset)
    ]


def _hf_topics(dataset: Any, columns: list[str], default: str) -> Any:
    """A function row -> topic: the ``topic`` column, else ``label`` class names, else name."""
    if "topic" in columns:
        return lambda row: str(row["topic"])
    if "label" in columns:
        feature = getattr(dataset, "features", {}).get("label")
        names = getattr(feature, "names", None)
        if names:
            return lambda row: str(names[row["label"]])
        return lambda row: str(row["label"])
    return lambda row: default
