"""Figures for weights in embedding space [DAR]: one function per figure, result in, figure out.

Figures never compute: they draw what the result objects hold. Token strings are shown with
``$`` escaped (no mathtext), control characters made visible and characters the figure font has
no glyph for escaped (:mod:`tgeom.plots.glyphs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from tgeom.plots import HIDDEN_AXIS
from tgeom.plots.glyphs import drawable


def show_token(token: str, limit: int = 18, mathtext: bool = True) -> str:
    """A token as a safe one-line label: visible newlines/tabs, truncated, ``$`` escaped for
    mathtext labels (``mathtext=False`` for texts drawn with ``parse_math=False``)."""
    text = token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    text = "".join(ch if drawable(ch) else _escaped(ch) for ch in text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("$", r"\$") if mathtext else text


def _escaped(ch: str) -> str:
    """``\\x0b`` for a control character, ``\\u4e2d`` for one the figure font cannot draw."""
    code = ord(ch)
    return (
        f"\\x{code:02x}"
        if code < 0x100
        else f"\\u{code:04x}"
        if code < 0x10000
        else f"\\U{code:08x}"
    )


def top_pairs_figure(
    result: Any, vocab: Sequence[str] | None = None, max_pairs: int = 30
) -> Figure:
    """Horizontal bars of a head's top pairs (``InteractionPairs``): ``row -> col`` and value."""
    pairs = result.pairs(vocab)[:max_pairs]
    labels = [
        f"{show_token(p.get('row_token', str(p['row'])))} → "
        f"{show_token(p.get('col_token', str(p['col'])))}"
        for p in pairs
    ]
    values = [p["value"] for p in pairs]
    fig, ax = plt.subplots(figsize=(7, 0.28 * max(len(pairs), 4) + 1.2))
    y = np.arange(len(pairs))
    ax.barh(y, values, color="#3b6fb6" if result.largest else "#b63b3b")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    kind = "largest" if result.largest else "most negative"
    row_is, col_is = ("query", "key") if result.circuit == "qk" else ("source", "promoted")
    ax.set_title(
        f"{result.circuit.upper()} block {result.block} head {result.head}: {kind} entries "
        f"({row_is} → {col_is}, E = {result.embedding}; weights only, exact over all token "
        "pairs)",
        fontsize=9,
    )
    ax.set_xlabel("entry of the interaction matrix")
    fig.tight_layout()
    return fig


def logit_lens_figure(result: Any, max_positions: int = 40) -> Figure:
    """Heatmap hidden states x positions of the top-1 lens score, annotated with the top-1 token."""
    n_pos = min(len(result.tokens), max_positions)
    scores = result.top_scores[:, :n_pos, 0].numpy()
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * n_pos, 0.9 + 0.32 * scores.shape[0]))
    image = ax.imshow(scores, aspect="auto", cmap="viridis", origin="lower")
    for hidden in range(scores.shape[0]):
        for t in range(n_pos):
            ax.text(
                t,
                hidden,
                show_token(result.top_tokens[hidden][t][0], 8, mathtext=False),
                ha="center",
                va="center",
                fontsize=6,
                color="white",
                parse_math=False,
            )
    ax.set_xticks(range(n_pos), [show_token(tok, 10) for tok in result.tokens[:n_pos]])
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    ax.set_yticks(range(scores.shape[0]), [str(i) for i in range(scores.shape[0])], fontsize=7)
    ax.set_xlabel("input token (position)")
    ax.set_ylabel(HIDDEN_AXIS)
    shown = f"first {n_pos} of " if n_pos < len(result.tokens) else ""
    ax.set_title(
        f"logit lens: top-1 token per hidden state and position ({shown}1 text of "
        f"{len(result.tokens)} tokens)",
        fontsize=9,
    )
    fig.colorbar(image, ax=ax, label="top-1 logit")
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: Any) -> None:
    """Save ``fig`` as PNG at ``path`` and close it."""
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
