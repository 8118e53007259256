"""The report's sections, in page order. Each takes the shared context and returns a Section."""

from __future__ import annotations

from dataclasses import asdict

from tgeom.report import html as H
from tgeom.report.build import (
    AUTO,
    CPU_BUDGET,
    ReportContext,
    ReportOptions,
    Section,
    SectionBuilder,
    environment,
)


def default_sections() -> list[tuple[str, SectionBuilder]]:
    from tgeom.report.geometry_section import geometry_section
    from tgeom.report.heads_section import heads_section
    from tgeom.report.identifiability_section import identifiability_section
    from tgeom.report.weights_section import weights_section

    return [
        ("model", model_card),
        ("weights", weights_section),
        ("geometry", geometry_section),
        ("identifiability", identifiability_section),
        ("heads", heads_section),
    ]


def model_card(ctx: ReportContext) -> Section:
    """Architecture summary, corpus summary, options and versions."""
    lm, windows = ctx.lm, ctx.windows
    summary = asdict(lm.summary)
    counts = windows.counts_by_topic()
    corpus = {
        "source": ctx.corpus_source,
        "seq_len": windows.seq_len,
        "n_windows": int(windows.token_ids.shape[0]),
        "n_skipped_docs": windows.n_skipped_docs,
        "windows_by_topic": counts,
    }
    parts = [
        '<div class="cols"><div>',
        "<h3>Architecture</h3>",
        H.key_values([("model", lm.source), *summary.items()]),
        "</div><div>",
        "<h3>Corpus</h3>",
        H.key_values([(k, v) for k, v in corpus.items() if k != "windows_by_topic"]),
        H.table(sorted(counts.items()), ["topic", "windows"], table_id="corpus-topics"),
        "</div><div>",
        "<h3>Options</h3>",
        f'<p class="note">{H.esc(SIZES_NOTE)}</p>',
        H.key_values(_options_rows(ctx)),
        "<h3>Versions</h3>",
        H.key_values(environment().items()),
        "</div></div>",
    ]
    return Section(
        "model-card",
        "Model card",
        "".join(parts),
        {
            "architecture": summary,
            "corpus": corpus,
            "options_used": asdict(ctx.sized),
            "sized": sized_options(ctx.options),
            "cpu_budget": CPU_BUDGET,
        },
    )


SIZES_NOTE = (
    "Options marked 'sized' were set from this model's architecture by the report's rule "
    "(ReportOptions.sized_for; README, 'The report'): atlas tokens N with N^2 * blocks * heads * "
    "d_head within SmolLM2's work at 4,096 tokens (1,024 to 4,096); null-space sequences up to "
    "max(seq_len, 2 * d_head) tokens, as many as keep the squared length of 64 sequences of "
    "seq_len (at least 16)."
)


def sized_options(options: ReportOptions) -> list[str]:
    """Names of the options the rule sized (left at AUTO by the caller)."""
    return [k for k, v in asdict(options).items() if v == AUTO]


def _options_rows(ctx: ReportContext) -> list[tuple[str, object]]:
    sized = set(sized_options(ctx.options))
    return [(k, f"{v} (sized)" if k in sized else v) for k, v in asdict(ctx.sized).items()]
