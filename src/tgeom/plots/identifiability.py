"""Figures for identifiability [BRU]; each takes a result object and returns a Figure.

Every title names the sample: the sequences and tokens the numbers come from."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tgeom.analyses.identifiability.effective import TOKEN_TYPES
from tgeom.plots import BLOCK_AXIS, HIDDEN_AXIS


def _labels(tokens: list[str], limit: int = 14) -> list[str]:
    shown = [t.replace("$", r"\$").replace("\n", "\\n")[:limit] for t in tokens]
    return shown


def sequences_and_tokens(lengths: list[int]) -> str:
    """``"S sequences, N tokens"`` (``"1 sequence of N tokens"`` for one)."""
    if len(lengths) == 1:
        return f"1 sequence of {lengths[0]} tokens"
    return f"{len(lengths)} sequences, {sum(lengths)} tokens"


def plot_effective_attention(result: Any, block: int, head: int, sequence: int = 0) -> Figure:
    """Raw (left) and effective (right) attention of one head for one sequence.

    When the head's null space is trivial (``null_dim`` 0: ``T = V W_O`` has full rank d_s,
    which needs d_s <= d_head; in a sliding-window layer, full rank on every query's window,
    which needs windows of at most d_head keys), effective attention equals raw attention by
    construction; a note under the panels says so, so two identical panels do not read as a
    fault."""
    seq = result.sequences[sequence]
    raw, eff = seq.raw[block, head].numpy(), seq.effective[block, head].numpy()
    null_dim = int(seq.null_dim[block, head])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    limit = float(max(np.abs(raw).max(), np.abs(eff).max(), 1e-12))
    for ax, matrix, title in ((axes[0], raw, "raw"), (axes[1], eff, "effective")):
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(f"{title} attention, block {block} head {head}", fontsize=9)
        ax.set_xlabel("key token")
        n = matrix.shape[0]
        if n <= 40:
            labels = _labels(result.tokens[sequence])
            ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(n), labels, fontsize=6)
    axes[0].set_ylabel("query token")
    fig.colorbar(image, ax=axes, shrink=0.8)
    n = raw.shape[-1]
    fig.suptitle(
        f"{sequences_and_tokens([n])} (sequence {sequence}), d_head {result.d_head}: "
        f"null-space dimension {null_dim}",
        fontsize=9,
    )
    windows = getattr(result, "windows", ())
    window = windows[block] if windows and 0 < windows[block] < n else 0
    if null_dim == 0:
        why = (
            f"every query sees at most {window} keys (sliding window) <= d_head {result.d_head} "
            "and V W_O has full rank on each window"
            if window
            else f"{n} tokens <= d_head {result.d_head} and V W_O has full rank {n}"
        )
        fig.text(
            0.5,
            0.005,
            f"The panels are identical by construction: {why}, so the null space is trivial: "
            "effective = raw attention.",
            ha="center",
            fontsize=8,
            color="#8a3b12",
        )
    return fig


def plot_pearson_vs_length(result: Any) -> Figure:
    """Pearson(raw, effective), averaged over heads, against sequence length, one line per block."""
    r = result.pearson.values.numpy()  # [S, L, H]
    lengths = np.array(result.lengths)
    order = np.argsort(lengths, kind="stable")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    cmap = plt.get_cmap("viridis")
    L = r.shape[1]
    for block in range(L):
        ax.plot(
            lengths[order],
            np.nanmean(r[order, block], axis=1),
            "o-",
            ms=3,
            color=cmap(block / max(L - 1, 1)),
            label=f"block {block}" if L <= 12 else None,
        )
    ax.axvline(result.d_head, color="grey", ls="--", lw=1, label="d_head")
    ax.set_xlabel("sequence length d_s")
    ax.set_ylabel("Pearson(raw, effective)")
    ax.set_title(
        f"Raw vs effective attention by length ({sequences_and_tokens(list(result.lengths))}; "
        "mean over heads)",
        fontsize=9,
    )
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def plot_token_types(result: Any) -> Figure:
    """Mean attention (signed) to each token type, raw vs effective, averaged over heads."""
    types = result.token_type_attention
    raw, eff = types["raw_signed"].mean(1).numpy(), types["effective_signed"].mean(1).numpy()
    L = raw.shape[0]
    fig, axes = plt.subplots(1, len(TOKEN_TYPES), figsize=(12, 3.2), sharey=False)
    x = np.arange(L)
    for k, (ax, name) in enumerate(zip(axes, TOKEN_TYPES, strict=True)):
        ax.bar(x - 0.2, raw[:, k], 0.4, label="raw")
        ax.bar(x + 0.2, eff[:, k], 0.4, label="effective")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(BLOCK_AXIS)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("mean attention (signed)")
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.suptitle(
        "Attention to each token type, mean over heads and queries "
        f"({sequences_and_tokens(list(result.lengths))})",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def plot_identifiability(result: Any) -> Figure:
    """Identification rate by hidden state, one line per mapping g and distance."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for row in result.rows:
        series.setdefault((row["g"], row["distance"]), []).append((row["hidden"], row["rate"]))
    for (g, kind), points in sorted(series.items()):
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, "o-" if kind == "cosine" else "s--", ms=3, label=f"{g}, {kind}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(HIDDEN_AXIS)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("share of tokens identified")
    ax.legend(fontsize=7)
    counts = result.options.get("n_sequences", {})
    tested = max((row["n_tokens"] for row in result.rows), default=0)
    ax.set_title(
        f"Token identifiability: {counts.get('test', '?')} test sequences, {tested} test tokens"
        f"\n(g fitted on {counts.get('train', '?')} sequences, "
        f"{result.options.get('n_train_tokens', '?')} tokens; candidates: "
        f"{result.options.get('candidates', '?')})",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def plot_attribution(result: Any, hidden: int) -> Figure:
    """Contribution map c^l_ij of hidden state ``hidden`` (row: hidden token i, column: input
    token j)."""
    c = result.contributions[hidden].numpy()
    fig, ax = plt.subplots(figsize=(5.6, 5))
    image = ax.imshow(c, cmap="magma", vmin=0)
    n = c.shape[0]
    if n <= 40:
        labels = _labels(result.tokens)
        ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(n), labels, fontsize=6)
    ax.set_xlabel("input token j")
    ax.set_ylabel("hidden token i")
    ax.set_title(
        f"hidden token attribution, hidden {hidden} ({result.mode}; {sequences_and_tokens([n])})",
        fontsize=9,
    )
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def plot_own_contribution(result: Any) -> Figure:
    """Mean own-token contribution and share of tokens whose top contributor is another."""
    rows = result.per_hidden()
    hidden = [r["hidden"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot(hidden, [r["own_contribution"] for r in rows], "o-", label="mean own contribution")
    ax.plot(
        hidden,
        [r["top_contributor_not_own"] for r in rows],
        "s--",
        label="share with another top contributor",
    )
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(HIDDEN_AXIS)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    ax.set_title(
        f"Own-token contribution by hidden state ({result.mode}; "
        f"{sequences_and_tokens([len(result.tokens)])})",
        fontsize=9,
    )
    fig.tight_layout()
    return fig
