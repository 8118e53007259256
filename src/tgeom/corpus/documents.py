"""Documents and corpora: plain text with a topic label (SPEC section 2)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Document:
    """One document: its text, its topic label and an id unique within its corpus."""

    text: str
    topic: str
    doc_id: str


@dataclass
class Corpus:
    """Documents in a deterministic order; ``source`` is what :func:`load_corpus` was given."""

    documents: list[Document]
    source: str
    topics: list[str] = field(init=False)

    def __post_init__(self) -> None:
        # Topics in order of first appearance, so that their ids are deterministic.
        self.topics = list(dict.fromkeys(doc.topic for doc in self.documents))

    def __len__(self) -> int:
        return len(self.documents)

    def documents_by_topic(self) -> dict[str, int]:
        """Number of documents per topic, in :attr:`topics` order."""
        counts = dict.fromkeys(self.topics, 0)
        for doc in self.documents:
            counts[doc.topic] += 1
        return counts
