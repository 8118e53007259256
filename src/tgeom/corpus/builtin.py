"""The built-in corpus: real third-party text read at run time from installed packages.

SPEC section 2. Nothing is copied into this repository: the text comes from the test data of
the installed ``gensim==4.4.0`` wheel (``gensim/test/test_data``, located with
``importlib.util.find_spec`` so gensim itself is never imported) and from CPython's standard
library. Topics, in this order:

- ``wiki:<Title>`` (8 topics): single English Wikipedia articles from the shortened 2016 dump
  ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``, markup cleaned by
  :mod:`tgeom.corpus.wikitext`. Of the 20 articles with the longest markup, the 8 with the
  longest cleaned prose (each >= 65,000 characters: Abraham Lincoln, American Revolutionary War,
  Alkali metal, Albania, Amphibian, Alabama, Apollo, Azerbaijan), in dump order. One article is
  one document, so each topic is a single coherent text; each gives >= 110 windows of 128 tokens
  with both offline tokenizers (MiniLM WordPiece and SmolLM2 BPE), comfortably above 64.
- ``news``: the 300 ABC news articles of ``lee_background.cor``, one document per line.
- ``atheism`` and ``space``: the 100 + 100 alt.atheism / sci.space posts of ``mini_newsgroup``
  (a pickle, read with :func:`tgeom.corpus.safe_pickle.safe_loads`, never ``pickle.load``),
  with their header block (Path, From, Message-ID...) removed.
- ``python-code``: top-level ``.py`` files of the running CPython's standard library
  (``sysconfig.get_paths()["stdlib"]``), public modules only, sorted by name, taken until
  250,000 characters; deterministic for a given Python version.

Windows of short documents (news articles, posts) run out early in each document, which is
why the per-document sources were chosen with enough documents: every topic gives >= 64
windows of 128 tokens for both tokenizers.
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import sysconfig
import xml.etree.ElementTree as ET
from pathlib import Path

from tgeom.corpus.documents import Document
from tgeom.corpus.safe_pickle import safe_loads
from tgeom.corpus.wikitext import clean_wikitext
from tgeom.errors import TgeomError

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
NEWSGROUPS_FILE = "mini_newsgroup"
N_WIKI_CANDIDATES = 20  # articles with the longest markup, cleaned and ranked
N_WIKI_TOPICS = 8
PYTHON_CODE_CHARS = 250_000
NEWSGROUP_TOPICS = {"alt.atheism": "atheism", "sci.space": "space"}


def builtin_documents() -> list[Document]:
    """All documents of the built-in corpus (parsed once per process, then cached)."""
    return list(_cached_documents())


@functools.lru_cache(maxsize=1)
def _cached_documents() -> tuple[Document, ...]:
    data = gensim_test_data()
    return (
        *wiki_documents(data / WIKI_DUMP),
        *news_documents(data / NEWS_FILE),
        *newsgroup_documents(data / NEWSGROUPS_FILE),
        *python_code_documents(),
    )


def gensim_test_data() -> Path:
    """The ``test_data`` folder of the installed gensim, without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise TgeomError(
            "the built-in corpus reads the test data of gensim: pip install gensim==4.4.0 "
            "(or pass a text file, folder or .jsonl as the corpus)."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"
    for name in (WIKI_DUMP, NEWS_FILE, NEWSGROUPS_FILE):
        if not (folder / name).is_file():
            raise TgeomError(
                f"gensim's test data lacks {name}: pip install gensim==4.4.0 for the built-in "
                "corpus."
            )
    return folder


def wiki_articles(dump: Path) -> list[tuple[str, str]]:
    """``(title, wiki markup)`` of every main-namespace, non-redirect page, in dump order."""
    with bz2.open(dump) as stream:
        root = ET.parse(stream).getroot()
    ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
    articles = []
    for page in root.iter(f"{ns}page"):
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        title = page.findtext(f"{ns}title") or ""
        articles.append((title, page.findtext(f"{ns}revision/{ns}text") or ""))
    return articles


def wiki_documents(dump: Path) -> list[Document]:
    """The ``N_WIKI_TOPICS`` longest cleaned articles, one topic ``wiki:<Title>`` each."""
    articles = wiki_articles(dump)
    order = {title: i for i, (title, _) in enumerate(articles)}
    candidates = sorted(articles, key=lambda a: (-len(a[1]), order[a[0]]))[:N_WIKI_CANDIDATES]
    cleaned = [(title, clean_wikitext(markup)) for title, markup in candidates]
    chosen = sorted(cleaned, key=lambda a: (-len(a[1]), order[a[0]]))[:N_WIKI_TOPICS]
    chosen.sort(key=lambda a: order[a[0]])
    return [Document(text, f"wiki:{title}", f"wiki:{title}") for title, text in chosen]


def news_documents(path: Path) -> list[Document]:
    """ABC news articles, one per line, topic ``news``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [
        Document(line.strip(), "news", f"news:{i}") for i, line in enumerate(lines) if line.strip()
    ]


def newsgroup_documents(path: Path) -> list[Document]:
    """alt.atheism and sci.space posts without headers, topics ``atheism`` and ``space``."""
    bunch = safe_loads(path.read_bytes(), name=path.name)
    try:
        texts, targets, names = bunch["data"], bunch["target"], bunch["target_names"]
        filenames = bunch.get("filenames") or [str(i) for i in range(len(texts))]
    except (KeyError, TypeError, AttributeError):
        raise TgeomError(f"{path.name}: not the expected 20 Newsgroups sample.") from None
    by_topic: dict[str, list[Document]] = {topic: [] for topic in NEWSGROUP_TOPICS.values()}
    for text, target, filename in zip(texts, targets, filenames, strict=True):
        topic = NEWSGROUP_TOPICS.get(_text(names[target]))
        body = text.split("\n\n", 1)[1] if "\n\n" in text else text
        if topic is None or not body.strip():
            continue
        post_id = "/".join(_text(filename).split("/")[-2:])
        by_topic[topic].append(Document(body.strip(), topic, f"newsgroups:{post_id}"))
    return [doc for docs in by_topic.values() for doc in docs]


def python_code_documents() -> list[Document]:
    """Public top-level stdlib modules, sorted by name, up to ``PYTHON_CODE_CHARS``."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents: list[Document] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        if path.name.startswith("_") or total >= PYTHON_CODE_CHARS:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            documents.append(Document(text, "python-code", f"python:{path.name}"))
            total += len(text)
    return documents


def _text(value: object) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)
