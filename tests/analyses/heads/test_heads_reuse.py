"""heads() reuses statistics and top pairs computed elsewhere (the report's other sections):
the result equals the one it computes itself, and mismatched inputs are refused in one line."""

from __future__ import annotations

import pytest

from tgeom.analyses.embedding.atlas import head_atlas
from tgeom.analyses.embedding.filters import token_mask
from tgeom.analyses.geometry.collect import collect_statistics
from tgeom.analyses.heads.atlas import heads
from tgeom.corpus import Corpus, Document, make_windows
from tgeom.errors import TgeomError

TEXTS = {
    "sea": "The boat left the harbour at dawn; waves rolled over the grey sea. " * 6,
    "code": "def add(a, b):\n    return a + b\nprint(add(1, 2))\n" * 8,
}


@pytest.fixture(scope="module")
def setup(tiny_model):
    lm = tiny_model("gpt2")
    docs = Corpus([Document(text, topic, topic) for topic, text in TEXTS.items()], "two topics")
    windows = make_windows(docs, lm.tokenizer, 24, max_windows_per_topic=3)
    return lm, windows


def test_reused_statistics_and_top_pairs_give_the_same_rows(setup):
    lm, windows = setup
    alone = heads(lm, windows, k=3, frequent=None, pass_windows=4)
    stats = collect_statistics(lm, windows, progress=False)  # with the second moment: a superset
    atlas = head_atlas(
        lm.weights(),
        6,
        vocab=lm.vocab_strings,
        row_mask=token_mask(lm),
        col_mask=token_mask(lm),
        quiet=True,
    )
    reused = heads(
        lm, windows, k=3, frequent=None, pass_windows=4, stats=stats, weights_atlas=atlas
    )
    assert reused.rows == alone.rows
    assert reused.layer_atlas == alone.layer_atlas
    assert reused.top_pairs == alone.top_pairs


def test_mismatched_reuse_is_refused(setup):
    lm, windows = setup
    other = make_windows(
        Corpus(
            [Document(TEXTS["sea"][::-1], "sea", "a"), Document(TEXTS["code"], "code", "b")], "x"
        ),
        lm.tokenizer,
        24,
        max_windows_per_topic=3,
    )
    stats = collect_statistics(lm, other, progress=False)
    with pytest.raises(TgeomError, match="other windows"):
        heads(lm, windows, k=3, frequent=None, stats=stats)
    few = head_atlas(lm.weights(), 2, vocab=lm.vocab_strings, quiet=True)
    with pytest.raises(TgeomError, match="it needs 3"):
        heads(lm, windows, k=3, frequent=None, weights_atlas=few)
