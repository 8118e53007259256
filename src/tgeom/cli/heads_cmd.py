"""``tgeom heads MODEL --corpus C --out DIR``: the head atlas (SPEC section 7).

Writes ``DIR/heads.csv`` (one row per layer and head), ``DIR/results.json`` (the same rows, the
top pairs with their values, the layer atlas, model and corpus identity, options, warnings) and
the geometry statistics it collected (``DIR/geometry_stats.safetensors``, which ``tgeom
geometry measure DIR`` and ``geometry qk`` read too), and prints the top heads per score.
Under ``torchrun`` the corpus statistics are sharded across ranks; rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from tgeom.cli import app
from tgeom.cli.options import DTYPE_OPT, int_list
from tgeom.cli.output import print_table, print_warnings
from tgeom.runtime import DtypeName

SUMMARY_ROWS = 12  # head rows the terminal shows; a last line says where the rest are
TOP_PER_SCORE = 3


@app.command("heads")
def heads_cmd(
    model: str = typer.Argument(
        ..., help="Alias (minilm, smollm2, gemma3), local folder, .gguf or hub id."
    ),
    out: Path = typer.Option(..., "--out", help="Folder for heads.csv, results.json, stats."),
    corpus: str = typer.Option(
        "builtin", "--corpus", help="Text file, folder (topic = sub-folder), .jsonl, builtin."
    ),
    seq_len: int | None = typer.Option(
        None,
        "--seq-len",
        help="Tokens per window T (default 64, or d_head + 32 when longer: null spaces need "
        "more tokens than d_head).",
    ),
    max_windows_per_topic: int = typer.Option(
        2,
        "--max-windows-per-topic",
        help="Keep the first N windows of each topic (builtin: 12 topics).",
    ),
    pass_windows: int | None = typer.Option(
        None,
        "--pass-windows",
        help="Windows the attention pass reads (evenly spaced; default: all): null spaces, "
        "behaviour scores and the key-side split. The geometry reads every window.",
    ),
    prepend_special: bool = typer.Option(
        True,
        "--prepend-special/--no-prepend-special",
        help="Start each window with BOS/CLS (the 'first token' of the attention columns; the "
        "geometry drops position 0).",
    ),
    induction_length: int | None = typer.Option(
        None,
        "--induction-length",
        help="R: random tokens repeated twice for the induction score (default 25, less for "
        "short contexts; 2 <= R, 2R + 1 <= context).",
    ),
    induction_sequences: int = typer.Option(
        8, "--induction-sequences", help="Random sequences for the induction score."
    ),
    blocks: str | None = typer.Option(
        None, "--blocks", help="Comma-separated layers (blocks 0..L-1) reported (default all)."
    ),
    k: int = typer.Option(5, "--k", help="Top QK and OV pairs per head."),
    frequent: int = typer.Option(
        2048,
        "--frequent",
        help="Top pairs and the layer atlas range over the N most frequent tokens of the windows "
        "(0: the whole vocabulary); special tokens are always dropped.",
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Windows per forward pass."),
    seed: int = typer.Option(0, "--seed", help="Seed of the induction batch."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow the model author's code."
    ),
    dtype: DtypeName = DTYPE_OPT,
) -> None:
    """Every head in one row: top pairs and spectral scores [DAR], key-side QK split [SZ], null
    spaces and effective attention [BRU], behaviour on text; and the layer atlas."""
    from tgeom.analyses.heads import heads
    from tgeom.capture.distributed import shard_from_env
    from tgeom.errors import TgeomError
    from tgeom.models import load_model
    from tgeom.results import write_results
    from tgeom.runtime import Runtime

    chosen = int_list(blocks, "--blocks")
    if induction_length is not None and induction_length < 2:  # before loading anything
        raise TgeomError(f"--induction-length must be at least 2, got {induction_length}.")
    if frequent < 0:
        raise TgeomError(f"--frequent must be 0 (whole vocabulary) or positive, got {frequent}.")
    lm = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code)
    shard = shard_from_env()
    result = heads(
        lm,
        corpus,
        seq_len=seq_len,
        max_windows_per_topic=max_windows_per_topic,
        prepend_special=prepend_special,
        pass_windows=pass_windows,
        induction_length=induction_length,
        induction_sequences=induction_sequences,
        blocks=chosen,
        k=k,
        frequent=frequent or None,
        runtime=Runtime.auto(batch_size),
        shard=shard,
        checkpoint_path=out,
        seed=seed,
        progress=not quiet,
    )
    if not shard.is_main:  # rank 0 alone writes and reports
        return
    result.to_csv(Path(out) / "heads.csv")
    write_results(out, "heads", {**result.to_json(), "csv": "heads.csv"}, warnings=result.warnings)
    _print_summary(result, Path(out))
    print_warnings(result.warnings)


def _top_heads(result: Any, name: str) -> str:
    best = result.top_heads(name, TOP_PER_SCORE)
    return ", ".join(f"{r['layer']}:{r['head']} ({r['value']:.3g})" for r in best) or "-"


def _print_summary(result: Any, out: Path) -> None:
    scores = result.scores()
    print_table(
        f"{result.meta['model']}: top heads per score (layer:head), "
        f"{result.meta['corpus_pass']['n_windows']} windows of {result.meta['seq_len']} tokens",
        ["score", f"top {TOP_PER_SCORE}"],
        [[name, _top_heads(result, name)] for name in scores],
        right=[False, False],
    )
    shown = ["null_dim", "pearson_raw_effective", "positional", "prev_token", "ov_copying"]
    print_table(
        "heads",
        ["layer", "head", *shown, "top_ov"],
        [[r["layer"], r["head"], *(r[c] for c in shown), r["top_ov"]] for r in result.rows],
        limit=SUMMARY_ROWS,
        rest_in=str(out / "heads.csv"),
    )
    last = result.layer_atlas[-1] if result.layer_atlas else None
    if last is not None and last["topics"]:
        print_table(
            f"layer atlas, layer {last['layer']}: what each topic's context direction promotes",
            ["topic", "top tokens"],
            [
                [t["topic"], " ".join(repr(p["token"]) for p in t["promotes"][:5])]
                for t in last["topics"]
            ],
            right=[False, False],
        )
