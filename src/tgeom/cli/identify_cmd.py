"""``tgeom attention ...`` and ``tgeom identify ...``: identifiability [BRU] (SPEC section 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from tgeom.cli import app
from tgeom.cli.options import BLOCK_MEANING, DEVICE_MAP_OPT, DTYPE_OPT, renamed_layer
from tgeom.cli.output import print_warnings
from tgeom.runtime import DtypeName

attention_app = typer.Typer(
    help="Attention null spaces and effective attention.", no_args_is_help=True
)
identify_app = typer.Typer(
    help="Token identifiability and hidden token attribution.", no_args_is_help=True
)
app.add_typer(attention_app, name="attention")
app.add_typer(identify_app, name="identify")

MODEL_ARG = typer.Argument(
    ..., help="Alias (minilm, smollm2, gemma3), local folder, .gguf or hub id."
)
OUT_OPT = typer.Option(..., "--out", help="Folder for results.json and figures.")
TEXT_OPT = typer.Option(..., "--text", help="The text to analyse (special tokens are added).")
CORPUS_OPT = typer.Option("builtin", "--corpus", help="Corpus source (default: built-in).")
SEQ_OPT = typer.Option(64, "--seq-len", help="Tokens per window.")
MAXW_OPT = typer.Option(4, "--max-windows-per-topic", help="Windows per topic.")
REMOTE_OPT = typer.Option(False, "--trust-remote-code", help="Allow the model author's code.")


def _text_ids(lm: Any, text: str) -> Any:
    return lm.encode_text(text, min_tokens=2)


def _windows(lm: Any, corpus: str, seq_len: int, per_topic: int) -> Any:
    from tgeom.corpus import load_corpus, make_windows

    docs = load_corpus(corpus)
    windows = make_windows(
        docs, lm.tokenizer, seq_len, max_windows_per_topic=per_topic, max_context=lm.summary.n_ctx
    )
    return docs, windows


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


@attention_app.command("effective")
def effective_cmd(
    model: str = MODEL_ARG,
    text: str = TEXT_OPT,
    out: Path = OUT_OPT,
    block: int = typer.Option(0, "--block", help="Block (0..L-1) drawn in the figure."),
    head: int = typer.Option(0, "--head", help="Head drawn in the figure."),
    trust_remote_code: bool = REMOTE_OPT,
    dtype: DtypeName = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
    _layer: str | None = renamed_layer("--block", BLOCK_MEANING),
) -> None:
    """Raw and effective attention of every block and head for one text."""
    from tgeom.analyses.identifiability import effective_attention
    from tgeom.errors import check_index
    from tgeom.models import load_model
    from tgeom.plots import identifiability as P
    from tgeom.results import prepare_out_dir, write_results

    lm = load_model(model, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
    check_index("block", block, lm.summary.n_layers)
    check_index("head", head, lm.summary.n_heads)
    result = effective_attention(lm, _text_ids(lm, text))
    out_dir = prepare_out_dir(out)
    payload = {**lm.identity, "text": text, **result.to_json()}
    write_results(out_dir, "attention effective", payload, warnings=result.warnings)
    _save(P.plot_effective_attention(result, block, head), out_dir / "effective_attention.png")
    seq = result.sequences[0]
    typer.echo(
        f"{len(seq.token_ids)} tokens, d_head {lm.summary.d_head}: null-space dimension "
        f"{int(seq.null_dim.min())}..{int(seq.null_dim.max())} over heads; "
        f"Pearson(raw, effective) mean {float(result.pearson.nanmean()):.3f} -> {out_dir}"
    )
    print_warnings(result.warnings)


@attention_app.command("nullspace")
def nullspace_cmd(
    model: str = MODEL_ARG,
    out: Path = OUT_OPT,
    corpus: str = CORPUS_OPT,
    seq_len: int = SEQ_OPT,
    max_windows_per_topic: int = MAXW_OPT,
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Sequences per forward pass (default 8 on CPU, 32 on GPU)."
    ),
    trust_remote_code: bool = REMOTE_OPT,
    dtype: DtypeName = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
) -> None:
    """Null-space dimension of every head over a corpus' windows, and Pearson vs length.

    Runs sharded under ``torchrun --nproc-per-node N -m tgeom attention nullspace ...`` (gloo on
    CPU, nccl on GPU): each rank takes whole batches, rank 0 writes the result."""
    from tgeom.analyses.identifiability.sequences import varied_length_batch
    from tgeom.analyses.identifiability.survey import attention_survey
    from tgeom.capture.distributed import shard_from_env
    from tgeom.models import load_model
    from tgeom.plots import identifiability as P
    from tgeom.results import prepare_out_dir, write_results
    from tgeom.runtime import Runtime

    lm = load_model(model, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
    docs, windows = _windows(lm, corpus, seq_len, max_windows_per_topic)
    # Prefixes of the windows with lengths spread from 8 to T, wrapped in [CLS]/[SEP] (encoders)
    # or BOS (decoders), so dims and Pearson read against length and special tokens show.
    ids, mask = varied_length_batch(lm, windows.token_ids)
    lengths = mask.sum(1).tolist()
    shard = shard_from_env()
    nulls, effective = attention_survey(lm, ids, mask, Runtime.auto(batch_size), shard)
    if not shard.is_main:  # rank 0 alone writes and reports
        return
    out_dir = prepare_out_dir(out)
    write_results(
        out_dir,
        "attention nullspace",
        {
            **lm.identity,
            "corpus": docs.source,
            "world_size": shard.world_size,
            "null_space": nulls.to_json(),
            "effective": effective.to_json(),
        },
        warnings=nulls.warnings,
    )
    _save(P.plot_pearson_vs_length(effective), out_dir / "pearson_vs_length.png")
    _save(P.plot_token_types(effective), out_dir / "token_types.png")
    typer.echo(
        f"{len(nulls.lengths)} sequences, lengths {min(lengths)}..{max(lengths)} -> {out_dir}"
    )
    print_warnings(nulls.warnings)


@identify_app.command("tokens")
def tokens_cmd(
    model: str = MODEL_ARG,
    out: Path = OUT_OPT,
    corpus: str = CORPUS_OPT,
    seq_len: int = SEQ_OPT,
    max_windows_per_topic: int = typer.Option(
        6, "--max-windows-per-topic", help="Windows per topic (built-in: 72, 10 to test)."
    ),
    candidates: str = typer.Option("sequence", "--candidates", help="sequence or vocabulary."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split and the MLP."),
    trust_remote_code: bool = REMOTE_OPT,
    dtype: DtypeName = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
) -> None:
    """Share of hidden tokens mapped back to their own input, per hidden state, g and distance."""
    from tgeom.analyses.identifiability import token_identifiability
    from tgeom.models import load_model
    from tgeom.plots import identifiability as P
    from tgeom.results import prepare_out_dir, write_results

    lm = load_model(model, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
    docs, windows = _windows(lm, corpus, seq_len, max_windows_per_topic)
    result = token_identifiability(lm, windows.token_ids, candidates=candidates, seed=seed)
    out_dir = prepare_out_dir(out)
    payload = {**lm.identity, "corpus": docs.source, **result.to_json()}
    write_results(out_dir, "identify tokens", payload, warnings=result.warnings)
    _save(P.plot_identifiability(result), out_dir / "identifiability.png")
    last = [r for r in result.rows if r["hidden"] == lm.summary.n_layers]
    summary = ", ".join(f"{r['g']}/{r['distance']} {r['rate']:.2f}" for r in last)
    typer.echo(f"last hidden state: {summary} -> {out_dir}")
    print_warnings(result.warnings)


@identify_app.command("attribution")
def attribution_cmd(
    model: str = MODEL_ARG,
    text: str = TEXT_OPT,
    out: Path = OUT_OPT,
    mode: str = typer.Option("exact", "--mode", help="exact (forward-mode JVPs) or estimate."),
    samples: int = typer.Option(64, "--samples", help="Random tangents per token (estimate)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random tangents."),
    hidden: int | None = typer.Option(
        None, "--hidden", help="Hidden state (0 = embeddings .. L) drawn in the figure (default L)."
    ),
    trust_remote_code: bool = REMOTE_OPT,
    dtype: DtypeName = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
) -> None:
    """Contribution of every input token to every hidden token, at every hidden state."""
    from tgeom.analyses.identifiability import token_attribution
    from tgeom.errors import check_index
    from tgeom.models import load_model
    from tgeom.plots import identifiability as P
    from tgeom.results import prepare_out_dir, write_results

    lm = load_model(model, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
    shown = lm.summary.n_layers if hidden is None else hidden
    check_index("hidden state", shown, lm.summary.n_layers + 1)
    result = token_attribution(lm, _text_ids(lm, text), mode=mode, samples=samples, seed=seed)
    out_dir = prepare_out_dir(out)
    write_results(
        out_dir, "identify attribution", {**lm.identity, "text": text, **result.to_json()}
    )
    _save(P.plot_attribution(result, shown), out_dir / "attribution.png")
    _save(P.plot_own_contribution(result), out_dir / "own_contribution.png")
    last = result.per_hidden()[-1]
    typer.echo(
        f"last hidden state: own contribution {last['own_contribution']:.3f}, "
        "top contributor not own "
        f"{last['top_contributor_not_own']:.2f} -> {out_dir}"
    )
