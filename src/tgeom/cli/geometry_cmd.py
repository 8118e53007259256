"""``tgeom geometry ...``: position/context decomposition of hidden states [SZ] (SPEC section 4).

``collect`` runs the model over a corpus once and saves float64 running sums (resumable:
re-running the same command continues an interrupted collection); ``measure`` reads them and
writes ``results.json`` and figures; ``run`` does both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from tgeom.cli import app
from tgeom.cli.options import (
    BLOCK_MEANING,
    DEVICE_MAP_OPT,
    DTYPE_OPT,
    HIDDEN_MEANING,
    renamed_layer,
)
from tgeom.cli.output import print_table, print_warnings
from tgeom.runtime import DtypeName

geometry_app = typer.Typer(
    help="Hidden-state geometry: positional and context parts.", no_args_is_help=True
)
app.add_typer(geometry_app, name="geometry")

MODEL_ARG = typer.Argument(
    ..., help="Alias (minilm, smollm2, gemma3), local folder, .gguf or hub id."
)
CORPUS_ARG = typer.Argument(..., help="Text file, folder (topic = sub-folder), .jsonl, builtin.")
SEQ_OPT = typer.Option(..., "--seq-len", help="Tokens per window T.")
OUT_OPT = typer.Option(..., "--out", help="Folder for the statistics, results.json, figures.")
MAXW_OPT = typer.Option(None, "--max-windows-per-topic", help="Keep the first N windows/topic.")
BATCH_OPT = typer.Option(None, "--batch-size", help="Windows per forward pass.")
FIRST_OPT = typer.Option(False, "--keep-first", help="Keep position 0 (dropped by default).")
REMOTE_OPT = typer.Option(False, "--trust-remote-code", help="Allow the model author's code.")
K_OPT = typer.Option(10, "--k-subspace", help="Dimension of the pos/ctx subspaces compared.")
LOWF_OPT = typer.Option(10, "--low-freq", help="Frequencies counted as low (DCT of the Gram).")
DROP_OPT = typer.Option(0, "--drop-channels", help="Remove each hidden state's top-m |h| channels.")
SEED_OPT = typer.Option(0, "--seed", help="Seed of k-means and random baselines.")
HIDDEN_OPT = typer.Option(
    None,
    "--hidden",
    help="Hidden state (0 = embeddings .. L) drawn in the per-hidden-state figures (default L).",
)
OLD_LAYER_OPT = renamed_layer("--hidden", HIDDEN_MEANING)
MAP_OPT = typer.Option("pca", "--ctx-map", help="Context map: pca or tsne (slower).")
RANK_OPT = typer.Option(
    "cubic", "--rank-threshold", help="Gavish-Donoho omega(beta): cubic (paper) or exact."
)
CONV_OPT = typer.Option(
    "tgeom",
    "--conventions",
    help="Headline definitions: tgeom (Gavish-Donoho rank, squared-value explained ratio, "
    "Frobenius relative norm, within-topic |cos| without self-pairs) or paper (the [SZ] code: "
    "ScreeNOT k=20, singular values to that rank, operator norms, self-pairs counted). Both "
    "are always written, each under its own name.",
)
SCREENOT_OPT = typer.Option(
    20, "--screenot-k", help="ScreeNOT's bound on the signal rank (20 in the [SZ] code)."
)
MOMENT_OPT = typer.Option(
    True,
    "--second-moment/--no-second-moment",
    help="Also sum h h^T per hidden state (8 (L+1) d^2 bytes): the raw operator norm that "
    "--conventions paper needs.",
)


def _collect(
    model: str,
    corpus: str,
    seq_len: int,
    out: Path,
    max_windows: int | None,
    batch_size: int | None,
    keep_first: bool,
    trust_remote_code: bool,
    dtype: str = "float32",
    device_map: str | None = None,
    need_topics: bool = False,
    checkpoint_every: int = 16,
    second_moment: bool = True,
) -> Any:
    from tgeom.analyses.geometry import collect_statistics
    from tgeom.analyses.geometry.context import check_context_design
    from tgeom.capture.distributed import shard_from_env
    from tgeom.corpus import load_corpus, make_windows
    from tgeom.models import load_model
    from tgeom.results import prepare_out_dir, write_results
    from tgeom.runtime import Runtime

    lm = load_model(model, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
    docs = load_corpus(corpus)
    windows = make_windows(
        docs, lm.tokenizer, seq_len, max_windows_per_topic=max_windows, max_context=lm.summary.n_ctx
    )
    if need_topics:  # `run` measures next: refuse before spending the forward passes
        check_context_design(len(windows), windows.topic_ids)
    out_dir = prepare_out_dir(out)  # only once the inputs are known to be good
    shard = shard_from_env()  # rank and world size under torchrun; a single process otherwise
    stats = collect_statistics(
        lm,
        windows,
        Runtime.auto(batch_size),
        keep_first=keep_first,
        checkpoint_path=out_dir,
        checkpoint_every=checkpoint_every,
        corpus=docs.source,
        shard=shard,
        second_moment=second_moment,
    )
    if not shard.is_main:  # rank 0 alone writes and reports
        return None
    write_results(
        out_dir,
        "geometry collect",
        {
            **stats.meta,
            "n_done": stats.n_done,
            "windows_by_topic": windows.counts_by_topic(),
            "stats_file": "geometry_stats.safetensors",
            "second_moment": stats.second_moment is not None,
        },
    )
    typer.echo(
        f"collected {stats.n_done} windows x {stats.n_positions} positions, "
        f"{stats.n_hidden} hidden states (embeddings + {stats.n_hidden - 1} blocks), "
        f"d={stats.d_model} -> {out_dir}"
    )
    return stats


def _measure(
    out: Path,
    k_subspace: int,
    low_freq: int,
    drop_channels: int,
    seed: int,
    hidden: int | None,
    ctx_map: str = "pca",
    rank_threshold: str = "cubic",
    conventions: str = "tgeom",
    screenot_k: int = 20,
) -> None:
    from tgeom.analyses.geometry import GeometryStats, measure
    from tgeom.plots import geometry as figs
    from tgeom.results import prepare_out_dir, write_results

    stats = GeometryStats.load(out)
    out_dir = prepare_out_dir(out)
    result = measure(
        stats,
        k_subspace=k_subspace,
        low_freq=low_freq,
        drop_channels=drop_channels,
        seed=seed,
        ctx_map=ctx_map,
        rank_method=rank_threshold,
        conventions=conventions,
        screenot_k=screenot_k,
    )
    chosen = result.n_hidden - 1 if hidden is None else result.check_hidden(hidden)
    payload = result.to_json(gram_hidden=chosen)
    write_results(out_dir, "geometry measure", payload, warnings=result.warnings)
    for name, fig in (
        ("variance_shares.png", figs.plot_variance_shares(result)),
        ("spectra.png", figs.plot_spectra(result)),
        (f"spiral_2d_hidden{chosen}.png", figs.plot_spiral_2d(result, chosen)),
        (f"gram_dct_hidden{chosen}.png", figs.plot_gram_dct(result, chosen)),
        (f"context_map_hidden{chosen}.png", figs.plot_context_map(result, chosen)),
        (f"pos_ctx_cos_hidden{chosen}.png", figs.plot_pos_ctx_cosines(result, chosen)),
    ):
        fig.savefig(out_dir / name, dpi=110)
        figs.plt.close(fig)
    figs.plot_spiral_3d(result, chosen).write_html(
        str(out_dir / f"spiral_3d_hidden{chosen}.html"), include_plotlyjs=True
    )
    _print_summary(result)
    print_warnings(result.warnings)


# Short column titles of the quantities that have two definitions (see HEADLINES in measure).
SHORT_TITLES = {
    "pos_rank_gavish_donoho": "rank GD",
    "pos_rank_screenot": "rank ScreeNOT",
    "pos_explained_sq_top2": "top2 s²",
    "pos_explained_sv_screenot": "s to rank",
    "pos_relative_norm_fro": "rel.norm F",
    "pos_relative_norm_op": "rel.norm op",
    "ctx_within_cos_excl_self": "within",
    "ctx_within_cos_incl_self": "within+self",
}


def _print_summary(result: Any) -> None:
    conventions = result.options.get("conventions", "tgeom")
    title = (
        f"Position/context geometry of {result.meta.get('model', '?')} ({conventions} conventions)"
    )
    head = result.headline
    columns = [
        ("hidden", "hidden", "{}"),
        ("pos", "var_share_pos", "{:.3f}"),
        ("ctx", "var_share_ctx", "{:.3f}"),
        ("resid", "var_share_resid", "{:.3f}"),
        ("srank", "pos_stable_rank", "{:.2f}"),
        *(
            (SHORT_TITLES[head[name]], head[name], fmt)
            for name, fmt in (
                ("estimated_rank", "{}"),
                ("explained_ratio", "{:.3f}"),
                ("relative_norm", "{:.3f}"),
            )
        ),
        ("ARI", "ctx_ari", "{:.2f}"),
        (SHORT_TITLES[head["within_topic_cos"]], head["within_topic_cos"], "{:.3f}"),
        ("between", "ctx_between_cos", "{:.3f}"),
        ("|cos| pos·ctx", "incoherence_mean", "{:.3f}"),
        ("random", "random_baseline_mean", "{:.3f}"),
    ]
    print_table(
        title,
        [name for name, _, _ in columns],
        [[_fmt(fmt, row[key]) for _, key, fmt in columns] for row in result.by_hidden],
        right=[True] * len(columns),
    )


def _fmt(fmt: str, value: Any) -> str:
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


@geometry_app.command("collect")
def collect_cmd(
    model: str = MODEL_ARG,
    corpus: str = CORPUS_ARG,
    seq_len: int = SEQ_OPT,
    out: Path = OUT_OPT,
    max_windows_per_topic: int | None = MAXW_OPT,
    batch_size: int | None = BATCH_OPT,
    keep_first: bool = FIRST_OPT,
    trust_remote_code: bool = REMOTE_OPT,
    dtype: DtypeName = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
    checkpoint_every: int = typer.Option(
        16, "--checkpoint-every", help="Save a resumable checkpoint every N batches."
    ),
    second_moment: bool = MOMENT_OPT,
) -> None:
    """Run MODEL over CORPUS once and save running sums of every hidden state (0..L).

    Re-running the same command into the same --out resumes an interrupted collection.
    Under torchrun the windows are sharded across ranks and the sums all-reduced."""
    _collect(
        model,
        corpus,
        seq_len,
        out,
        max_windows_per_topic,
        batch_size,
        keep_first,
        trust_remote_code,
        dtype,
        device_map,
        checkpoint_every=checkpoint_every,
        second_moment=second_moment,
    )


@geometry_app.command("measure")
def measure_cmd(
    out: Path = typer.Argument(..., help="Folder written by `tgeom geometry collect`."),
    k_subspace: int = K_OPT,
    low_freq: int = LOWF_OPT,
    drop_channels: int = DROP_OPT,
    seed: int = SEED_OPT,
    hidden: int | None = HIDDEN_OPT,
    ctx_map: str = MAP_OPT,
    rank_threshold: str = RANK_OPT,
    _layer: str | None = OLD_LAYER_OPT,
    conventions: str = CONV_OPT,
    screenot_k: int = SCREENOT_OPT,
) -> None:
    """Measure the saved statistics: shares, spectra, spiral, clusters, incoherence, figures."""
    _measure(
        out,
        k_subspace,
        low_freq,
        drop_channels,
        seed,
        hidden,
        ctx_map,
        rank_threshold,
        conventions,
        screenot_k,
    )


@geometry_app.command("run")
def run_cmd(
    model: str = MODEL_ARG,
    corpus: str = CORPUS_ARG,
    seq_len: int = SEQ_OPT,
    out: Path = OUT_OPT,
    max_windows_per_topic: int | None = MAXW_OPT,
    batch_size: int | None = BATCH_OPT,
    keep_first: bool = FIRST_OPT,
    trust_remote_code: bool = REMOTE_OPT,
    dtype: DtypeName = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
    k_subspace: int = K_OPT,
    low_freq: int = LOWF_OPT,
    drop_channels: int = DROP_OPT,
    seed: int = SEED_OPT,
    hidden: int | None = HIDDEN_OPT,
    ctx_map: str = MAP_OPT,
    rank_threshold: str = RANK_OPT,
    _layer: str | None = OLD_LAYER_OPT,
    conventions: str = CONV_OPT,
    screenot_k: int = SCREENOT_OPT,
    second_moment: bool = MOMENT_OPT,
) -> None:
    """collect, then measure, into the same --out."""
    from tgeom.analyses.geometry.measure import check_measure_options

    check_measure_options(ctx_map, rank_threshold, conventions)  # before the forward passes
    if conventions == "paper" and not second_moment:
        from tgeom.errors import TgeomError

        raise TgeomError("--conventions paper needs the second moment; drop --no-second-moment.")
    stats = _collect(
        model,
        corpus,
        seq_len,
        out,
        max_windows_per_topic,
        batch_size,
        keep_first,
        trust_remote_code,
        dtype,
        device_map,
        need_topics=True,
        second_moment=second_moment,
    )
    if stats is not None:  # rank 0 (or the only process) measures
        _measure(
            out,
            k_subspace,
            low_freq,
            drop_channels,
            seed,
            hidden,
            ctx_map,
            rank_threshold,
            conventions,
            screenot_k,
        )


@geometry_app.command("qk")
def qk_cmd(
    model: str = MODEL_ARG,
    out: Path = typer.Argument(..., help="Folder holding geometry_stats.safetensors."),
    block: str | None = typer.Option(
        None,
        "--block",
        help="Blocks (0..L-1, comma-separated, e.g. 0,5) whose attention logits are split; "
        "block B reads hidden B. Default: every block.",
    ),
    corpus: str | None = typer.Option(
        None,
        "--corpus",
        help="The corpus that collected the statistics (default: the one they record); it is "
        "read a second time.",
    ),
    max_windows: int | None = typer.Option(
        None,
        "--max-windows",
        help="Read an evenly spaced sample of this many windows (default: every window).",
    ),
    batch_size: int | None = BATCH_OPT,
    trust_remote_code: bool = REMOTE_OPT,
    dtype: DtypeName = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
    _layer: str | None = renamed_layer("--block", BLOCK_MEANING),
) -> None:
    """Split every head's QK logits over the keys it sees: positional, content, scale, cross.

    The exact key-side variance split (SPEC 4): a second pass over the corpus that collected
    the statistics. OUT/qk/results.json holds one entry per block (``by_block``), with the
    paper's four-part picture as figure data; blocks measured by an earlier call on the same
    statistics, model and windows are kept."""
    from tgeom.analyses.geometry import GeometryStats
    from tgeom.analyses.geometry.collect import check_same_identity
    from tgeom.analyses.geometry.qk import QKResult, qk_split
    from tgeom.cli.options import int_list
    from tgeom.errors import TgeomError, check_index
    from tgeom.models import load_model
    from tgeom.plots import qk as figs
    from tgeom.results import write_results
    from tgeom.runtime import Runtime

    stats = GeometryStats.load(out)
    wanted_blocks = int_list(block, "--block")
    if max_windows is not None and max_windows < 1:
        raise TgeomError(f"--max-windows must be at least 1 (got {max_windows}).")
    lm = load_model(model, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
    wanted = {**stats.meta, "model": str(lm.source), "d_model": lm.summary.d_model}
    wanted["n_blocks"] = lm.summary.n_layers
    check_same_identity(stats.meta, wanted, str(out), "pass the model that collected them.")
    n_blocks = int(lm.summary.n_layers)
    blocks = list(range(n_blocks)) if wanted_blocks is None else wanted_blocks
    for b in blocks:  # all refused before any work
        check_index("block", b, n_blocks)
    windows = _collected_windows(lm, stats, corpus, str(out))
    result = qk_split(
        lm, stats, windows.token_ids, blocks, Runtime.auto(batch_size), max_windows=max_windows
    )
    earlier = _earlier_qk_blocks(Path(out) / "qk", result)
    by_block = {**earlier, **{entry["block"]: entry for entry in result.by_block}}
    result.by_block = [by_block[b] for b in sorted(by_block)]
    folder = Path(out) / "qk"
    figures = {
        "key_side_split.png": (figs.plot_key_side_split(result), figs.split_caption(result)),
        "four_part_picture.png": (
            figs.plot_four_part_picture(result),
            result.by_block[0]["four_part_picture"]["caption"],
        ),
    }
    figure_captions = {n: c for n, (_, c) in figures.items()}
    payload = {**result.to_json(), **lm.identity, "figures": figure_captions}
    write_results(folder, "geometry qk", payload, warnings=result.warnings)
    for name, (fig, _) in figures.items():
        fig.savefig(folder / name, dpi=110)
        figs.close(fig)
    _print_qk_summary(QKResult(**{**result.__dict__, "by_block": [by_block[b] for b in blocks]}))
    print_warnings(result.warnings)


def _collected_windows(lm: Any, stats: Any, corpus: str | None, where: str) -> Any:
    """The windows that collected ``stats``, cut again from ``corpus`` (default: the corpus the
    statistics record) and checked against their fingerprint."""
    import torch

    from tgeom.analyses.geometry.collect import windows_fingerprint
    from tgeom.corpus import load_corpus, make_windows
    from tgeom.errors import TgeomError

    source = corpus if corpus is not None else stats.meta.get("corpus")
    if source is None:
        raise TgeomError(f"the statistics at {where} record no corpus; pass --corpus.")
    per_topic = torch.bincount(stats.topic_ids) if len(stats.topic_ids) else torch.ones(1)
    windows = make_windows(
        load_corpus(source),
        lm.tokenizer,
        int(stats.meta["seq_len"]),
        max_windows_per_topic=int(per_topic.max()),  # the cap the collection used, or none
        max_context=lm.summary.n_ctx,
    )
    if windows_fingerprint(windows.token_ids) != stats.meta.get("windows_sha256"):
        raise TgeomError(
            f"the corpus {source} does not give the windows that collected the statistics at "
            f"{where}; pass --corpus with the corpus that did."
        )
    return windows


def _earlier_qk_blocks(folder: Path, result: Any) -> dict[int, Any]:
    """The per-block entries of an earlier ``geometry qk`` on the same statistics, model and
    second-pass windows (``folder/results.json``), by block; empty when there is none or it
    came from others."""
    import json

    path = folder / "results.json"
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    same = (
        earlier.get("windows_sha256") == result.windows_sha256
        and str(earlier.get("model")) == result.model
        and earlier.get("key_side_split", {}).get("second_pass") == result.second_pass
    )
    if not same or "by_block" not in earlier:
        return {}
    return {int(row["block"]): row for row in earlier["by_block"] if "four_part_picture" in row}


def _print_qk_summary(result: Any) -> None:
    """One row per block: each part's share averaged over heads, and the most positional and
    most content-driven heads."""
    names = result.by_block[0]["parts"]
    rows = []
    for entry in result.by_block:
        heads = [h for h in entry["heads"] if h["positional"] is not None]
        if not heads:
            rows.append([str(entry["block"]), *("-" for _ in names), "-", "-"])
            continue
        means = [sum(h[p] for h in heads) / len(heads) for p in names]
        top_pos = max(heads, key=lambda h: h["positional"])
        top_content = max(heads, key=lambda h: h["content"])
        rows.append(
            [
                str(entry["block"]),
                *(f"{m:.2f}" for m in means),
                f"{top_pos['head']} ({top_pos['positional']:.2f})",
                f"{top_content['head']} ({top_content['content']:.2f})",
            ]
        )
    columns = ["block", *names, "most positional", "most content"]
    sample = result.second_pass
    print_table(
        "QK logits, key-side split: share of Var_s(logit), mean over heads "
        f"({sample['windows']} of {sample['of']} windows read again)",
        columns,
        rows,
        right=[True] * len(columns),
    )
