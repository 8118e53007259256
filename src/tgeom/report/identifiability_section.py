"""Report section 4: identifiability [BRU] — null spaces, effective attention, attribution."""

from __future__ import annotations

from typing import Any

from tgeom.report.build import ReportContext, Section


def identifiability_section(ctx: ReportContext) -> Section:
    from tgeom.analyses.identifiability import (
        NullSpaceResult,
        effective_attention,
        token_attribution,
        token_identifiability,
    )
    from tgeom.analyses.identifiability.sequences import varied_length_batch
    from tgeom.plots import identifiability as P

    lm, opts = ctx.lm, ctx.options
    windows = ctx.windows.token_ids[: opts.identify_sequences]
    ids, mask = varied_length_batch(lm, windows)
    with ctx.progress.stage("identifiability: null spaces and effective attention"):
        effective = effective_attention(lm, ids, mask)
        nulls = NullSpaceResult.from_sequences(effective.sequences, lm.summary.d_head)
    with ctx.progress.stage("identifiability: token identifiability"):
        ident = token_identifiability(lm, windows, seed=opts.seed, layers=_layers(lm, opts))
    with ctx.progress.stage(f"identifiability: attribution ({opts.attribution_mode})"):
        attribution = token_attribution(
            lm,
            windows[0, : opts.attribution_tokens],
            mode=opts.attribution_mode,
            samples=opts.attribution_samples,
            seed=opts.seed,
        )
    n_layers = lm.summary.n_layers
    layer = n_layers - 1
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
            P.plot_effective_attention(effective, layer, 0),
            f"effective-attention-L{layer}H0",
            f"Raw (left) and effective (right) attention of layer {layer}, head 0, for the first "
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
            "Share of tokens whose hidden state at layer l maps back to their own input among "
            "the sequence's inputs, per mapping g and distance: the paper found high rates, "
            "falling with depth.",
        ),
        ctx.save_figure(
            P.plot_attribution(attribution, layer),
            f"attribution-L{layer}",
            f"Hidden token attribution at layer {layer}: row i shows how much each input token "
            "j contributes to hidden token i (gradient norms, rows sum to 1).",
        ),
        ctx.save_figure(
            P.plot_own_contribution(attribution),
            "own-contribution",
            "Mean contribution of a token's own input to its hidden state, by layer, and the "
            "share of tokens whose top contributor is another token.",
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


def _layers(lm: Any, opts: Any) -> list[int] | None:
    """Evenly spread layers (always 0 and the last) when the options limit their number."""
    L = lm.summary.n_layers
    if opts.identify_layers is None or opts.identify_layers >= L + 1:
        return None
    return sorted({round(i * L / (opts.identify_layers - 1)) for i in range(opts.identify_layers)})


def _summary_only(data: dict) -> dict:
    """Drop the per-head matrices (large) from the effective-attention results."""
    return {k: v for k, v in data.items() if k not in ("heads", "raw", "effective", "matrices")}
