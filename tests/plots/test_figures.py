"""Figures say what they show: distinct topic colours, legends off the data, axes on the
informative range, the sample size in every title, and a note where two panels coincide."""

from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from tgeom.analyses.geometry import GeometryStats, measure
from tgeom.analyses.identifiability import effective_attention, token_attribution
from tgeom.analyses.identifiability.identify import IdentifiabilityResult
from tgeom.plots import geometry as G
from tgeom.plots import identifiability as P
from tgeom.plots.colors import distinct_colors


@pytest.fixture(autouse=True)
def _close_figures():  # type: ignore[no-untyped-def]
    yield
    plt.close("all")


def texts(fig: Figure) -> str:
    """Every title and free text of a figure, joined."""
    parts = [ax.get_title() for ax in fig.axes] + [t.get_text() for t in fig.texts]
    if fig._suptitle is not None:
        parts.append(fig._suptitle.get_text())
    return " | ".join(parts)


def assert_legend_beside(fig: Figure, ax) -> None:  # type: ignore[no-untyped-def]
    """The legend of ``ax`` lies right of every axes (never over data) and inside the image."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    legend = ax.get_legend().get_window_extent(renderer)
    assert all(legend.x0 >= other.get_window_extent(renderer).x1 for other in fig.axes)
    assert legend.x1 <= fig.bbox.x1 and legend.y0 >= fig.bbox.y0


def geometry(n_topics: int, per_topic: int = 3, T: int = 12, d: int = 24):  # type: ignore[no-untyped-def]
    """A measured GeometryResult of random hidden states [2, C, T, d] with T < d."""
    gen = torch.Generator().manual_seed(0)
    topic_ids = torch.arange(n_topics).repeat_interleave(per_topic)
    centres = torch.randn(n_topics, d, generator=gen, dtype=torch.float64)
    hidden = centres[topic_ids][None, :, None] + torch.randn(
        2, len(topic_ids), T, d, generator=gen, dtype=torch.float64
    )
    topics = [f"topic {i}" for i in range(n_topics)]
    return measure(GeometryStats.from_hidden(hidden, topic_ids, topics))


def min_distance(colors: list[tuple[float, float, float]]) -> float:
    rgb = np.array(colors)
    return min(float(np.linalg.norm(a - b)) for a, b in itertools.combinations(rgb, 2))


@pytest.mark.parametrize("n", [12, 25])
def test_distinct_colors_are_pairwise_far_apart(n: int) -> None:
    colors = distinct_colors(n)
    assert len(colors) == n and len(set(colors)) == n
    # tab10's closest pair is 0.265 apart in RGB; no colour added after it comes closer.
    assert min_distance(colors) >= 0.26
    assert colors[:10] == [tuple(c) for c in plt.get_cmap("tab10").colors]


@pytest.mark.parametrize("n_topics", [12, 25])
def test_context_map_colours_every_topic_apart_with_the_legend_outside(n_topics: int) -> None:
    result = geometry(n_topics)
    fig = G.plot_context_map(result, 1)
    ax = fig.axes[0]
    colours = [tuple(c.get_facecolor()[0][:3]) for c in ax.collections]
    assert len(colours) == n_topics and min_distance(colours) >= 0.26
    assert_legend_beside(fig, ax)
    assert f"{3 * n_topics} windows × 12 positions, {n_topics} topics" in texts(fig)


def test_spectra_axis_spans_the_informative_values_not_the_structural_zero() -> None:
    result = geometry(3)
    ratios = [s / s[0] for s in result.pos_singular_values]
    # The pos_t sum to zero over t: P [12, 24] has rank 11, its last singular value is ~0.
    assert all(r[-1] < 1e-12 for r in ratios)
    informative = min(float(r[r >= G.SPECTRUM_FLOOR].min()) for r in ratios)
    fig = G.plot_spectra(result)
    bottom, top = fig.axes[0].get_ylim()
    assert informative / 2.5 < bottom <= informative and top >= 1.0
    drawn = np.concatenate([line.get_ydata() for line in fig.axes[0].get_lines()])
    assert drawn.min() == pytest.approx(informative)
    assert "not drawn" in texts(fig) and "9 windows × 12 positions" in texts(fig)


def test_every_geometry_figure_names_its_sample() -> None:
    result = geometry(3)
    shares = G.plot_variance_shares(result)
    for fig in (
        shares,
        G.plot_spiral_2d(result, 1),
        G.plot_spectra(result),
        G.plot_gram_dct(result, 1),
        G.plot_context_map(result, 1),
        G.plot_pos_ctx_cosines(result, 1),
    ):
        assert "9 windows × 12 positions" in texts(fig)
    assert_legend_beside(shares, shares.axes[0])
    assert "9 windows × 12 positions" in G.plot_spiral_3d(result, 1).layout.title.text


def test_identifiability_figure_names_its_sample() -> None:
    rows = [
        {"hidden": layer, "g": g, "distance": "cosine", "rate": 1.0 - 0.1 * layer, "n_tokens": 96}
        for layer in range(3)
        for g in ("identity", "linear")
    ]
    options = {
        "candidates": "sequence",
        "n_sequences": {"train": 14, "validation": 3, "test": 3},
        "n_train_tokens": 448,
    }
    title = texts(P.plot_identifiability(IdentifiabilityResult(rows, options)))
    assert "3 test sequences, 96 test tokens" in title
    assert "14 sequences, 448 tokens" in title


def test_effective_attention_notes_panels_that_coincide_by_construction(tiny_model):  # type: ignore[no-untyped-def]
    lm = tiny_model("bert")  # d_head 8
    ids = torch.randint(4, 90, (1, 14), generator=torch.Generator().manual_seed(0))
    short = effective_attention(lm, ids[:, :6])
    seq = short.sequences[0]
    assert torch.equal(seq.raw[1, 2].double(), seq.effective[1, 2].double())
    text = texts(P.plot_effective_attention(short, 1, 2))
    assert "identical by construction" in text and "6 tokens <= d_head 8" in text
    assert "1 sequence of 6 tokens" in text
    long = effective_attention(lm, ids)
    assert int(long.sequences[0].null_dim[1, 2]) == 14 - 8
    text = texts(P.plot_effective_attention(long, 1, 2))
    assert "identical" not in text and "1 sequence of 14 tokens" in text
    windowed = tiny_model("mistral")  # windows of 4 keys, d_head 16, 20 distinct tokens
    distinct = torch.randperm(92, generator=torch.Generator().manual_seed(0))[None, :20] + 4
    text = texts(P.plot_effective_attention(effective_attention(windowed, distinct), 1, 0))
    assert "identical by construction: every query sees at most 4 keys" in text
    assert "20 tokens <=" not in text


def test_corpus_and_text_figures_name_their_sample(tiny_model):  # type: ignore[no-untyped-def]
    lm = tiny_model("bert")
    ids = torch.randint(4, 90, (3, 10), generator=torch.Generator().manual_seed(1))
    result = effective_attention(lm, ids)
    assert "3 sequences, 30 tokens" in texts(P.plot_pearson_vs_length(result))
    types = P.plot_token_types(result)
    assert "3 sequences, 30 tokens" in texts(types)
    assert_legend_beside(types, types.axes[-1])
    attribution = token_attribution(lm, ids[:1, :5])
    assert "1 sequence of 5 tokens" in texts(P.plot_attribution(attribution, 1))
    assert "1 sequence of 5 tokens" in texts(P.plot_own_contribution(attribution))
