"""The built-in corpus: real text from installed packages, >= 8 topics of >= 64 windows of 128."""

from __future__ import annotations

import pickle
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from tgeom.corpus import builtin as builtin_module
from tgeom.corpus import load_corpus, make_windows

T = 128
MIN_WINDOWS = 64


@pytest.fixture(scope="module")
def corpus() -> Any:
    return load_corpus("builtin")


@pytest.mark.parametrize("model", ["minilm", "smollm2"])
def test_every_builtin_topic_gives_64_windows_of_128_tokens(corpus: Any, model: str) -> None:
    from tgeom.models import load_tokenizer

    windows = make_windows(corpus, load_tokenizer(model), T)
    counts = windows.counts_by_topic()
    assert len(counts) >= 8
    assert set(counts) == set(corpus.topics)
    assert min(counts.values()) >= MIN_WINDOWS, counts
    assert windows.token_ids.shape == (sum(counts.values()), T)


def test_builtin_topics_are_wiki_articles_news_newsgroups_and_code(corpus: Any) -> None:
    wiki = [t for t in corpus.topics if t.startswith("wiki:")]
    assert len(wiki) == builtin_module.N_WIKI_TOPICS
    assert corpus.topics[len(wiki) :] == ["news", "atheism", "space", "python-code"]
    by_topic = corpus.documents_by_topic()
    assert all(by_topic[t] == 1 for t in wiki)  # one article, one topic
    assert by_topic["news"] == 300 and by_topic["atheism"] == by_topic["space"] == 100
    assert len({d.doc_id for d in corpus.documents}) == len(corpus.documents)


def test_wiki_articles_are_clean_prose(corpus: Any) -> None:
    for doc in corpus.documents:
        if doc.topic.startswith("wiki:"):
            for markup in ("[[", "]]", "{{", "}}", "<ref", "</ref", "<!--", "'''", "&nbsp;"):
                assert markup not in doc.text, (doc.topic, markup)
            assert doc.topic == doc.doc_id and len(doc.text) > 50_000


def test_newsgroup_posts_have_no_header_block(corpus: Any) -> None:
    for doc in corpus.documents:
        if doc.topic in ("atheism", "space"):
            first_lines = doc.text.splitlines()[:3]
            assert not any(
                line.startswith(("Path:", "Newsgroups:", "Xref:")) for line in first_lines
            )
            group = doc.doc_id.split(":")[1].split("/")[0]
            assert group == {"atheism": "alt.atheism", "space": "sci.space"}[doc.topic]


def test_python_code_is_sorted_public_stdlib_modules(corpus: Any) -> None:
    code = [d for d in corpus.documents if d.topic == "python-code"]
    names = [d.doc_id.removeprefix("python:") for d in code]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    expected = sorted(p.name for p in stdlib.glob("*.py") if not p.name.startswith("_"))
    assert names == expected[: len(names)]
    assert code[0].text == (stdlib / names[0]).read_text(encoding="utf-8")


def test_builtin_corpus_never_uses_plain_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("plain pickle.load used")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    docs = builtin_module.newsgroup_documents(
        builtin_module.gensim_test_data() / builtin_module.NEWSGROUPS_FILE
    )
    assert len(docs) == 200


def test_builtin_corpus_is_read_without_importing_gensim() -> None:
    code = (
        "import sys; from tgeom.corpus.builtin import builtin_documents; "
        "docs = builtin_documents(); print(len(docs), 'gensim' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    n_docs, imported = out.stdout.split()
    assert int(n_docs) > 500 and imported == "False"


def test_builtin_documents_are_deterministic_and_cached(corpus: Any) -> None:
    again = load_corpus("builtin")
    assert again.documents == corpus.documents
    assert builtin_module._cached_documents.cache_info().hits >= 1
