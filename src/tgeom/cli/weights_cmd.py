"""``tgeom weights ...``: weights in embedding space [DAR] (SPEC section 3).

``project`` (a neuron's key/value or a subhead as tokens), ``topk`` (exact top pairs of one head's
QK or OV matrix), ``atlas`` (every head), ``lens`` (logit lens of a text). Each writes
``results.json`` (and figures) into ``--out DIR`` and prints a short table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import typer
from rich.console import Console

from tgeom.cli import app
from tgeom.cli.options import BLOCK_MEANING, DEVICE_MAP_OPT, DTYPE_OPT, int_list, renamed_layer
from tgeom.cli.output import print_table, print_warnings
from tgeom.errors import TgeomError
from tgeom.runtime import DtypeName

weights_app = typer.Typer(
    help="Weights in embedding space: projections, QK/OV top pairs, atlas.", no_args_is_help=True
)
app.add_typer(weights_app, name="weights")

MODEL_ARG = typer.Argument(
    ..., help="Alias (minilm, smollm2, gemma3), local folder, .gguf or hub id."
)
OUT_OPT = typer.Option(..., "--out", help="Folder for results.json and figures.")
K_OPT = typer.Option(20, "--k", help="How many tokens / pairs to report.")
ASCII_OPT = typer.Option(
    False,
    "--ascii-only",
    help="Keep only tokens whose decoded text is ASCII (the decoded text, not the raw vocabulary "
    "entry: a byte-level BPE newline token, raw 'Ċ', decodes to ASCII and is kept).",
)
ALPHA_OPT = typer.Option(False, "--alpha-only", help="Keep only alphabetic tokens.")
SPECIAL_OPT = typer.Option(
    False, "--keep-special", help="Keep special tokens (dropped by default)."
)
EMBED_OPT = typer.Option(
    "out", "--embedding", help="Vocabulary matrix: out (W_U; W_E without an LM head) or in (W_E)."
)
PAIR_EMBED_OPT = typer.Option(
    "out",
    "--embedding",
    help="Vocabulary matrices: out (W_U on both sides; W_E without an LM head) or in (W_E): "
    "one matrix, as Dar et al.; tl: W_E for the tokens entering the head (QK rows and columns, "
    "OV rows), W_U for the tokens it promotes (OV columns), as TransformerLens.",
)
REMOTE_OPT = typer.Option(False, "--trust-remote-code", help="Allow the model author's code.")
SUMMARY_ROWS = 20  # rows a terminal summary shows; a last line says where the rest are
FREQUENT_OPT = typer.Option(
    None,
    "--frequent",
    help="Report only the N most frequent tokens of --frequent-corpus (rare fragments such as "
    "half words otherwise swamp exact top pairs); default: the whole vocabulary.",
)
FREQUENT_CORPUS_OPT = typer.Option(
    None,
    "--frequent-corpus",
    help="Corpus whose tokens --frequent counts: text file, folder, .jsonl, hf:NAME or builtin "
    "(default builtin).",
)


def _load(model: str, trust_remote_code: bool, dtype: str, device_map: str | None) -> Any:
    from tgeom.models import load_model

    return load_model(
        model, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code
    )


def _vocabulary(
    lm: Any,
    keep_special: bool,
    ascii_only: bool,
    alpha_only: bool,
    frequent: int | None,
    frequent_corpus: str | None,
) -> Any:
    """The :class:`~tgeom.analyses.embedding.filters.VocabularySubset` the options ask for."""
    from tgeom.analyses.embedding.filters import vocabulary_subset

    if frequent_corpus is not None and frequent is None:
        raise TgeomError("--frequent-corpus needs --frequent N (how many frequent tokens).")
    return vocabulary_subset(
        lm,
        drop_special=not keep_special,
        ascii_only=ascii_only,
        alpha_only=alpha_only,
        frequent=frequent,
        corpus=frequent_corpus or "builtin",
    )


def _print_vocabulary(vocabulary: Any) -> None:
    typer.echo(f"vocabulary: {vocabulary.description}")


def _filters(keep_special: bool, ascii_only: bool, alpha_only: bool) -> dict[str, Any]:
    from tgeom.analyses.embedding.filters import ASCII_TEST

    return {
        "drop_special": not keep_special,
        "ascii_only": ascii_only,
        "ascii_test": ASCII_TEST,
        "alpha_only": alpha_only,
    }


def _embedding(name: str) -> Literal["out", "in"]:
    if name not in ("out", "in"):
        raise TgeomError(f"--embedding must be out (W_U) or in (W_E), got {name!r}.")
    return "out" if name == "out" else "in"


def _pair_embedding(name: str) -> str:
    if name not in ("out", "in", "tl"):
        raise TgeomError(
            f"--embedding must be out (W_U), in (W_E) or tl (W_E in, W_U out), got {name!r}."
        )
    return name


def _circuits(text: str | None) -> list[str]:
    """``None`` -> both circuits; ``"ov"`` or ``"qk,ov"`` -> those."""
    if text is None:
        return ["qk", "ov"]
    chosen = [c.strip().lower() for c in text.split(",") if c.strip()]
    if not chosen or any(c not in ("qk", "ov") for c in chosen):
        raise TgeomError(f"--circuit must be qk, ov or qk,ov, got {text!r}.")
    return chosen


def _pair(text: str, what: str) -> tuple[int, int]:
    """``"L:N"`` -> ``(L, N)``."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise TgeomError(f"--{what} must look like BLOCK:INDEX (e.g. 3:17), got {text!r}.")
    return int(parts[0]), int(parts[1])


