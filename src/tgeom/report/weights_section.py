"""Report section 2: weights in embedding space [DAR] — head atlas, FFN neurons, logit lens."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tgeom.report import html as H
from tgeom.report.build import ReportContext, Section

if TYPE_CHECKING:
    from tgeom.analyses.embedding.atlas import HeadAtlas

ATLAS_NOTE = (
    "Top entries of each head's QK (row = query token, column = key token) and OV (row = "
    "attended token, column = token promoted in the output) matrix, found exactly without "
    "forming the V x V matrix. Dar et al. found many heads readable this way (e.g. OV heads that "
    "copy or map a token to related tokens)."
)


def pairs_figure_block(n_blocks: int) -> int:
    """The block whose head 0 gets the top-pairs figures."""
    return n_blocks // 2


def atlas_vocabulary(ctx: ReportContext) -> tuple[list[int] | None, torch.Tensor]:
    """The atlas' tokens: the ids of the ``atlas_vocab`` most frequent corpus tokens (None: the
    whole vocabulary) and the ``[V]`` bool mask of them, special tokens dropped."""
    from tgeom.analyses.embedding.filters import frequent_token_ids, token_mask

    include = None
    if ctx.sized.atlas_vocab is not None:
        include = frequent_token_ids(ctx.windows, int(ctx.sized.atlas_vocab)).tolist()
    return include, token_mask(ctx.lm, include_ids=include)


def weights_atlas(ctx: ReportContext) -> HeadAtlas:
    """The exact top ``atlas_k`` QK and OV pairs of every head over :func:`atlas_vocabulary`,
    computed once per run and shared with the head atlas."""
    from tgeom.analyses.embedding.atlas import head_atlas

    def compute() -> HeadAtlas:
        mask = atlas_vocabulary(ctx)[1]
        with ctx.progress.stage("head atlas (exact QK/OV top pairs)"):
            return head_atlas(
                ctx.lm.weights(),
                ctx.options.atlas_k,
                vocab=ctx.lm.vocab_strings,
                blocks=ctx.options.atlas_blocks,
                row_mask=mask,
                col_mask=mask,
                quiet=ctx.progress.quiet,
            )

    return ctx.shared("weights_atlas", compute)


def weights_section(ctx: ReportContext) -> Section:
    from tgeom.analyses.embedding.filters import token_mask
    from tgeom.analyses.embedding.interaction import head_top_pairs
    from tgeom.analyses.embedding.lens import logit_lens
    from tgeom.analyses.embedding.projection import project_parameter
    from tgeom.plots.embedding import logit_lens_figure, top_pairs_figure
    from tgeom.plots.glyphs import glyph_warnings

    lm, opts = ctx.lm, ctx.sized
    cw = lm.weights()
    vocab = lm.vocab_strings
    include, mask = atlas_vocabulary(ctx)
    no_special = token_mask(lm)
    atlas = weights_atlas(ctx)
    rows = [
        (r.block, r.head, r.circuit, r.rank, r.row_token, r.col_token, r.value) for r in atlas.rows
    ]
    subset = (
        f"rows and columns restricted to the {len(include)} most frequent corpus tokens"
        if include is not None
        else "whole vocabulary"
    )
    parts = [
        "<h3>Head atlas</h3>",
        f'<p class="note">{H.esc(ATLAS_NOTE)} Special tokens dropped; {H.esc(subset)}; '
        f"E = {H.esc(atlas.embedding)}.</p>",
    ]
    for note in (atlas.rope_note, atlas.qk_norm_note, atlas.softcap_note):
        if note:
            parts.append(f'<p class="note">Note: {H.esc(note)}</p>')
    parts.append(
        H.table(
            rows,
            ["block", "head", "circuit", "rank", "row token", "column token", "value"],
            table_id="atlas",
            searchable=True,
            token_columns=(4, 5),
            scroll=True,
        )
    )
    block = pairs_figure_block(len(cw.layers))
    drawn: list[str] = []  # every token a figure draws (PNG text: the font decides its glyphs)
    for circuit in ("qk", "ov"):
        pairs = head_top_pairs(cw, block, 0, circuit, 20, row_mask=mask, col_mask=mask)
        drawn += [p[side] for p in pairs.pairs(vocab) for side in ("row_token", "col_token")]
        parts.append(
            ctx.save_figure(
                top_pairs_figure(pairs, vocab),
                f"top-pairs-{circuit}-block{block}-head0",
                f"Largest {circuit.upper()} entries of block {block}, head 0 ({subset}).",
            )
        )
    neuron_rows, neuron_records = [], []
    generator = torch.Generator().manual_seed(opts.seed)
    d_mlp = cw.summary.d_mlp
    for block_index in range(len(cw.layers)):
        picks = torch.randperm(d_mlp, generator=generator)[: opts.neurons_per_block].tolist()
        for neuron in sorted(picks):
            record = {"block": block_index, "neuron": neuron}
            for side in ("key", "value"):
                proj = project_parameter(
                    lm, block=block_index, neuron=neuron, side=side, k=8, mask=no_special
                )
                record[side] = [r["token"] for r in proj.top.records()]
            neuron_records.append(record)
            neuron_rows.append(
                (block_index, neuron, " | ".join(record["key"]), " | ".join(record["value"]))
            )
    parts += [
        "<h3>FFN neurons</h3>",
        '<p class="note">Top tokens of a random sample of neurons per block: the key (column of '
        "W_in) and the value (row of W_out), raw parameters projected on the unembedding. Geva "
        "et al. and Dar et al. found values that promote coherent token sets in upper blocks.</p>",
        H.table(
            neuron_rows,
            ["block", "neuron", "key: top tokens", "value: top tokens"],
            table_id="neurons",
            searchable=True,
            token_columns=(2, 3),
            scroll=True,
        ),
    ]
    with ctx.progress.stage("logit lens"):
        lens = logit_lens(lm, opts.lens_text, k=5, mask=no_special)
    drawn += [*lens.tokens, *(pos[0] for state in lens.top_tokens for pos in state)]
    parts += [
        "<h3>Logit lens</h3>",
        f'<p class="note">Text: {H.token_span(opts.lens_text)}</p>',
        ctx.save_figure(
            logit_lens_figure(lens),
            "logit-lens",
            "Top-1 token of final_norm(hidden[h]) @ W_U.T at each hidden state (rows; 0 = the "
            "embedding output, h = the output of block h-1) and position (columns); colour is its "
            "score. Predictions typically sharpen in the upper hidden states.",
        ),
    ]
    results = {
        "atlas": atlas.to_json(include_rows=True),
        "atlas_vocabulary": subset,
        "neurons": neuron_records,
        "logit_lens": {
            "text": opts.lens_text,
            "tokens": lens.tokens,
            "top1_by_hidden": [[pos[0] for pos in state] for state in lens.top_tokens],
        },
    }
    warnings = glyph_warnings(drawn, "top-pairs and logit-lens figures")
    return Section(
        "weights", "Weights in embedding space", "".join(parts), results, warnings=warnings
    )
