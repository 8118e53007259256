"""Figures for the [DAR] comparisons: validation, alignment, stitching, fine-tuning diffs.

Each function takes a result object and returns a matplotlib ``Figure`` (no pyplot state, no
computation beyond laying out what the result holds).
"""

from __future__ import annotations

import math

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tgeom.analyses.embedding.alignment import AlignmentResult
from tgeom.analyses.embedding.finetune import FinetuningDiff
from tgeom.analyses.embedding.stitching import StitchingResult
from tgeom.analyses.embedding.validation import RKResult, SimKResult
from tgeom.plots import BLOCK_AXIS


def plot_alignment(result: AlignmentResult) -> Figure:
    """One heatmap per parameter group (and their mean, and the raw-coordinate mean):
    mean |rho| of (block of A, block of B); dots mark the Hungarian matching."""
    panels = [(g, result.similarity[g], result.block_matching[g]) for g in [*result.groups, "mean"]]
    if result.raw_similarity is not None and result.raw_block_matching is not None:
        panels.append(
            (
                "raw coordinates (mean)",
                result.raw_similarity["mean"],
                result.raw_block_matching["mean"],
            )
        )
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.4 * cols, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (title, matrix, matching) in zip(axes.flat, panels, strict=False):
        image = ax.imshow(matrix.cpu().numpy(), cmap="viridis", origin="lower", aspect="auto")
        ax.scatter([b for _, b in matching], [a for a, _ in matching], s=12, c="red", marker="o")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("block of B")
        ax.set_ylabel("block of A")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(image, ax=ax, shrink=0.8, label="mean |rho|")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    per_block = result.options.get("per_block")
    drawn = "all vectors" if per_block is None else f"up to {per_block} vectors"
    fig.suptitle(
        f"Vocabulary-space similarity of parameters (Pearson across V; {drawn} per block and group)"
    )
    return fig


def plot_stitching(result: StitchingResult) -> Figure:
    """Accuracy against the split hidden state h, one line per classifier run, with chance."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for run in result.runs:
        (line,) = ax.plot(run.hidden, run.accuracy, marker="o", label=f"{run.name} (stitched)")
        ax.axhline(run.own_accuracy, color=line.get_color(), ls=":", lw=1)
    ax.axhline(result.chance, color="gray", ls="--", label="chance (majority class)")
    ax.set_xlabel("split hidden state h (A's first h blocks, then B's)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(
        f"Stitching through the embedding space, {result.n_eval} windows (dotted: B alone)",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    return fig


def plot_validation(rk: RKResult | None, simk: SimKResult | None) -> Figure:
    """R_k and Sim_k per block, each against its shuffled baseline."""
    panels = [p for p in (rk, simk) if p is not None]
    fig = Figure(figsize=(5.5 * max(1, len(panels)), 4), layout="constrained")
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    index = 0
    if rk is not None:
        ax = axes[index]
        for group, values in rk.overlap.items():
            blocks = list(range(len(values)))
            (line,) = ax.plot(blocks, values, marker="o", label=group)
            ax.plot(blocks, rk.shuffled[group], ls="--", color=line.get_color())
        ax.set_title(
            f"R_k, {rk.definition} (k={rk.k}, top {rk.n_neurons}; dashed: baseline)\n"
            f"{rk.n_positions} positions",
            fontsize=9,
        )
        ax.set_xlabel(BLOCK_AXIS)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("|A ∩ B| / k" if rk.definition == "paper" else "shared tokens per neuron")
        ax.legend(fontsize=8)
        index += 1
    if simk is not None:
        ax = axes[index]
        for pair, values in simk.similarity.items():
            (line,) = ax.plot(range(len(values)), values, marker="o", label=pair)
            ax.plot(range(len(values)), simk.shuffled[pair], ls="--", color=line.get_color())
        pairs = ", ".join(f"{p} {n}" for p, n in simk.n_pairs.items())
        ax.set_title(
            f"Sim_k, {simk.definition} (k={simk.k}; dashed: shuffled pairs)\n"
            f"pairs per block: {pairs}",
            fontsize=9,
        )
        ax.set_xlabel(BLOCK_AXIS)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("Jaccard overlap")
        ax.legend(fontsize=8)
    return fig


def plot_finetuning_diff(diff: FinetuningDiff) -> Figure:
    """Norm of ``theta_ft - theta_pt`` per block for each parameter group."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for group, norms in diff.group_norms.items():
        ax.plot(range(len(norms)), norms, marker="o", label=group)
    ax.set_xlabel(BLOCK_AXIS)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("||theta_ft - theta_pt|| (Frobenius)")
    ax.set_title("How much fine-tuning moved each parameter group (weights only)")
    ax.legend(fontsize=8)
    return fig
