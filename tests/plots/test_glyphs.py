"""Tokens the figure font cannot draw (Gemma's CJK, Thai, Hangul tokens): found exactly where
matplotlib itself reports a missing glyph, drawn escaped, and named in one warning."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from tgeom.plots.embedding import show_token
from tgeom.plots.glyphs import glyph_warnings, undrawable_tokens

TOKENS = ["▁Paris", " café", "中国", "▁ภาษา", "한국어", "naïve", "x²", "→", "\t", "😀", "Ωmega"]


def matplotlib_misses_a_glyph(text: str) -> bool:
    """Draw ``text`` with matplotlib and report whether it warned of a missing glyph."""
    fig, ax = plt.subplots()
    ax.text(0.5, 0.5, text, parse_math=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.canvas.draw()
    plt.close(fig)
    return any("missing from" in str(w.message) for w in caught)


@pytest.mark.parametrize("token", TOKENS)
def test_undrawable_exactly_where_matplotlib_misses_a_glyph(token: str) -> None:
    assert (token in undrawable_tokens([token])) == matplotlib_misses_a_glyph(
        token.replace("\t", " ")
    )


def test_some_samples_are_undrawable_with_the_default_font() -> None:
    """The samples exercise both sides (DejaVu Sans has no CJK, Thai or Hangul)."""
    missing = undrawable_tokens(TOKENS)
    assert {"中国", "한국어"} <= set(missing)
    assert "▁Paris" not in missing and " café" not in missing


@pytest.mark.parametrize("token", TOKENS)
def test_figure_labels_are_drawn_without_missing_glyphs(token: str) -> None:
    label = show_token(token, limit=40, mathtext=False)
    assert not matplotlib_misses_a_glyph(label)
    if token in undrawable_tokens([token]):
        assert "\\u" in label or "\\U" in label


def test_escaped_label_names_the_code_point() -> None:
    assert show_token("中国", mathtext=False) == "\\u4e2d\\u56fd"
    assert show_token("a\x0bb", mathtext=False) == "a\\x0bb"


def test_one_warning_names_the_tokens() -> None:
    lines = glyph_warnings(["▁Paris", "中国", "中国", "한국어"], "lens figure")
    assert len(lines) == 1
    assert lines[0].startswith("lens figure: 2 tokens")
    assert "'中国'" in lines[0] and "'한국어'" in lines[0] and "Paris" not in lines[0]
    assert glyph_warnings(["▁Paris", " café"], "lens figure") == []
    many = glyph_warnings([chr(0x4E00 + i) for i in range(13)], "x", shown=10)
    assert many[0].endswith("and 3 more")
