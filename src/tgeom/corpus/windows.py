"""Windows of T tokens cut from documents' token streams (SPEC section 2).

Each document is tokenised on its own, without special tokens, and its token stream is cut into
consecutive, non-overlapping windows of T tokens; the tail shorter than T is dropped and nothing
is ever padded. A document with fewer than T tokens gives no window and is counted in
``n_skipped_docs``. With ``prepend_special`` every window starts with the tokenizer's BOS token
(or CLS when it has no BOS) followed by T - 1 tokens of the stream, so windows stay T long.
Token ids are int64 (vocabularies above 65,536 overflow uint16).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tgeom.corpus.documents import Corpus, Document
from tgeom.errors import TgeomError

TOKENIZE_BATCH = 16  # documents tokenised per call (lets a full topic stop early)


@dataclass
class Windows:
    """Token windows with their labels.

    ``token_ids [N, T]`` int64; ``topic_ids [N]`` int64 indexing ``topics`` (the corpus topics
    that gave at least one window, in corpus order); ``doc_ids`` one per window. Windows follow
    document order, and within a document the order of the stream.
    """

    token_ids: torch.Tensor
    topic_ids: torch.Tensor
    topics: list[str]
    doc_ids: list[str]
    seq_len: int
    n_skipped_docs: int
    prepend_special: bool = False

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def counts_by_topic(self) -> dict[str, int]:
        """Number of windows per topic, in :attr:`topics` order."""
        counts = torch.bincount(self.topic_ids, minlength=len(self.topics)).tolist()
        return dict(zip(self.topics, counts, strict=True))


def make_windows(
    corpus: Corpus,
    tokenizer: Any,
    seq_len: int,
    *,
    prepend_special: bool = False,
    max_windows_per_topic: int | None = None,
    max_context: int | None = None,
) -> Windows:
    """Cut ``corpus`` into windows of ``seq_len`` tokens of ``tokenizer`` (a HF tokenizer).

    ``max_windows_per_topic`` keeps the first N windows of each topic (in document order) and
    stops tokenising a topic once it has them; documents not reached are neither used nor
    counted as skipped. ``max_context`` is the model's context length, checked against
    ``seq_len``.
    """
    _check_seq_len(seq_len, max_context)
    if max_windows_per_topic is not None and max_windows_per_topic < 1:
        raise TgeomError(
            f"--max-windows-per-topic must be at least 1 (got {max_windows_per_topic})."
        )
    special = [special_token_id(tokenizer)] if prepend_special else []
    step = seq_len - len(special)  # stream tokens per window
    cap = max_windows_per_topic if max_windows_per_topic is not None else float("inf")

    rows: list[list[int]] = []
    window_topics: list[str] = []
    doc_ids: list[str] = []
    counts: dict[str, int] = dict.fromkeys(corpus.topics, 0)
    n_skipped = 0
    longest = 0
    for doc, ids in _token_streams(corpus.documents, tokenizer, counts, cap):
        longest = max(longest, len(ids))
        n_windows = min(len(ids) // step, cap - counts[doc.topic])
        if len(ids) < step:
            n_skipped += 1
        for k in range(int(n_windows)):
            rows.append(special + ids[k * step : (k + 1) * step])
            window_topics.append(doc.topic)
            doc_ids.append(doc.doc_id)
        counts[doc.topic] += int(n_windows)

    if not rows:
        raise TgeomError(
            f"--seq-len {seq_len} is longer than every document (the longest has {longest} "
            f"tokens{' before the special token' if special else ''}); pass a smaller "
            "--seq-len or longer documents."
        )
    topics = [topic for topic in corpus.topics if counts[topic] > 0]
    topic_index = {topic: i for i, topic in enumerate(topics)}
    return Windows(
        token_ids=torch.tensor(rows, dtype=torch.int64),
        topic_ids=torch.tensor([topic_index[t] for t in window_topics], dtype=torch.int64),
        topics=topics,
        doc_ids=doc_ids,
        seq_len=seq_len,
        n_skipped_docs=n_skipped,
        prepend_special=prepend_special,
    )


def special_token_id(tokenizer: Any) -> int:
    """The BOS token id of ``tokenizer``, else its CLS token id; TgeomError if it has neither."""
    for name in ("bos_token_id", "cls_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            return int(token_id)
    raise TgeomError(
        "this tokenizer has neither a BOS nor a CLS token to prepend; drop --prepend-special."
    )


def tokenize_documents(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens and without truncation."""
    encoded = tokenizer(
        list(texts),
        add_special_tokens=False,
        truncation=False,
        verbose=False,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    return [list(ids) for ids in encoded["input_ids"]]


def _token_streams(
    documents: Sequence[Document], tokenizer: Any, counts: dict[str, int], cap: float
) -> Iterator[tuple[Document, list[int]]]:
    """``(document, token ids)`` in document order, skipping documents of full topics."""
    pending: list[Document] = []
    for doc in documents:
        if counts[doc.topic] >= cap:
            continue
        pending.append(doc)
        if len(pending) == TOKENIZE_BATCH:
            yield from _tokenized(pending, tokenizer, counts, cap)
            pending = []
    yield from _tokenized(pending, tokenizer, counts, cap)


def _tokenized(
    batch: list[Document], tokenizer: Any, counts: dict[str, int], cap: float
) -> Iterator[tuple[Document, list[int]]]:
    if not batch:
        return
    for doc, ids in zip(batch, tokenize_documents(tokenizer, [d.text for d in batch]), strict=True):
        if counts[doc.topic] < cap:  # the topic may have filled up within this batch
            yield doc, ids


def _check_seq_len(seq_len: int, max_context: int | None) -> None:
    if seq_len < 2:
        raise TgeomError(f"--seq-len must be at least 2 tokens (got {seq_len}).")
    if max_context is not None and seq_len > max_context:
        raise TgeomError(
            f"--seq-len {seq_len} is longer than the model's context of {max_context} tokens; "
            f"pass --seq-len {max_context} or less."
        )
