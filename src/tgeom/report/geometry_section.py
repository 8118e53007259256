"""Report section 3: hidden-state geometry [SZ] — positional / context decomposition."""

from __future__ import annotations

from typing import Any

from tgeom.report import html as H
from tgeom.report.build import ReportContext, Section

QK_WINDOWS = 32  # windows read a second time for the key-side QK split (an evenly spaced sample)

HIDDEN_COLUMNS = (
    ("hidden", "hidden"),
    ("var_share_pos", "pos share"),
    ("var_share_ctx", "ctx share"),
    ("var_share_resid", "resid share"),
    ("pos_stable_rank", "pos stable rank"),
    ("pos_rank_gavish_donoho", "pos est. rank (Gavish-Donoho)"),
    ("pos_rank_screenot", "pos est. rank (ScreeNOT, k=20)"),
    ("pos_explained_sq_top2", "pos top-2 share of s²"),
    ("pos_relative_norm_fro", "pos relative norm (Frobenius)"),
    ("pos_relative_norm_op", "pos relative norm (operator)"),
    ("ctx_within_cos_excl_self", "ctx |cos| within"),
    ("ctx_between_cos", "ctx |cos| between"),
    ("ctx_ari", "ctx ARI"),
    ("incoherence_max", "pos-ctx max |cos|"),
    ("incoherence_mean", "pos-ctx mean |cos|"),
    ("random_baseline_mean", "random mean |cos|"),
)


def shown_hidden(n_blocks: int) -> int:
    """The representative upper-middle hidden state (of 0..L) that gets its own plots."""
    return (n_blocks + 1) * 2 // 3


def qk_split_block(n_blocks: int) -> int:
    """The block whose heads' QK split the section tabulates (it reads that hidden state)."""
    return min(shown_hidden(n_blocks), n_blocks - 1)


def corpus_statistics(ctx: ReportContext) -> Any:
    """The [SZ] running sums of every hidden state over the report's windows (one forward pass
    per batch), computed once per run and shared with the head atlas."""
    from tgeom.analyses.geometry import collect_statistics

    def collect() -> Any:
        windows = ctx.windows
        with ctx.progress.stage(f"geometry: forward passes over {len(windows.token_ids)} windows"):
            return collect_statistics(ctx.lm, windows, progress=not ctx.progress.quiet)

    return ctx.shared("geometry_statistics", collect)


def geometry_section(ctx: ReportContext) -> Section:
    from tgeom.analyses.geometry import measure
    from tgeom.plots import geometry as P

    lm = ctx.lm
    stats = corpus_statistics(ctx)
    with ctx.progress.stage("geometry: measurements"):
        result = measure(stats, seed=ctx.options.seed)
    data = result.to_json()
    rows = data["by_hidden"]
    shown = shown_hidden(len(rows) - 1)  # rows: hidden states 0..L
    table_rows = [[row.get(key) for key, _ in HIDDEN_COLUMNS] for row in rows]
    parts = [
        '<p class="note">Each hidden state h[c, t] (hidden 0 = the embedding output, hidden l '
        "= the output of block l-1) over C windows x T positions is decomposed into"
        " global mean + positional means pos_t + context means ctx_c + residual, "
        "from streaming float64 sums (Song &amp; Zhong 2023). Position 0 is dropped.</p>",
        H.table(
            table_rows,
            [title for _, title in HIDDEN_COLUMNS],
            table_id="geometry-hidden",
            scroll=True,
        ),
        ctx.save_figure(
            P.plot_variance_shares(result),
            "variance-shares",
            "Share of the centred hidden-state variance in the positional, context and residual "
            "parts, by hidden state (they sum to 1).",
        ),
        H.plotly_figure(
            P.plot_spiral_3d(result, shown),
            f"Positional means of hidden state {shown} in their top-3 principal coordinates, "
            "coloured by position: the paper found a smooth, low-dimensional spiral.",
            fig_id="fig-spiral-3d",
        ),
        ctx.save_figure(
            P.plot_spiral_2d(result, shown),
            f"spiral-2d-hidden{shown}",
            f"Top-2 principal coordinates of the positional means at hidden state {shown}.",
        ),
        ctx.save_figure(
            P.plot_spectra(result),
            "pos-spectra",
            "Singular values of the positional matrix P by hidden state: a few dominate (low "
            "rank), as the paper found (stable rank ~2 in GPT-2).",
        ),
        ctx.save_figure(
            P.plot_gram_dct(result, shown),
            f"gram-dct-hidden{shown}",
            f"Cosine Gram of the positional means at hidden state {shown} and its 2-D DCT-II: "
            "energy in low frequencies means the positional part varies smoothly with t.",
        ),
        ctx.save_figure(
            P.plot_context_map(result, shown),
            f"context-map-hidden{shown}",
            f"Context means of hidden state {shown} (PCA), coloured by topic: the paper found "
            "clusters by topic.",
        ),
        ctx.save_figure(
            P.plot_pos_ctx_cosines(result, shown),
            f"pos-ctx-cos-hidden{shown}",
            f"|cos| between positional and context means at hidden state {shown}, against the "
            "random baseline sqrt(2/(pi d)): near-orthogonality means position and context are "
            "stored incoherently.",
        ),
    ]
    from tgeom.analyses.geometry.qk import qk_split
    from tgeom.plots import qk as Q

    qk_block = qk_split_block(lm.summary.n_layers)  # it reads hidden state qk_block
    with ctx.progress.stage(f"geometry: key-side QK split of block {qk_block}"):
        qk = qk_split(lm, stats, ctx.windows.token_ids, [qk_block], max_windows=QK_WINDOWS)
    entry = qk.by_block[0]
    sample = qk.second_pass
    parts += [
        f"<h3>Attention logits of block {qk_block} (reading hidden state {qk_block}): "
        "what the logits vary with over the keys</h3>",
        '<p class="note">For each query, the variance of its logits over the keys it sees, '
        "split exactly into the keys' positional means (positional), their residuals "
        "(content) and the window's mean and context seen through each key's own norm scale "
        "(scale); cross = 1 - the others. Averaged over queries; "
        f"{sample['windows']} of {sample['of']} windows read a second time. The last column "
        "is the share of ||W_QK||^2 inside the top-3 positional subspace.</p>",
        H.table(
            [
                [
                    r["head"],
                    *(r[p] for p in entry["parts"]),
                    pic["wqk_positional_share"],
                ]
                for r, pic in zip(entry["heads"], entry["four_part_picture"]["heads"], strict=True)
            ],
            ["head", *entry["parts"], "W_QK positional share"],
            table_id="qk-split",
        ),
        ctx.save_figure(
            Q.plot_four_part_picture(qk),
            f"qk-four-part-block{qk_block}",
            entry["four_part_picture"]["caption"],
        ),
    ]
    data["qk_split"] = qk.to_json()
    return Section(
        "geometry",
        "Hidden-state geometry",
        "".join(parts),
        data,
        uses_plotly=True,
        warnings=[*result.warnings, *qk.warnings],
    )
