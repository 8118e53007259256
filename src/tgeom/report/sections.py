"""The report's sections, in page order. Each takes the shared context and returns a Section."""

from __future__ import annotations

from dataclasses import asdict

from tgeom.report import html as H
from tgeom.report.build import ReportContext, Section, SectionBuilder, environment


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
        H.key_values(asdict(ctx.options).items()),
        "<h3>Versions</h3>",
        H.key_values(environment().items()),
        "</div></div>",
    ]
    return Section(
        "model-card",
        "Model card",
        "".join(parts),
        {"architecture": summary, "corpus": corpus},
    )