def _describe(parameter: dict[str, Any]) -> str:
    if parameter["kind"] == "neuron":
        return f"block {parameter['block']} neuron {parameter['neuron']} {parameter['side']}"
    return (
        f"block {parameter['block']} head {parameter['head']} "
        f"{parameter['subhead']}[{parameter['index']}]"
    )


@weights_app.command("project")
def project(
    model: str = MODEL_ARG,
    neuron: str | None = typer.Option(None, "--neuron", help="FFN neuron BLOCK:NEURON."),
    side: str = typer.Option("key", "--side", help="key (W_in column), gate, value (W_out row)."),
    head: str | None = typer.Option(None, "--head", help="Attention head BLOCK:HEAD."),
    subhead: str = typer.Option("v", "--subhead", help="q, k, v (columns) or o (W_O row)."),
    index: int = typer.Option(0, "--index", help="Subhead index within d_head."),
    k: int = K_OPT,
    fold_norm: bool = typer.Option(False, "--fold-norm", help="Fold the preceding norm's gain."),
    embedding: str = EMBED_OPT,
    ascii_only: bool = ASCII_OPT,
    alpha_only: bool = ALPHA_OPT,
    keep_special: bool = SPECIAL_OPT,
    frequent: int | None = FREQUENT_OPT,
    frequent_corpus: str | None = FREQUENT_CORPUS_OPT,
    out: Path = OUT_OPT,
    trust_remote_code: bool = REMOTE_OPT,
    dtype: DtypeName = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
) -> None:
    """Project one parameter vector (FFN key/value or a subhead) to its top and bottom tokens."""
    from tgeom.analyses.embedding.projection import project_parameter
    from tgeom.results import write_results

    if (neuron is None) == (head is None):
        raise TgeomError("pass exactly one of --neuron BLOCK:NEURON or --head BLOCK:HEAD.")
    if neuron is not None:
        block, n = _pair(neuron, "neuron")
        which: dict[str, Any] = {"neuron": n, "side": side}
    else:
        block, h = _pair(head or "", "head")
        which = {"head": h, "subhead": subhead, "index": index}
    lm = _load(model, trust_remote_code, dtype, device_map)
    vocabulary = _vocabulary(lm, keep_special, ascii_only, alpha_only, frequent, frequent_corpus)
    mask = vocabulary.mask
    result = project_parameter(
        lm,
        block=block,
        **which,
        k=k,
        mask=mask,
        embedding=_embedding(embedding),
        fold_norm=fold_norm,
    )
    payload = {
        **lm.identity,
        "k": k,
        "filters": _filters(keep_special, ascii_only, alpha_only),
        "vocabulary": vocabulary.to_json(),
    }
    write_results(out, "weights project", {**payload, **result.to_json()})
    top, bottom = result.top.records(), result.bottom.records()
    print_table(
        f"{lm.source}: {_describe(result.parameter)} read through {result.embedding}",
        ["rank", "top token", "score", "bottom token", "score"],
        [
            [a["rank"], a["token"], a["score"], b["token"], b["score"]]
            for a, b in zip(top, bottom, strict=False)
        ],
        limit=SUMMARY_ROWS,
        rest_in=str(Path(out) / "results.json"),
    )
    _print_vocabulary(vocabulary)


