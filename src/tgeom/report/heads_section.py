"""Report section 5: the head atlas (SPEC section 7) — the three papers joined, one row per head.

A sortable, filterable table of every head, a scatter of any two of its columns (coloured by a
third), the layer atlas, and a card per head with its top pairs, its QK split and its raw vs
effective attention, linked to the other sections' figures and tables of the same head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tgeom.report import html as H
from tgeom.report.interactive import frame_scatter, frame_table

if TYPE_CHECKING:
    import pandas as pd

    from tgeom.report.build import ReportContext, Section

TABLE_NOTE = (
    "One row per head: the weights [DAR] (ov_copying, qk_same_token: 1 when the head copies the "
    "attended token / attends to copies of itself), the key-side split of its logits [SZ] "
    "(positional, content, scale, cross), identifiability [BRU] (null_dim, "
    "pearson_raw_effective, first_token_raw, first_token_effective) and its behaviour on text "
    "(prev_token, induction, first_token, entropy); SPEC section 7 defines every column. Click "
    "a header to sort; type words or terms such as positional>0.8 block=3 to filter; the first "
    "cell opens the head's card. As in the rest of this report, a head's layer is named by its "
    "block (0-based; heads.csv calls the column layer)."
)
SCATTER_NOTE = (
    "Each point is one head, placed by the two columns picked above and coloured by the third; "
    "points that line up show scores that go together across heads, and clicking a point opens "
    "that head's card."
)
SPLIT_NOTE = (
    "Bars: the share of the variance of this head's logits over the keys a query sees that "
    "comes from the keys' positional part, their content (residual) part, their norm scale, "
    "and the covariances between these (cross; negative in red), SPEC section 4."
)
TOP_K = 5  # top QK and OV pairs per head (SPEC section 7)
SPLIT_PARTS = ("positional", "content", "scale", "cross", "alibi")
IDENTIFIABILITY = ("null_dim", "pearson_raw_effective", "first_token_raw", "first_token_effective")
BEHAVIOUR = ("prev_token", "induction", "first_token", "entropy")
SPECTRAL = ("ov_copying", "qk_same_token")
CARD_CSS = (
    "<style>.cards{max-height:620px;overflow:auto;border:1px solid #e1e4ea;padding:4px 10px}"
    ".cards details{border-bottom:1px solid #eef0f4;padding:3px 0}"
    ".cards details[open]{background:#fafbfc}.cards summary{cursor:pointer}"
    ".bar{display:inline-block;height:10px;background:#2563eb;vertical-align:middle}"
    ".bar.neg{background:#dc2626}.pairs{white-space:pre-wrap}</style>"
)


LAYER_ATLAS_NOTE = (
    "Per block (read at its output, hidden state block + 1), the tokens that each topic's mean "
    "context "
    "direction promotes most and the tokens at both ends of the top-2 positional directions, "
    "each read through the final norm and the unembedding: the reader sees what the topic and "
    "the position stored in that layer say in words."
)


def heads_section(ctx: ReportContext) -> Section:
    """The head atlas over the report's model and windows (SPEC section 7)."""
    from tgeom.analyses.heads.atlas import heads
    from tgeom.report.build import Section
    from tgeom.report.geometry_section import corpus_statistics
    from tgeom.report.weights_section import weights_atlas

    lm, opts = ctx.lm, ctx.sized  # atlas_vocab as the weights atlas sized it
    stats = corpus_statistics(ctx)  # the geometry section's, reused
    pairs = weights_atlas(ctx) if opts.atlas_k >= TOP_K and opts.atlas_blocks is None else None
    with ctx.progress.stage("head atlas: one row per head"):
        result = heads(
            lm,
            ctx.windows,
            k=TOP_K,
            # the weights atlas' tokens (sized: an int, or None for the whole vocabulary)
            frequent=None if opts.atlas_vocab is None else int(opts.atlas_vocab),
            pass_windows=opts.heads_windows,
            seed=opts.seed,
            progress=not ctx.progress.quiet,
            stats=stats,
            weights_atlas=pairs,
        )
    data = block_named(result.to_json())
    frame = result.to_frame().rename(columns={"layer": "block"})
    html = heads_html(
        frame,
        layer_atlas_html(data["atlas_by_block"]),
        head_links(lm.summary.n_layers, lm.summary.n_heads, opts.atlas_blocks),
    )
    return Section(
        "heads", "Head atlas", html, data, uses_plotly=True, warnings=list(result.warnings)
    )


