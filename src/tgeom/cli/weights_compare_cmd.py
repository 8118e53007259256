"""``tgeom weights validate|align|finetune|stitch|diff``: comparisons across parameters and
models [DAR] (SPEC section 3). Thin: parse, call the API, write results + figure, print a summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from tgeom.cli.options import DEVICE_MAP_OPT, DTYPE_OPT, int_list, renamed_layer
from tgeom.cli.weights_cmd import weights_app
from tgeom.errors import TgeomError
from tgeom.runtime import DtypeName

MODEL_HELP = "Alias (minilm, smollm2, gemma3), local folder, .gguf or hub id."
CORPUS_HELP = "Corpus: 'builtin', a text file, a folder of text files, or JSONL."
OUT_HELP = "Output folder for results.json and figures."
EMBEDDING_HELP = "Vocabulary matrix: 'out' (W_U; W_E when tied or headless) or 'in' (W_E)."


def _save_figure(fig: Any, out: Path, name: str) -> Path:
    path = out / name
    fig.savefig(path, dpi=120)
    return path


def _windows(corpus: str, tokenizer: Any, seq_len: int, max_per_topic: int | None) -> Any:
    from tgeom.corpus import load_corpus, make_windows

    windows = make_windows(
        load_corpus(corpus), tokenizer, seq_len, max_windows_per_topic=max_per_topic
    )
    if windows.token_ids.shape[0] == 0:
        raise TgeomError(
            f"corpus {corpus} gave no window of {seq_len} tokens; pass a shorter --seq-len or "
            "a corpus with longer documents."
        )
    return windows


def _check_embedding(embedding: str) -> Any:
    if embedding not in ("out", "in"):
        raise TgeomError(f"unknown --embedding '{embedding}'; choose out or in.")
    return embedding


DEFINITION_HELP = (
    "'paper' (the official [DAR] code's definition, default) or 'tgeom' (tgeom's earlier variant)."
)


@weights_app.command("validate")
def validate(
    model: str = typer.Argument(..., help=MODEL_HELP),
    corpus: str = typer.Option(..., "--corpus", help=CORPUS_HELP),
    out: Path = typer.Option(..., "--out", help=OUT_HELP),
    k: int = typer.Option(50, "--k", help="Top-k tokens compared for R_k."),
    sim_k_k: int = typer.Option(100, "--sim-k", help="Top-k tokens compared for Sim_k."),
    n_neurons: int = typer.Option(5, "--n-neurons", help="Most active neurons per position."),
    rk_definition: str = typer.Option(
        "paper",
        "--r-k-definition",
        help="R_k: "
        + DEFINITION_HELP
        + " paper: |union of the active neurons' top-k ∩ the hidden state's top-k| / k for keys,"
        " values, W_V, W_O, against neurons active at another position; tgeom: shared tokens"
        " per FFN value (0..k) against permuted neuron ids.",
    ),
    sim_definition: str = typer.Option(
        "paper",
        "--sim-k-definition",
        help="Sim_k: " + DEFINITION_HELP + " paper ranks tokens by |score|, tgeom by the score.",
    ),
    rank_by: str = typer.Option(
        "",
        "--rank-by",
        help="R_k tgeom only: 'contribution' (|a| ||v||, default) or 'activation' (a).",
    ),
    max_positions: int = typer.Option(
        1000, "--max-positions", help="R_k reads the first N token positions (0: all)."
    ),
    seq_len: int = typer.Option(32, "--seq-len", help="Tokens per window."),
    max_windows: int = typer.Option(8, "--max-windows-per-topic", help="Windows per topic."),
    max_pairs: int = typer.Option(
        512, "--max-pairs", help="Sim_k pairs drawn per block (0: all, as the official code)."
    ),
    keep_special: bool = typer.Option(False, "--keep-special", help="Keep special tokens."),
    seed: int = typer.Option(0, "--seed", help="Seed of the shuffled baselines."),
    dtype: DtypeName = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
) -> None:
    """R_k (active neurons vs hidden states) and Sim_k (related parameter pairs), per block."""
    from tgeom.analyses.embedding.validation import check_definition, r_k, sim_k
    from tgeom.models import load_model
    from tgeom.plots.embedding_compare import plot_validation
    from tgeom.results import prepare_out_dir, write_results
    from tgeom.runtime import Runtime

    check_definition(rk_definition, "R_k")
    check_definition(sim_definition, "Sim_k")
    if max_positions < 0:
        raise TgeomError(f"--max-positions {max_positions} must be 0 (all) or positive.")
    if max_pairs < 0:
        raise TgeomError(f"--max-pairs {max_pairs} must be 0 (all) or positive.")
    if rank_by and rk_definition != "tgeom":
        raise TgeomError("--rank-by applies to the tgeom definition of R_k only; drop it.")
    out = prepare_out_dir(out)
    lm = load_model(model, dtype=dtype, device_map=device_map)
    windows = _windows(corpus, lm.tokenizer, seq_len, max_windows)
    exclude = [] if keep_special else lm.special_token_ids()
    rk = r_k(
        lm,
        windows.token_ids,
        Runtime.auto(),
        k=k,
        n_neurons=n_neurons,
        definition=rk_definition,
        max_positions=max_positions or None,
        rank_by=rank_by or None,
        seed=seed,
        exclude_ids=exclude,
    )
    sk = sim_k(
        lm.weights(),
        k=sim_k_k,
        definition=sim_definition,
        seed=seed,
        exclude_ids=exclude,
        max_pairs=max_pairs or None,
    )
    payload = {
        **lm.identity,
        "corpus": corpus,
        "n_windows": int(windows.token_ids.shape[0]),
        "seq_len": seq_len,
        "r_k": rk,
        "sim_k": sk,
    }
    write_results(out, "weights validate", payload)
    _save_figure(plot_validation(rk, sk), out, "validation.png")
    typer.echo(f"R_k ({rk.definition}, k={k}, {rk.n_positions} positions) per block:")
    for group, values in rk.overlap.items():
        typer.echo(f"  {group:<9} " + " ".join(f"{v:.3f}" for v in values))
        typer.echo("  baseline  " + " ".join(f"{v:.3f}" for v in rk.shuffled[group]))
    for pair, values in sk.similarity.items():
        base = sum(sk.shuffled[pair]) / len(values)
        typer.echo(
            f"Sim_k ({sk.definition}) {pair}: mean {sum(values) / len(values):.3f} "
            f"(shuffled {base:.3f})"
        )
    typer.echo(f"wrote {out / 'results.json'}")


@weights_app.command("align")
def align(
    model_a: str = typer.Argument(..., help="Model A. " + MODEL_HELP),
    model_b: str = typer.Argument(..., help="Model B, with the same vocabulary."),
    out: Path = typer.Option(..., "--out", help=OUT_HELP),
    per_block: int = typer.Option(256, "--per-block", help="Vectors drawn per block and group."),
    seed: int = typer.Option(0, "--seed", help="Seed of the subsampling."),
    embedding: str = typer.Option("out", "--embedding", help=EMBEDDING_HELP),
    _per_layer: str | None = renamed_layer("--per-block", "vectors per block", "--per-layer"),
    dtype: DtypeName = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
) -> None:
    """Block-by-block similarity of two models in vocabulary space, with Hungarian matching."""
    from tgeom.analyses.embedding.alignment import align_models, check_shared_vocabulary
    from tgeom.models import load_model
    from tgeom.plots.embedding_compare import plot_alignment
    from tgeom.results import prepare_out_dir, write_results

    if per_block < 1:
        raise TgeomError(f"--per-block {per_block} must be at least 1.")
    out = prepare_out_dir(out)
    lm_a = load_model(model_a, dtype=dtype, device_map=device_map)
    lm_b = load_model(model_b, dtype=dtype, device_map=device_map)
    check_shared_vocabulary(lm_a, lm_b, "alignment")
    result = align_models(
        lm_a.weights(),
        lm_b.weights(),
        per_block=per_block,
        seed=seed,
        embedding=_check_embedding(embedding),
    )
    write_results(
        out,
        "weights align",
        {
            "model_a": lm_a.source,
            "model_b": lm_b.source,
            "dtype": lm_a.identity["dtype"],
            "alignment": result,
        },
    )
    _save_figure(plot_alignment(result), out, "alignment.png")
    typer.echo(
        "block matching (A -> B): "
        + ", ".join(f"{a}->{b}" for a, b in result.block_matching["mean"])
    )
    typer.echo(f"wrote {out / 'results.json'}")


@weights_app.command("finetune")
def finetune(
    model: str = typer.Argument(..., help=MODEL_HELP),
    corpus: str = typer.Option(..., "--corpus", help=CORPUS_HELP + " Topics are the labels."),
    out: Path = typer.Option(..., "--out", help="Folder for the classifier and results.json."),
    seq_len: int = typer.Option(32, "--seq-len", help="Tokens per window."),
    max_windows: int = typer.Option(40, "--max-windows-per-topic", help="Windows per topic."),
    steps: int = typer.Option(60, "--steps", help="Optimiser steps."),
    batch_size: int = typer.Option(16, "--batch-size", help="Windows per step."),
    lr: float = typer.Option(5e-5, "--lr", help="Learning rate of the transformer body."),
    head_lr: float = typer.Option(5e-3, "--head-lr", help="Learning rate of the linear head."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split and the batch order."),
    pooling: str = typer.Option("", "--pooling", help="mean or last (default: by model)."),
    train_embeddings: bool = typer.Option(False, "--train-embeddings", help="Also tune E."),
) -> None:
    """Fine-tune a topic classifier on a model (deterministic), for stitching and diffs."""
    from tgeom.analyses.embedding.classifier import save_classifier
    from tgeom.analyses.embedding.finetune import finetune_classifier
    from tgeom.models import load_model
    from tgeom.results import prepare_out_dir, write_results

    out = prepare_out_dir(out)
    lm = load_model(model)
    windows = _windows(corpus, lm.tokenizer, seq_len, max_windows)
    clf, report = finetune_classifier(
        lm,
        windows.token_ids,
        windows.topic_ids,
        windows.topics,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        head_lr=head_lr,
        seed=seed,
        pooling=pooling or None,
        train_embeddings=train_embeddings,
    )
    save_classifier(clf, lm.weights(), out)
    write_results(
        out,
        "weights finetune",
        {"model": lm.source, "corpus": corpus, "topics": windows.topics, "training": report},
    )
    typer.echo(
        f"held-out accuracy {report.eval_accuracy:.3f} (majority {report.majority_rate:.3f}"
        f", {report.n_eval} windows); classifier saved in {out}"
    )


@weights_app.command("stitch")
def stitch(
    model_a: str = typer.Argument(..., help="Pretrained model A. " + MODEL_HELP),
    classifier_dirs: list[Path] = typer.Argument(..., help="Classifier folder(s), one per seed."),
    out: Path = typer.Option(..., "--out", help=OUT_HELP),
    corpus: str = typer.Option(
        "",
        "--corpus",
        help="Evaluate on this corpus' windows instead "
        "of the classifiers' held-out windows. " + CORPUS_HELP,
    ),
    max_windows: int = typer.Option(40, "--max-windows-per-topic", help="Windows per topic."),
    hidden: str = typer.Option(
        "", "--hidden", help="Split hidden states h (0..L), e.g. 0,2,4 (default all)."
    ),
    embedding: str = typer.Option("out", "--embedding", help=EMBEDDING_HELP),
    _layers: str | None = renamed_layer("--hidden", "split hidden states 0..L", "--layers"),
) -> None:
    """Zero-shot stitching: A's first h blocks -> E_A.T pinv(E_B.T) -> B's blocks and head."""
    import torch

    from tgeom.analyses.embedding.alignment import check_shared_vocabulary
    from tgeom.analyses.embedding.classifier import load_classifier, read_classifier_config
    from tgeom.analyses.embedding.stitching import stitch as run_stitching
    from tgeom.models import load_model
    from tgeom.plots.embedding_compare import plot_stitching
    from tgeom.results import prepare_out_dir, write_results

    out = prepare_out_dir(out)
    lm_a = load_model(model_a)
    classifiers, bases = [], {lm_a.source: lm_a}
    for folder in classifier_dirs:
        known = bases.get(read_classifier_config(folder).base)
        clf, base = load_classifier(folder, base=known, device=str(lm_a.device))
        if base.source not in bases:
            check_shared_vocabulary(lm_a, base, "stitching")
            bases[base.source] = base
        classifiers.append(clf)
    ids = labels = None
    if corpus:
        topics = classifiers[0].config.topics
        windows = _windows(corpus, lm_a.tokenizer, classifiers[0].config.seq_len, max_windows)
        keep = [i for i, t in enumerate(windows.topic_ids.tolist()) if windows.topics[t] in topics]
        if not keep:
            raise TgeomError(
                f"corpus {corpus} has none of the classifier's topics ({', '.join(topics)})."
            )
        ids = windows.token_ids[keep]
        labels = torch.tensor(
            [topics.index(windows.topics[t]) for t in windows.topic_ids[keep].tolist()]
        )
    result = run_stitching(
        lm_a.weights(),
        classifiers,
        ids,
        labels,
        names=[str(p) for p in classifier_dirs],
        hidden=int_list(hidden or None, "--hidden"),
        embedding=_check_embedding(embedding),
    )
    write_results(
        out,
        "weights stitch",
        {
            "model_a": lm_a.source,
            "eval_set": corpus or "classifiers' held-out windows",
            "stitching": result,
        },
    )
    _save_figure(plot_stitching(result), out, "stitching.png")
    name, split, best = result.best()
    typer.echo(
        f"chance {result.chance:.3f}; best stitched accuracy {best:.3f} at hidden {split} ({name})"
    )
    typer.echo(f"wrote {out / 'results.json'}")


@weights_app.command("diff")
def diff(
    pretrained: str = typer.Argument(..., help="Pretrained model. " + MODEL_HELP),
    finetuned: str = typer.Argument(..., help="Fine-tuned model, or a classifier folder."),
    out: Path = typer.Option(..., "--out", help=OUT_HELP),
    k: int = typer.Option(10, "--k", help="Tokens per vector at each end (+delta and -delta)."),
    top_n: int = typer.Option(20, "--top-n", help="Most changed vectors kept per group."),
    embedding: str = typer.Option("out", "--embedding", help=EMBEDDING_HELP),
) -> None:
    """Fine-tuning in tokens: top (+delta) and bottom (-delta) tokens of theta_ft - theta_pt
    per group, and head rows."""
    from tgeom.analyses.embedding.alignment import check_shared_vocabulary
    from tgeom.analyses.embedding.classifier import (
        is_classifier_dir,
        load_classifier,
        read_classifier_config,
    )
    from tgeom.analyses.embedding.finetune import finetuning_diff
    from tgeom.models import load_model
    from tgeom.plots.embedding_compare import plot_finetuning_diff
    from tgeom.results import prepare_out_dir, write_results

    out = prepare_out_dir(out)
    lm_pt = load_model(pretrained)
    head = None
    if is_classifier_dir(finetuned):
        same_base = read_classifier_config(finetuned).base == lm_pt.source
        base = lm_pt if same_base else None
        head, lm_ft = load_classifier(finetuned, base=base, device=str(lm_pt.device))
        cw_ft = head.weights
    else:
        lm_ft = load_model(finetuned)
        cw_ft = lm_ft.weights()
    check_shared_vocabulary(lm_pt, lm_ft, "a fine-tuning diff")
    result = finetuning_diff(
        lm_pt.weights(),
        cw_ft,
        lm_pt.token_strings,
        k=k,
        top_n=top_n,
        embedding=_check_embedding(embedding),
        head=head,
    )
    write_results(
        out,
        "weights diff",
        {"pretrained": lm_pt.source, "finetuned": str(finetuned), "diff": result},
    )
    _save_figure(plot_finetuning_diff(result), out, "diff_norms.png")
    for row in result.rows[:10]:
        where = "head" if row.block is None else f"block {row.block} {row.group} {row.label}"
        typer.echo(f"{where} (|diff| {row.norm:.3g})")
        typer.echo(f"  +delta (top):    {' '.join(row.top_tokens[:8])}")
        typer.echo(f"  -delta (bottom): {' '.join(row.bottom_tokens[:8])}")
    if len(result.rows) > 10:  # the rest, and every row's k tokens, are in the file
        typer.echo(f"{len(result.rows) - 10} more rows in {out / 'results.json'}")
    typer.echo(f"wrote {out / 'results.json'}")
