"""Which characters the figures' font can draw: tokens of CJK, Thai or Hangul scripts (Gemma's
vocabulary has many) would otherwise show as empty boxes in a PNG, so figures escape them and the
analysis warns, naming the tokens."""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def figure_fonts() -> tuple[tuple[str, ...], frozenset[int]]:
    """The font names matplotlib draws text with (its fallback list for the default family) and
    the code points any of them has a glyph for."""
    import matplotlib.pyplot as plt
    from matplotlib import font_manager, ft2font

    params: Any = plt.rcParams  # read by computed key ("font.sans-serif", ...)
    generic = ("sans-serif", "serif", "monospace", "cursive", "fantasy")
    candidates: list[str] = []
    for family in params["font.family"]:
        candidates += list(params[f"font.{family}"]) if family in generic else [family]
    names: list[str] = []
    chars: set[int] = set()
    seen: set[str] = set()
    for name in candidates:
        try:
            path = font_manager.findfont(
                font_manager.FontProperties(family=name), fallback_to_default=False
            )
        except ValueError:
            continue
        if path in seen:
            continue
        seen.add(path)
        names.append(name)
        chars.update(ft2font.FT2Font(path).get_charmap())
    if not seen:  # matplotlib falls back to its default font
        path = font_manager.findfont(font_manager.FontProperties())
        names.append(font_manager.FontProperties(fname=path).get_name())
        chars.update(ft2font.FT2Font(path).get_charmap())
    return tuple(names), frozenset(chars)


def drawable(ch: str) -> bool:
    """``ch`` is printable and the figure font has a glyph for it."""
    return ch.isprintable() and (ch == " " or ord(ch) in figure_fonts()[1])


def undrawable_tokens(tokens: Iterable[str]) -> list[str]:
    """The distinct tokens (in first-seen order) with a printable character the figure font
    cannot draw (figures show such characters escaped, ``\\u4e2d``)."""
    found: dict[str, None] = {}
    for token in tokens:
        if any(ch.isprintable() and not drawable(ch) for ch in token):
            found.setdefault(token, None)
    return list(found)


def glyph_warnings(tokens: Iterable[str], where: str, shown: int = 10) -> list[str]:
    """``[one line]`` naming the tokens of ``where`` the figure font cannot draw, else ``[]``."""
    missing = undrawable_tokens(tokens)
    if not missing:
        return []
    names = ", ".join(repr(t) for t in missing[:shown])
    more = f" and {len(missing) - shown} more" if len(missing) > shown else ""
    font = ", ".join(figure_fonts()[0])
    return [
        f"{where}: {len(missing)} tokens have characters the figure font ({font}) has no glyph "
        f"for, shown escaped (\\uXXXX) in the figures: {names}{more}"
    ]
