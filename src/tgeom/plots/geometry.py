"""Figures of hidden-state geometry [SZ] (SPEC section 4): result in, figure out.

Each function draws arrays a :class:`~tgeom.analyses.geometry.GeometryResult` already holds and
returns a matplotlib Figure, except :func:`plot_spiral_3d` (a plotly Figure, interactive).
Every title names the sample: C windows x T' positions.
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tgeom.plots import HIDDEN_AXIS
from tgeom.plots.colors import distinct_colors

# Singular values of P below this fraction of the largest are numerical zeros, never drawn: the
# pos_t sum to zero over t, so P [T', d] has rank at most T' - 1 (the last value is ~1e-16).
SPECTRUM_FLOOR = 1e-10


def sample_size(result: Any) -> str:
    """``"C windows x T' positions"`` of a GeometryResult."""
    return f"{len(result.topic_ids)} windows × {len(result.positions)} positions"


def plot_variance_shares(result: Any) -> Figure:
    """Stacked bars of the pos / ctx / resid variance shares by hidden state (0 = embeddings)."""
    hidden = [row["hidden"] for row in result.by_hidden]
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(hidden) + 2), 3.5))
    bottom = np.zeros(len(hidden))
    for key, label in (
        ("var_share_pos", "pos"),
        ("var_share_ctx", "ctx"),
        ("var_share_resid", "resid"),
    ):
        values = np.array([row[key] for row in result.by_hidden], dtype=float)
        ax.bar(hidden, values, bottom=bottom, label=label)
        bottom += values
    ax.set(xlabel=HIDDEN_AXIS, ylabel="share of variance", ylim=(0, 1))
    ax.set_title(f"Variance shares ({sample_size(result)})", fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)
    fig.tight_layout()
    return fig


def plot_spiral_2d(result: Any, hidden: int) -> Figure:
    """Top-2 principal coordinates of pos_t over t (colour = position)."""
    coords = result.pos_coords[result.check_hidden(hidden)]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(coords[:, 0], coords[:, 1], color="0.7", lw=0.8)
    points = ax.scatter(coords[:, 0], coords[:, 1], c=result.positions, cmap="viridis", s=14)
    fig.colorbar(points, ax=ax, label="position t")
    ax.set(xlabel="PC1", ylabel="PC2")
    ax.set_title(f"Positional part, hidden {hidden}\n({sample_size(result)})", fontsize=10)
    fig.tight_layout()
    return fig


def plot_spiral_3d(result: Any, hidden: int) -> Any:
    """Interactive 3-D plot (plotly) of the top-3 principal coordinates of pos_t."""
    import plotly.graph_objects as go

    coords = result.pos_coords[result.check_hidden(hidden)]
    trace = go.Scatter3d(
        x=coords[:, 0],
        y=coords[:, 1],
        z=coords[:, 2],
        mode="lines+markers",
        marker={
            "size": 3,
            "color": result.positions,
            "colorscale": "Viridis",
            "colorbar": {"title": "t"},
        },
        line={"color": "lightgray"},
        text=[f"t={t}" for t in result.positions],
    )
    fig = go.Figure(trace)
    fig.update_layout(
        title=f"Positional part, hidden {hidden} (top-3 PCs; {sample_size(result)})",
        scene={"xaxis_title": "PC1", "yaxis_title": "PC2", "zaxis_title": "PC3"},
    )
    return fig


def plot_spectra(result: Any) -> Figure:
    """Normalised singular values of the positional part, one line per hidden state (log scale).

    Values below :data:`SPECTRUM_FLOOR` of the largest (the structural zero) are left out, so
    the y-axis spans the informative values; a note under the axes says so."""
    fig, ax = plt.subplots(figsize=(6, 4))
    cmap = plt.get_cmap("viridis")
    n = len(result.pos_singular_values)
    drawn: list[float] = []
    for hidden, s in enumerate(result.pos_singular_values):
        if s.size and s[0] > 0:
            ratio = s / s[0]
            keep = ratio >= SPECTRUM_FLOOR
            ax.semilogy(
                np.arange(1, s.size + 1)[keep],
                ratio[keep],
                color=cmap(hidden / max(n - 1, 1)),
                lw=1,
            )
            drawn.append(float(ratio[keep].min()))
    if drawn:
        ax.set_ylim(min(drawn) / 2, 1.5)
    ax.set(xlabel="index i", ylabel="s_i / s_1")
    ax.set_title(f"Singular values of pos by hidden state ({sample_size(result)})", fontsize=10)
    norm = Normalize(0, max(n - 1, 1))
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="hidden state")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    fig.text(
        0.01,
        0.01,
        f"not drawn: s_i / s_1 < {SPECTRUM_FLOOR:.0e} (the pos_t sum to zero over t, so the "
        "last singular value is 0 by construction)",
        fontsize=7,
        color="0.35",
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def plot_gram_dct(result: Any, hidden: int) -> Figure:
    """The cosine Gram of pos_t and its orthonormal DCT-II (log |coefficient|)."""
    hidden = result.check_hidden(hidden)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    image = axes[0].imshow(result.gram[hidden], cmap="RdBu_r", vmin=-1, vmax=1)
    fig.colorbar(image, ax=axes[0])
    axes[0].set(title=f"cos(pos_s, pos_t), hidden {hidden}", xlabel="t", ylabel="s")
    dct = np.log10(np.abs(result.gram_dct[hidden]) + 1e-12)
    image = axes[1].imshow(dct, cmap="magma")
    fig.colorbar(image, ax=axes[1])
    axes[1].set(title="DCT-II of the Gram (log10 |.|)", xlabel="frequency", ylabel="frequency")
    fig.suptitle(sample_size(result), fontsize=9)
    fig.tight_layout()
    return fig


def plot_context_map(result: Any, hidden: int) -> Figure:
    """2-D map of ctx_c (PCA, or t-SNE when measured with ``ctx_map="tsne"``) by topic: one
    distinct colour per topic (:func:`distinct_colors`), the legend outside the axes."""
    coords = result.ctx_map[result.check_hidden(hidden)]
    ids = np.asarray(result.topic_ids)
    colors = distinct_colors(len(result.topics))
    columns = max(1, -(-len(result.topics) // 18))  # at most 18 topics per legend column
    fig, ax = plt.subplots(figsize=(5 + 1.6 * columns, 4))
    for index, topic in enumerate(result.topics):
        mask = ids == index
        ax.scatter(
            coords[mask, 0],
            coords[mask, 1],
            s=14,
            color=colors[index],
            label=f"{topic} ({int(mask.sum())})",
        )
    tsne = result.options.get("ctx_map") == "tsne"
    axes = ("t-SNE 1", "t-SNE 2") if tsne else ("PC1", "PC2")
    ax.set(xlabel=axes[0], ylabel=axes[1])
    ax.set_title(
        f"Context part, hidden {hidden}\n({sample_size(result)}, {len(result.topics)} topics)",
        fontsize=10,
    )
    ax.legend(
        title="topic (windows)",
        fontsize=7,
        title_fontsize=7,
        ncols=columns,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        borderaxespad=0.0,
    )
    fig.tight_layout()
    return fig


def plot_pos_ctx_cosines(result: Any, hidden: int) -> Figure:
    """Heatmap of cos(pos_t, ctx_c), windows sorted by topic."""
    hidden = result.check_hidden(hidden)
    cos = result.pos_ctx_cos[hidden]
    order = np.argsort(np.asarray(result.topic_ids), kind="stable")
    fig, ax = plt.subplots(figsize=(6, 4))
    limit = float(np.abs(cos).max()) or 1.0
    image = ax.imshow(cos[:, order], aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit)
    fig.colorbar(image, ax=ax)
    baseline = result.by_hidden[hidden]["random_baseline_mean"]
    ax.set(
        xlabel="window c (by topic)",
        ylabel="position t",
    )
    ax.set_title(
        f"cos(pos_t, ctx_c), hidden {hidden} (random mean |cos| {baseline:.3f})\n"
        f"({sample_size(result)})",
        fontsize=10,
    )
    fig.tight_layout()
    return fig
