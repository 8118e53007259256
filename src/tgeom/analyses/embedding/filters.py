"""Token filters for projections and top pairs [DAR] (SPEC section 3).

A filter is a bool mask over the vocabulary ``[V]`` (True = the token may be reported). Callers
apply it *before* top-k (scores of excluded tokens become -inf, or excluded rows/columns are
never visited), so k results come back whenever k tokens survive.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tgeom.corpus import Corpus, load_corpus
from tgeom.corpus.windows import TOKENIZE_BATCH, tokenize_documents
from tgeom.errors import TgeomError
from tgeom.models.load import tokenizer_special_ids

# What ``ascii_only`` tests: the decoded text of each token (what the tool displays), not the raw
# vocabulary entry the official [DAR] code tests (``entry.strip('Ġ').isascii()``). They differ on
# byte-level BPE vocabularies, whose raw entries spell bytes with non-ASCII stand-ins: 'Ċ' is a
# newline, 'ĉ' a tab (SmolLM2: 160 such tokens kept here, dropped by the raw test); WordPiece
# vocabularies (MiniLM) give the same mask either way.
ASCII_TEST = "decoded text"


def vocabulary(lm_or_tokenizer: Any) -> list[str]:
    """One display string per vocabulary id, from a LoadedModel or a Hugging Face tokenizer."""
    strings = getattr(lm_or_tokenizer, "vocab_strings", None)
    if strings is not None:
        return list(strings)
    tokenizer = lm_or_tokenizer
    return list(tokenizer.batch_decode([[i] for i in range(len(tokenizer))]))


def special_ids(lm_or_tokenizer: Any) -> list[int]:
    """Every id the tokenizer flags special: BOS/EOS/PAD/CLS/SEP/UNK/MASK... and the added
    tokens marked special (:func:`tgeom.models.load.tokenizer_special_ids`)."""
    if hasattr(lm_or_tokenizer, "special_token_ids"):
        return list(lm_or_tokenizer.special_token_ids())
    return tokenizer_special_ids(lm_or_tokenizer)


def _core(token: str) -> str:
    """The token text without surrounding spaces and word-piece markers (``##``, ``▁``, ``Ġ``)."""
    core = token.strip()
    if core.startswith("##"):
        core = core[2:]
    return core.lstrip("▁Ġ")


def token_mask(
    lm_or_tokenizer: Any,
    *,
    drop_special: bool = True,
    ascii_only: bool = False,
    alpha_only: bool = False,
    exclude_ids: Iterable[int] | None = None,
    include_ids: Iterable[int] | None = None,
) -> Tensor:
    """Bool mask ``[V]`` of the tokens that pass every requested filter.

    ``drop_special``: remove the tokenizer's special tokens. ``ascii_only``: keep tokens whose
    decoded text is ASCII (not the raw vocabulary entry: :data:`ASCII_TEST`). ``alpha_only``:
    keep tokens whose text, without surrounding spaces and word-piece markers, is non-empty and
    alphabetic. ``exclude_ids``: remove these ids.
    ``include_ids``: keep only these ids (a vocabulary subset, e.g. :func:`frequent_token_ids`).
    Raises TgeomError when an id is out of range or when no token survives.
    """
    strings = vocabulary(lm_or_tokenizer)
    return mask_from_strings(
        strings,
        special=special_ids(lm_or_tokenizer) if drop_special else (),
        ascii_only=ascii_only,
        alpha_only=alpha_only,
        exclude_ids=exclude_ids,
        include_ids=include_ids,
    )


def mask_from_strings(
    strings: Sequence[str],
    *,
    special: Iterable[int] = (),
    ascii_only: bool = False,
    alpha_only: bool = False,
    exclude_ids: Iterable[int] | None = None,
    include_ids: Iterable[int] | None = None,
) -> Tensor:
    """:func:`token_mask` on an explicit vocabulary (one string per id) and special ids."""
    V = len(strings)
    mask = torch.ones(V, dtype=torch.bool)
    if ascii_only:
        mask &= torch.tensor([s.isascii() for s in strings], dtype=torch.bool)
    if alpha_only:
        mask &= torch.tensor([_core(s).isalpha() for s in strings], dtype=torch.bool)
    mask[_ids(special, V, "special token")] = False
    if exclude_ids is not None:
        mask[_ids(exclude_ids, V, "excluded id")] = False
    if include_ids is not None:
        keep = torch.zeros(V, dtype=torch.bool)
        keep[_ids(include_ids, V, "included id")] = True
        mask &= keep
    if not bool(mask.any()):
        raise TgeomError(
            "the token filters leave no token of the vocabulary; relax them "
            "(e.g. drop --ascii-only/--alpha-only or widen the included ids)."
        )
    return mask


def _ids(ids: Iterable[int], size: int, what: str) -> Tensor:
    values = torch.as_tensor(list(ids), dtype=torch.int64)
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= size):
        bad = values[(values < 0) | (values >= size)][0]
        raise TgeomError(f"{what} {int(bad)} is out of range: valid ids are 0..{size - 1}.")
    return values


def frequent_token_ids(windows: Any, n: int) -> Tensor:
    """The ``n`` most frequent token ids of a corpus' Windows (``.token_ids [N, T]``), most
    frequent first, ties by smaller id; only tokens that occur are returned (int64 ``[<= n]``)."""
    _check_n(n)
    token_ids = torch.as_tensor(getattr(windows, "token_ids", windows)).reshape(-1)
    return _most_frequent(torch.bincount(token_ids.to(torch.int64)), n)