def block_named(data: Any) -> Any:
    """``data`` with every ``layer`` key renamed ``block`` (a head's layer is its block) and
    the layer atlas' keys ``atlas_by_block...``: the report's results name block and
    hidden-state indices apart (issue 21), and each layer atlas entry holds both."""

    def name(key: str) -> str:
        if key == "layer":
            return "block"
        return key.replace("layer_atlas", "atlas_by_block").replace("layer atlas", "atlas by block")

    if isinstance(data, dict):
        return {name(k): block_named(v) for k, v in data.items()}
    if isinstance(data, list):
        return [block_named(v) for v in data]
    return data


def layer_atlas_html(atlas: Sequence[Mapping[str, Any]]) -> str:
    """The layer atlas (one entry per block, as :func:`block_named` gives the heads result's)
    as a filterable table: a row per topic direction and per end of each positional direction."""
    rows = []
    for entry in atlas:
        where = (entry["block"], entry["hidden"])
        for topic in entry.get("topics", []):
            rows.append(
                (*where, f"topic {topic['topic']}", topic["norm"], _tokens(topic["promotes"]))
            )
        for direction in entry.get("positional", []):
            for end, sign in (("plus", "+"), ("minus", "-")):
                what = f"positional {direction['direction'] + 1} ({sign})"
                rows.append((*where, what, direction["share"], _tokens(direction[end])))
    return (
        "<h3>Layer atlas</h3>"
        f'<p class="note">{H.esc(LAYER_ATLAS_NOTE)} The fourth column is the topic direction\'s '
        "norm, or the positional direction's share of ||P||<sup>2</sup>.</p>"
        + H.table(
            rows,
            ["block", "hidden", "direction", "norm or share", "promotes (best first)"],
            table_id="layer-atlas",
            searchable=True,
            token_columns=(4,),
            scroll=True,
            placeholder="filter: topic names, tokens, block=3 ...",
        )
    )


def _tokens(records: Sequence[Mapping[str, Any]]) -> str:
    return " | ".join(str(r["token"]) for r in records)


def card_id(block: int, head: int) -> str:
    """The anchor of a head's card."""
    return f"head-{block}-{head}"


def heads_html(
    frame: pd.DataFrame,
    layer_atlas: str,
    links: Mapping[tuple[int, int], Sequence[tuple[str, str, str]]],
) -> str:
    """The section's HTML from the heads table (one row per head, SPEC section 7's columns,
    ``block`` (heads.csv's ``layer``) and ``head`` first), the layer atlas' HTML and, per
    ``(block, head)``, the
    ``(href, text, filter)`` links to other sections' figures and tables of that head
    (``filter``: terms typed into the linked table's filter box on click, or ``""``)."""
    anchors = [f"#{card_id(int(r.block), int(r.head))}" for r in frame.itertuples()]
    labels = [f"block {int(r.block)} head {int(r.head)}" for r in frame.itertuples()]
    columns = list(frame.columns)
    x, y = _pick(columns, "positional"), _pick(columns, "prev_token")
    return "".join(
        [
            CARD_CSS,
            f'<p class="note">{H.esc(TABLE_NOTE)}</p>',
            frame_table(
                frame,
                "heads-table",
                token_columns=[c for c in ("top_qk", "top_ov") if c in columns],
                row_links=anchors,
            ),
            "<h3>Any two columns, head by head</h3>",
            frame_scatter(
                frame,
                "fig-heads-scatter",
                SCATTER_NOTE,
                labels=labels,
                x=x,
                y=y,
                color="block",
                links=anchors,
            ),
            layer_atlas,
            "<h3>Head cards</h3>",
            f'<p class="note">{H.esc(SPLIT_NOTE)}</p>',
            '<div class="cards">',
            *(
                head_card(row, links.get((int(row["block"]), int(row["head"])), ()))
                for row in frame.to_dict("records")
            ),
            "</div>",
        ]
    )