@weights_app.command("topk")
def topk(
    model: str = MODEL_ARG,
    block: int = typer.Option(..., "--block", help="Block (0..L-1)."),
    head: int = typer.Option(..., "--head", help="Head (0-based)."),
    circuit: str = typer.Option("ov", "--circuit", help="qk or ov."),
    k: int = K_OPT,
    negative: bool = typer.Option(False, "--negative", help="Most negative entries instead."),
    embedding: str = PAIR_EMBED_OPT,
    ascii_only: bool = ASCII_OPT,
    alpha_only: bool = ALPHA_OPT,
    keep_special: bool = SPECIAL_OPT,
    frequent: int | None = FREQUENT_OPT,
    frequent_corpus: str | None = FREQUENT_CORPUS_OPT,
    out: Path = OUT_OPT,
    trust_remote_code: bool = REMOTE_OPT,
    dtype: DtypeName = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
    _layer: str | None = renamed_layer("--block", BLOCK_MEANING),
) -> None:
    """Exact top entries of one head's QK or OV matrix in token space (never materialised)."""
    from tgeom.analyses.embedding.interaction import head_top_pairs
    from tgeom.plots.embedding import save_figure, top_pairs_figure
    from tgeom.plots.glyphs import glyph_warnings
    from tgeom.results import prepare_out_dir, write_results

    if circuit not in ("qk", "ov"):
        raise TgeomError(f"--circuit must be qk or ov, got {circuit!r}.")
    lm = _load(model, trust_remote_code, dtype, device_map)
    vocabulary = _vocabulary(lm, keep_special, ascii_only, alpha_only, frequent, frequent_corpus)
    mask = vocabulary.mask
    result = head_top_pairs(
        lm.weights(),
        block,
        head,
        circuit,
        k,
        largest=not negative,
        row_mask=mask,
        col_mask=mask,
        E=_pair_embedding(embedding),
    )
    vocab = lm.vocab_strings
    payload = {
        **lm.identity,
        "family": lm.family,
        "k": k,
        "negative": negative,
        "filters": _filters(keep_special, ascii_only, alpha_only),
        "vocabulary": vocabulary.to_json(),
        **result.to_json(vocab),
    }
    drawn = [p[side] for p in payload["pairs"] for side in ("row_token", "col_token")]
    warnings = glyph_warnings(drawn, "top_pairs.png")
    write_results(out, "weights topk", payload, warnings=warnings)
    save_figure(top_pairs_figure(result, vocab), prepare_out_dir(out) / "top_pairs.png")
    print_warnings(warnings)
    print_table(
        f"{lm.source}: {circuit.upper()} block {block} head {head}"
        f" ({'most negative' if negative else 'largest'}; E = {result.embedding})",
        ["rank", "row token", "col token", "value"],
        [[i, p["row_token"], p["col_token"], p["value"]] for i, p in enumerate(payload["pairs"])],
        limit=SUMMARY_ROWS,
        rest_in=str(Path(out) / "results.json"),
    )
    _print_vocabulary(vocabulary)
    for note in (result.rope_note, result.qk_norm_note, result.softcap_note):
        if note:
            Console(stderr=True).print(f"note: {note}")