def corpus_frequent_ids(lm_or_tokenizer: Any, corpus: Corpus | str, n: int) -> Tensor:
    """The ``n`` most frequent token ids of a whole corpus (a :class:`~tgeom.corpus.Corpus` or
    a source for :func:`~tgeom.corpus.load_corpus`, e.g. ``"builtin"``), as
    :func:`frequent_token_ids` orders them. Every document is tokenised whole, without special
    tokens (no windows: nothing is cut or dropped), and only the counts are kept."""
    _check_n(n)
    tokenizer = getattr(lm_or_tokenizer, "tokenizer", lm_or_tokenizer)
    documents = (load_corpus(corpus) if isinstance(corpus, str) else corpus).documents
    counts = torch.zeros(0, dtype=torch.int64)
    for start in range(0, len(documents), TOKENIZE_BATCH):
        texts = [doc.text for doc in documents[start : start + TOKENIZE_BATCH]]
        for ids in tokenize_documents(tokenizer, texts):
            found = torch.bincount(torch.as_tensor(ids, dtype=torch.int64))
            if found.numel() > counts.numel():
                counts = torch.cat([counts, counts.new_zeros(found.numel() - counts.numel())])
            counts[: found.numel()] += found
    return _most_frequent(counts, n)


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise TgeomError(f"the number of frequent tokens must be a positive integer, got {n!r}.")


def _most_frequent(counts: Tensor, n: int) -> Tensor:
    """Ids of the ``n`` largest ``counts [V']``, ties by smaller id, zero counts left out."""
    if int(counts.sum()) == 0:
        raise TgeomError("the corpus has no tokens; pass a corpus with text in it.")
    order = torch.sort(counts, descending=True, stable=True).indices
    order = order[counts[order] > 0]
    return order[:n]


@dataclass(frozen=True)
class VocabularySubset:
    """The tokens results range over: ``mask [V]`` (True = may be reported) and how it was
    chosen, for results.json (:meth:`to_json`) and the printed summary (:attr:`description`).

    ``frequent``: the N asked for (None: the full vocabulary); ``n_frequent``: the frequent
    tokens the corpus actually has (<= N); ``n_special``: special tokens dropped (0 if kept).
    """

    mask: Tensor
    size: int
    drop_special: bool
    n_special: int
    ascii_only: bool = False
    alpha_only: bool = False
    frequent: int | None = None
    corpus: str | None = None
    n_frequent: int | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())

    @property
    def description(self) -> str:
        """E.g. ``"5000 most frequent tokens of corpus 'builtin' (of 49152), special tokens
        dropped: 4998 tokens"`` or ``"full vocabulary (49152) minus 17 special: 49135 tokens"``."""
        if self.frequent is None:
            base = f"full vocabulary ({self.size})"
            if self.drop_special:
                base += f" minus {self.n_special} special"
        else:
            found = self.n_frequent if self.n_frequent is not None else self.frequent
            some = f"{found} most" if found == self.frequent else f"all {found} (< {self.frequent})"
            base = f"{some} frequent tokens of corpus {self.corpus!r} (of {self.size})"
            if self.drop_special:
                base += ", special tokens dropped"
        flags = (("ASCII", self.ascii_only), ("alphabetic", self.alpha_only))
        only = [name for name, on in flags if on]
        if only:
            base += ", " + " and ".join(only) + " only"
        return f"{base}: {self.n_tokens} tokens"

    def to_json(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "size": self.size,
            "n_tokens": self.n_tokens,
            "drop_special": self.drop_special,
            "n_special_dropped": self.n_special,
            "ascii_only": self.ascii_only,
            "alpha_only": self.alpha_only,
            "frequent": self.frequent,
            "frequent_corpus": self.corpus,
            "n_frequent": self.n_frequent,
        }


def vocabulary_subset(
    lm_or_tokenizer: Any,
    *,
    drop_special: bool = True,
    ascii_only: bool = False,
    alpha_only: bool = False,
    frequent: int | None = None,
    corpus: Corpus | str = "builtin",
) -> VocabularySubset:
    """:func:`token_mask` with an optional restriction to the ``frequent`` most frequent
    tokens of ``corpus`` (:func:`corpus_frequent_ids`), described for results and summaries."""
    include = None
    source = None
    if frequent is not None:
        include = corpus_frequent_ids(lm_or_tokenizer, corpus, frequent)
        source = corpus if isinstance(corpus, str) else corpus.source
    mask = token_mask(
        lm_or_tokenizer,
        drop_special=drop_special,
        ascii_only=ascii_only,
        alpha_only=alpha_only,
        include_ids=None if include is None else include.tolist(),
    )
    return VocabularySubset(
        mask=mask,
        size=int(mask.numel()),
        drop_special=drop_special,
        n_special=len(special_ids(lm_or_tokenizer)) if drop_special else 0,
        ascii_only=ascii_only,
        alpha_only=alpha_only,
        frequent=frequent,
        corpus=source,
        n_frequent=None if include is None else int(include.numel()),
    )


def full_mask(size: int) -> Tensor:
    """A mask that keeps every token (for callers that want no filtering)."""
    return torch.ones(size, dtype=torch.bool)
