"""Corpora: documents with topic labels, and windows of T tokens cut from them (SPEC section 2).

``load_corpus(source)`` reads a text file, a folder of text files, JSONL, a Hugging Face dataset
(``hf:<name>[:split]``) or the offline ``builtin`` corpus; ``make_windows(corpus, tokenizer,
seq_len)`` cuts it into int64 token windows with topic labels and document ids.
"""

from __future__ import annotations

from tgeom.corpus.documents import Corpus, Document
from tgeom.corpus.sources import load_corpus
from tgeom.corpus.windows import Windows, make_windows

__all__ = ["Corpus", "Document", "Windows", "load_corpus", "make_windows"]
