"""make_windows against a brute-force re-tokenisation, and its bad inputs (SPEC section 2)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tgeom.corpus import Corpus, Document, Windows, make_windows
from tgeom.errors import TgeomError


class CharTokenizer:
    """One token per character (id = code point + 10); BOS/CLS configurable."""

    def __init__(self, bos: int | None = None, cls: int | None = None) -> None:
        self.bos_token_id = bos
        self.cls_token_id = cls

    def __call__(self, texts: list[str], add_special_tokens: bool = True, **_: Any) -> dict:
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) + 10 for c in text] for text in texts]}


@pytest.fixture(scope="module")
def minilm_tokenizer() -> Any:
    from tgeom.models import load_tokenizer

    return load_tokenizer("minilm")


def brute_force_windows(
    corpus: Corpus, encode: Any, seq_len: int, special: list[int]
) -> list[tuple[list[int], str, str]]:
    """Every (window, topic, doc_id), one document at a time, by slicing its full stream."""
    out = []
    step = seq_len - len(special)
    for doc in corpus.documents:
        ids = encode(doc.text)
        start = 0
        while start + step <= len(ids):
            out.append((special + ids[start : start + step], doc.topic, doc.doc_id))
            start += step
    return out


def as_triples(windows: Windows) -> list[tuple[list[int], str, str]]:
    return [
        (row, windows.topics[t], d)
        for row, t, d in zip(
            windows.token_ids.tolist(), windows.topic_ids.tolist(), windows.doc_ids, strict=True
        )
    ]


def char_corpus() -> Corpus:
    return Corpus(
        [
            Document("abcdefghijklmnopq", "letters", "l1"),  # 17 chars
            Document("xyz", "letters", "l2"),  # shorter than T: skipped
            Document("0123456789", "digits", "d1"),
            Document("!?", "marks", "m1"),  # the only document of its topic, too short
            Document("ABCDEFGHIJ", "letters", "l3"),
        ],
        "test",
    )


def test_windows_equal_brute_force_slicing_of_each_document() -> None:
    corpus = char_corpus()
    windows = make_windows(corpus, CharTokenizer(), 4)
    expected = brute_force_windows(corpus, lambda t: [ord(c) + 10 for c in t], 4, [])
    assert as_triples(windows) == expected
    assert windows.seq_len == 4 and windows.token_ids.shape == (len(expected), 4)


def test_token_ids_are_int64_and_hold_ids_beyond_uint16() -> None:
    corpus = Corpus([Document("\U0001f600" * 6, "emoji", "e")], "test")  # code point 128512
    windows = make_windows(corpus, CharTokenizer(), 3)
    assert windows.token_ids.dtype == torch.int64 and windows.topic_ids.dtype == torch.int64
    assert windows.token_ids.max().item() == 0x1F600 + 10 > 65535


def test_short_documents_are_skipped_and_counted_not_padded() -> None:
    windows = make_windows(char_corpus(), CharTokenizer(), 4)
    assert windows.n_skipped_docs == 2  # "xyz" and "!?"
    assert "marks" not in windows.topics  # no window, so no topic id
    assert windows.counts_by_topic() == {"letters": 4 + 2, "digits": 2}
    assert sum(windows.counts_by_topic().values()) == len(windows)


def test_prepend_special_uses_bos_else_cls_and_keeps_windows_t_long() -> None:
    corpus = char_corpus()
    with_bos = make_windows(corpus, CharTokenizer(bos=1, cls=2), 5, prepend_special=True)
    expected = brute_force_windows(corpus, lambda t: [ord(c) + 10 for c in t], 5, [1])
    assert as_triples(with_bos) == expected and with_bos.prepend_special
    with_cls = make_windows(corpus, CharTokenizer(cls=2), 5, prepend_special=True)
    assert with_cls.token_ids[:, 0].eq(2).all() and with_cls.token_ids.shape[1] == 5


def test_prepend_special_without_bos_or_cls_is_refused() -> None:
    with pytest.raises(TgeomError, match="neither a BOS nor a CLS"):
        make_windows(char_corpus(), CharTokenizer(), 4, prepend_special=True)


def test_max_windows_per_topic_keeps_the_first_windows_of_each_topic() -> None:
    corpus = char_corpus()
    full = as_triples(make_windows(corpus, CharTokenizer(), 4))
    capped = make_windows(corpus, CharTokenizer(), 4, max_windows_per_topic=3)
    first_three = [
        w for topic in ("letters", "digits") for w in [x for x in full if x[1] == topic][:3]
    ]
    assert as_triples(capped) == first_three  # document order: l1 then d1
    assert capped.counts_by_topic() == {"letters": 3, "digits": 2}


def test_window_order_is_deterministic() -> None:
    a = make_windows(char_corpus(), CharTokenizer(), 3)
    b = make_windows(char_corpus(), CharTokenizer(), 3)
    assert torch.equal(a.token_ids, b.token_ids) and a.doc_ids == b.doc_ids


def test_minilm_windows_equal_one_by_one_retokenisation(minilm_tokenizer: Any) -> None:
    corpus = Corpus(
        [
            Document("The quick brown fox jumps over the lazy dog. " * 9, "animals", "a"),
            Document("Tiny.", "animals", "b"),
            Document("Unbelievable tokenisation of hyphen-ated words! " * 7, "words", "w"),
        ],
        "test",
    )
    windows = make_windows(corpus, minilm_tokenizer, 16, max_context=512)

    def encode(text: str) -> list[int]:
        return minilm_tokenizer.encode(text, add_special_tokens=False)

    assert as_triples(windows) == brute_force_windows(corpus, encode, 16, [])
    assert windows.n_skipped_docs == 1
    cls = make_windows(corpus, minilm_tokenizer, 16, prepend_special=True)
    cls_id = minilm_tokenizer.cls_token_id
    assert as_triples(cls) == brute_force_windows(corpus, encode, 16, [cls_id])


@pytest.mark.parametrize("seq_len", [1, 0, -3])
def test_seq_len_below_two_is_refused(seq_len: int) -> None:
    with pytest.raises(TgeomError, match="at least 2"):
        make_windows(char_corpus(), CharTokenizer(), seq_len)


def test_seq_len_beyond_the_model_context_names_both_numbers() -> None:
    with pytest.raises(TgeomError) as info:
        make_windows(char_corpus(), CharTokenizer(), 600, max_context=512)
    message = str(info.value)
    assert "600" in message and "512" in message and "\n" not in message


def test_seq_len_longer_than_every_document_names_the_longest() -> None:
    with pytest.raises(TgeomError) as info:
        make_windows(char_corpus(), CharTokenizer(), 18)
    message = str(info.value)
    assert "longer than every document" in message and "17 tokens" in message


def test_max_windows_per_topic_below_one_is_refused() -> None:
    with pytest.raises(TgeomError, match="at least 1"):
        make_windows(char_corpus(), CharTokenizer(), 4, max_windows_per_topic=0)
