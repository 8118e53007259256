"""Report section 4: identifiability [BRU] — null spaces, effective attention, attribution."""

from __future__ import annotations

from typing import Any

from tgeom.report.build import ReportContext, Section


def effective_figure_block(n_blocks: int) -> int:
    """The block whose head 0 gets the raw vs effective attention figure: the last."""
    return n_blocks - 1


def identifiability_section(ctx: ReportContext) -> Section:
    from tgeom.analyses.identifiability import (
        NullSpaceResult,
        effective_attention,
        token_attribution,
        token_identifiability,
    )
    from tgeom.analyses.identifiability.sequences import varied_length_batch
    from tgeom.plots import identifiability as P

    lm, opts = ctx.lm, ctx.sized
    windows = ctx.windows.token_ids[: opts.identify_sequences]
    long_windows = ctx.spread_windows(int(opts.null_seq_len), int(opts.null_sequences))
    ids, mask = varied_length_batch(lm, long_windows)
    with ctx.progress.stage(
        f"identifiability: null spaces and effective attention ({len(ids)} sequences of "
        f"8..{opts.null_seq_len} tokens)"
    ):
        effective = effective_attention(lm, ids, mask)
        nulls = NullSpaceResult.from_sequences(
            effective.sequences, lm.summary.d_head, lm.summary.attention_windows
        )
    with ctx.progress.stage(
        f"identifiability: token identifiability ({len(windows)} sequences of "
        f"{windows.shape[1]} tokens)"
    ):
        ident = token_identifiability(lm, windows, seed=opts.seed, hidden=_hidden(lm, opts))
    with ctx.progress.stage(f"identifiability: attribution ({opts.attribution_mode})"):
        attribution = token_attribution(
            lm,
            windows[0, : opts.attribution_tokens],
            mode=opts.attribution_mode,
            samples=opts.attribution_samples,
            seed=opts.seed,
        )
    block = effective_figure_block(lm.summary.n_layers)  # it writes hidden L, shown below
    hidden = block + 1
    parts = [
        '<p class="note">Brunner et al. (2020): when a sequence is longer than the head '
        "dimension, the value-output map of a head has a non-trivial left null space, so many "
        "attention matrices give the same output; effective attention removes that part.</p>",
        ctx.save_figure(
            P.plot_pearson_vs_length(effective),
            "pearson-vs-length",
            "Pearson correlation between raw and effective attention against sequence length: "
            "the paper found it falls as sequences grow past d_head.",
        ),
        ctx.save_figure(
            P.plot_effective_attention(effective, block, 0),
            f"effective-attention-block{block}-head0",
            f"Raw (left) and effective (right) attention of block {block}, head 0, for the first "
            "sequence.",
        ),
        ctx.save_figure(
            P.plot_token_types(effective),
            "token-types",
            "Mean attention to special tokens, punctuation and other tokens, raw vs effective: "
            "the paper found attention to [SEP]/[CLS] largely vanishes in effective attention.",
        ),
        ctx.save_figure(
            P.plot_identifiability(ident),
            "token-identifiability",
            "Share of tokens whose hidden state h (0 = the embedding output, h = the output of "
            "block h-1) maps back to their own input among "
            "the sequence's inputs, per mapping g and distance: the paper found high rates, "
            "falling with depth.",
        ),
        ctx.save_figure(
            P.plot_attribution(attribution, hidden),
            f"attribution-hidden{hidden}",
            f"Hidden token attribution at hidden state {hidden} (the last block's output): row "
            "i shows how much each input token j contributes to hidden token i (gradient "
            "norms, rows sum to 1).",
        ),
        ctx.save_figure(
            P.plot_own_contribution(attribution),
            "own-contribution",
            "Mean contribution of a token's own input to its hidden state, by hidden state, and "
            "the share of tokens whose top contributor is another token.",
        ),
    ]
    results = {
        "null_space": nulls.to_json(),
        "effective_attention": _summary_only(effective.to_json()),
        "token_identifiability": ident.to_json(),
        "attribution": attribution.to_json(),
    }
    warnings = list(dict.fromkeys([*nulls.warnings, *effective.warnings, *ident.warnings]))
    return Section("identifiability", "Identifiability", "".join(parts), results, warnings=warnings)


def _hidden(lm: Any, opts: Any) -> list[int] | None:
    """Evenly spread hidden states 0..L (always 0 and L) when the options limit their number."""
    L, n = lm.summary.n_layers, opts.identify_hidden
    if n is None or n >= L + 1:
        return None
    return sorted({round(i * L / (n - 1)) for i in range(n)})


def _summary_only(data: dict) -> dict:
    """Drop the per-head matrices (large) from the effective-attention results."""
    return {k: v for k, v in data.items() if k not in ("heads", "raw", "effective", "matrices")}