def head_card(row: Mapping[str, Any], links: Sequence[tuple[str, str, str]]) -> str:
    """One head's card (a ``<details>`` opened by its anchor): its spectral scores and top
    pairs, its QK split as bars, raw vs effective attention and behaviour, and links."""
    row = {k: float("nan") if v is None else v for k, v in row.items()}  # None: missing
    block, head = int(row["block"]), int(row["head"])
    summary = ", ".join(
        f"{name} {H.fmt(row[name], 3)}"
        for name in (*SPECTRAL, "positional", "prev_token")
        if name in row
    )
    pairs = "".join(
        f"<div><strong>{H.esc(name)}</strong> "
        f'<span class="tok pairs">{H.esc(row[name])}</span></div>'
        for name in ("top_qk", "top_ov")
        if name in row
    )
    bars = "".join(
        f'<tr><td>{H.esc(name)}</td><td class="num">{H.esc(H.fmt(row[name], 3))}</td>'
        f"<td>{_bar(row[name])}</td></tr>"
        for name in SPLIT_PARTS
        if name in row
    )
    link_items = "".join(
        f'<li><a href="{H.esc(href)}"'
        + (f' data-filter="{H.esc(filter_)}"' if filter_ else "")
        + f">{H.esc(text)}</a></li>"
        for href, text, filter_ in links
    )
    return (
        f'<details id="{card_id(block, head)}"><summary><strong>block {block} head {head}'
        f'</strong> <span class="note">{H.esc(summary)}</span></summary>'
        '<div class="cols"><div><h4>Weights: top pairs</h4>'
        f"{H.key_values((n, row[n]) for n in SPECTRAL if n in row)}{pairs}</div>"
        f'<div><h4>QK split (key side)</h4><table class="kv">{bars}</table></div>'
        "<div><h4>Raw vs effective attention</h4>"
        f"{H.key_values((n, row[n]) for n in IDENTIFIABILITY if n in row)}</div>"
        "<div><h4>Behaviour on text</h4>"
        f"{H.key_values((n, row[n]) for n in BEHAVIOUR if n in row)}</div>"
        f"<div><h4>Elsewhere in this report</h4><ul>{link_items}</ul></div></div></details>"
    )


def head_links(
    n_blocks: int, n_heads: int, atlas_blocks: Sequence[int] | None
) -> dict[tuple[int, int], list[tuple[str, str, str]]]:
    """Per head, the other sections' figures and tables that show it, as ``(href, text,
    filter)``: its rows of the weights atlas (when its block is in the atlas), the top-pairs
    figures, the geometry section's QK split table and the raw vs effective attention figure
    (each drawn for one block or head), and the length trend every head shares."""
    from tgeom.report.geometry_section import qk_split_block
    from tgeom.report.identifiability_section import effective_figure_block
    from tgeom.report.weights_section import pairs_figure_block

    atlas = set(range(n_blocks) if atlas_blocks is None else atlas_blocks)
    pairs, split, effective = (
        pairs_figure_block(n_blocks),
        qk_split_block(n_blocks),
        effective_figure_block(n_blocks),
    )
    links: dict[tuple[int, int], list[tuple[str, str, str]]] = {}
    for block in range(n_blocks):
        for head in range(n_heads):
            items = []
            if block in atlas:
                items.append(
                    (
                        "#atlas",
                        "its top QK/OV pairs in the weights atlas",
                        f"block={block} head={head}",
                    )
                )
            if (block, head) == (pairs, 0):
                items += [
                    (
                        f"#fig-top-pairs-{c}-block{block}-head0",
                        f"its largest {c.upper()} entries",
                        "",
                    )
                    for c in ("qk", "ov")
                ]
            if block == split:
                items += [
                    ("#qk-split", f"the QK split table of block {block}", ""),
                    (f"#fig-qk-four-part-block{block}", "the paper's four-part picture", ""),
                ]
            if (block, head) == (effective, 0):
                items.append(
                    (
                        f"#fig-effective-attention-block{block}-head0",
                        "its raw and effective attention",
                        "",
                    )
                )
            items.append(("#fig-pearson-vs-length", "Pearson(raw, effective) against length", ""))
            links[(block, head)] = items
    return links


def _bar(value: Any, width: int = 120) -> str:
    """A share in [-1, 1] as a bar ``width`` pixels long at 1 (red when negative)."""
    try:
        share = float(value)
    except (TypeError, ValueError):
        return ""
    if share != share:  # NaN
        return ""
    length = round(min(abs(share), 1.0) * width)
    return f'<span class="bar{" neg" if share < 0 else ""}" style="width:{length}px"></span>'


def _pick(columns: Sequence[str], preferred: str) -> str:
    return preferred if preferred in columns else columns[2]