@weights_app.command("atlas")
def atlas(
    model: str = MODEL_ARG,
    k: int = typer.Option(10, "--k", help="Pairs per head and circuit."),
    blocks: str | None = typer.Option(None, "--blocks", help="Comma-separated blocks (all)."),
    heads: str | None = typer.Option(
        None, "--heads", "--head", help="Comma-separated heads of each chosen block (all)."
    ),
    circuit: str | None = typer.Option(None, "--circuit", help="qk, ov or qk,ov (both)."),
    negative: bool = typer.Option(False, "--negative", help="Most negative entries instead."),
    embedding: str = PAIR_EMBED_OPT,
    ascii_only: bool = ASCII_OPT,
    alpha_only: bool = ALPHA_OPT,
    keep_special: bool = SPECIAL_OPT,
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    frequent: int | None = FREQUENT_OPT,
    frequent_corpus: str | None = FREQUENT_CORPUS_OPT,
    out: Path = OUT_OPT,
    trust_remote_code: bool = REMOTE_OPT,
    dtype: DtypeName = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
    _layers: str | None = renamed_layer("--blocks", "comma-separated blocks 0..L-1", "--layers"),
) -> None:
    """Top QK and OV pairs of every chosen head, as one table (atlas.csv + results.json)."""
    from tgeom.analyses.embedding.atlas import head_atlas
    from tgeom.results import prepare_out_dir, write_results

    chosen, chosen_heads = int_list(blocks, "--blocks"), int_list(heads, "--heads")
    circuits = _circuits(circuit)
    lm = _load(model, trust_remote_code, dtype, device_map)
    vocabulary = _vocabulary(lm, keep_special, ascii_only, alpha_only, frequent, frequent_corpus)
    mask = vocabulary.mask
    result = head_atlas(
        lm.weights(),
        k,
        vocab=lm.vocab_strings,
        blocks=chosen,
        heads=chosen_heads,
        circuits=circuits,
        largest=not negative,
        row_mask=mask,
        col_mask=mask,
        E=_pair_embedding(embedding),
        quiet=quiet,
    )
    folder = prepare_out_dir(out)
    result.to_csv(folder / "atlas.csv")
    payload = {
        **lm.identity,
        "family": lm.family,
        "filters": _filters(keep_special, ascii_only, alpha_only),
        "vocabulary": vocabulary.to_json(),
        "csv": "atlas.csv",
        **result.to_json(),
    }
    write_results(out, "weights atlas", payload)
    best = [r for r in result.rows if r.rank == 0]
    print_table(
        f"{lm.source}: head atlas (top pair per head, {len(result.rows)} rows in atlas.csv; "
        f"E = {result.embedding})",
        ["block", "head", "circuit", "row token", "col token", "value"],
        [[r.block, r.head, r.circuit, r.row_token, r.col_token, r.value] for r in best],
        limit=SUMMARY_ROWS,
        rest_in=f"{folder / 'atlas.csv'} (its rank-0 rows)",
    )
    _print_vocabulary(vocabulary)


@weights_app.command("lens")
def lens(
    model: str = MODEL_ARG,
    text: str = typer.Option(..., "--text", help="The text to read at every hidden state."),
    k: int = typer.Option(5, "--k", help="Top tokens per hidden state and position."),
    ascii_only: bool = ASCII_OPT,
    alpha_only: bool = ALPHA_OPT,
    keep_special: bool = typer.Option(
        True, "--keep-special/--drop-special", help="Special tokens."
    ),
    frequent: int | None = FREQUENT_OPT,
    frequent_corpus: str | None = FREQUENT_CORPUS_OPT,
    out: Path = OUT_OPT,
    trust_remote_code: bool = REMOTE_OPT,
    dtype: DtypeName = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
) -> None:
    """Logit lens: final_norm(hidden[h]) @ W_U.T at every hidden state 0..L and position."""
    from tgeom.analyses.embedding.lens import logit_lens
    from tgeom.plots.embedding import logit_lens_figure, save_figure
    from tgeom.plots.glyphs import glyph_warnings
    from tgeom.results import prepare_out_dir, write_results

    lm = _load(model, trust_remote_code, dtype, device_map)
    filtered = ascii_only or alpha_only or not keep_special
    vocabulary = _vocabulary(lm, keep_special, ascii_only, alpha_only, frequent, frequent_corpus)
    mask = vocabulary.mask if filtered or frequent is not None else None
    result = logit_lens(lm, text, k, mask=mask)
    payload = {
        **lm.identity,
        "family": lm.family,
        "k": k,
        "filters": _filters(keep_special, ascii_only, alpha_only),
        "vocabulary": vocabulary.to_json(),
        **result.to_json(),
    }
    drawn = [*result.tokens, *(pos[0] for state in result.top_tokens for pos in state)]
    warnings = glyph_warnings(drawn, "logit_lens.png")
    write_results(out, "weights lens", payload, warnings=warnings)
    save_figure(logit_lens_figure(result), prepare_out_dir(out) / "logit_lens.png")
    print_warnings(warnings)
    last = len(result.tokens) - 1
    print_table(
        f"{lm.source}: logit lens at the last position ({result.tokens[last]!r})",
        ["hidden", "top tokens"],
        [
            [hidden, " | ".join(result.top_tokens[hidden][last])]
            for hidden in range(result.n_hidden)
        ],
    )
    _print_vocabulary(vocabulary)
