"""Figures of ``geometry qk`` (SPEC section 4, "Attention"): a QKResult in, a figure out.

:func:`plot_key_side_split` draws the numbers (the key-side split, one panel per part, blocks x
heads); :func:`plot_four_part_picture` draws the paper's four-part picture, whose caption says
its parts do not add up and are not shares.
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

SPLIT_CAPTION = (
    "Key-side variance split of each head's QK logits: the share of Var_s(logit) over the keys "
    "a query sees that comes from the keys' positional means (positional), their residuals "
    "(content), the window's mean, context and biases through the keys' own norm scales "
    "(scale){alibi}; cross = 1 - the others (covariances, can be negative)."
)


def _grid(values: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)


def _panels(
    blocks: list[int],
    rows: list[list[dict[str, Any]]],
    names: list[str],
    value: Any,
    title: str,
    cmap: str,
    vlim: Any,
) -> Figure:
    """One heatmap per name: ``value(head_row, name)`` for each block (``rows[i]``: block
    ``blocks[i]``'s head rows) and head."""
    width = max(6.0, (2.2 + 0.12 * len(rows[0])) * len(names))
    fig, axes = plt.subplots(
        1, len(names), figsize=(width, 1.6 + 0.22 * len(blocks)), squeeze=False
    )
    for ax, name in zip(axes[0], names, strict=True):
        grid = _grid([[value(h, name) for h in heads] for heads in rows])
        lo, hi = vlim(name, grid)
        image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="none")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("head")
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
        fig.colorbar(image, ax=ax, fraction=0.05)
    axes[0][0].set_ylabel("block")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_key_side_split(result: Any) -> Figure:
    """One heatmap per part of the split (blocks x heads): shares in [0, 1], cross centred on
    0."""
    names = list(result.by_block[0]["parts"])

    def vlim(name: str, grid: np.ndarray) -> tuple[float, float]:
        if name != "cross":
            return 0.0, 1.0
        bound = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
        return -max(bound, 1e-3), max(bound, 1e-3)

    sample = result.second_pass
    return _panels(
        result.blocks,
        [entry["heads"] for entry in result.by_block],
        names,
        lambda head, name: head[name],
        f"Key-side split of the QK logits ({sample['windows']} of {sample['of']} windows)",
        "viridis",
        vlim,
    )


def plot_four_part_picture(result: Any) -> Figure:
    """The paper's four-part picture: RMS of each part (blocks x heads), with its caption."""
    picture = result.by_block[0]["four_part_picture"]
    names = list(picture["parts"])

    def vlim(_name: str, grid: np.ndarray) -> tuple[float, float]:
        return 0.0, float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0

    return _panels(
        result.blocks,
        [entry["four_part_picture"]["heads"] for entry in result.by_block],
        names,
        lambda head, name: head[f"rms_{name}"],
        "The paper's four-part picture: RMS of each part (not shares; they do not add up)",
        "magma",
        vlim,
    )


def split_caption(result: Any) -> str:
    """The key-side split figure's caption (naming ALiBi's part where the model has it)."""
    alibi = ", ALiBi's bias (alibi)" if "alibi" in result.by_block[0]["parts"] else ""
    return SPLIT_CAPTION.format(alibi=alibi)


def close(fig: Figure) -> None:
    plt.close(fig)
