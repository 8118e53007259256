"""``tgeom corpus SOURCE --model MODEL --seq-len T``: per-topic documents and windows."""

from __future__ import annotations

import json
from typing import Any

import typer

from tgeom.cli import app
from tgeom.cli.output import print_table

SANE_MAX_LENGTH = 1_000_000  # tokenizers without a limit report ~1e30 as model_max_length
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")


@app.command("corpus")
def corpus(
    source: str = typer.Argument(
        ..., help="builtin, a .txt file, a folder of text files, a .jsonl file or hf:NAME[:SPLIT]."
    ),
    model: str = typer.Option(
        ...,
        "--model",
        help="Model whose tokenizer cuts the windows (alias, folder, .gguf, hub id).",
    ),
    seq_len: int = typer.Option(..., "--seq-len", help="Tokens per window (T)."),
    max_windows_per_topic: int | None = typer.Option(
        None, "--max-windows-per-topic", help="Keep at most this many windows per topic."
    ),
    prepend_special: bool = typer.Option(
        False, "--prepend-special", help="Start every window with the BOS (or CLS) token."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow custom tokenizer code from the model's author."
    ),
) -> None:
    """Print how many documents and windows of T tokens each topic of a corpus gives."""
    from tgeom.corpus import load_corpus, make_windows
    from tgeom.models import load_tokenizer

    documents = load_corpus(source)
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    windows = make_windows(
        documents,
        tokenizer,
        seq_len,
        prepend_special=prepend_special,
        max_windows_per_topic=max_windows_per_topic,
        max_context=model_context(model, tokenizer, trust_remote_code=trust_remote_code),
    )
    counts = windows.counts_by_topic()
    rows: list[dict[str, Any]] = [
        {"topic": topic, "documents": n_docs, "windows": counts.get(topic, 0)}
        for topic, n_docs in documents.documents_by_topic().items()
    ]
    summary: dict[str, Any] = {
        "source": source,
        "model": model,
        "seq_len": seq_len,
        "topics": rows,
        "n_windows": len(windows),
        "n_skipped_docs": windows.n_skipped_docs,
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    print_table(
        f"tgeom corpus: {source} ({model}, T = {seq_len})",
        ["topic", "documents", "windows"],
        [[r["topic"], r["documents"], r["windows"]] for r in rows]
        + [["total", len(documents), len(windows)]],
    )
    typer.echo(f"{windows.n_skipped_docs} documents shorter than {seq_len} tokens skipped.")


def model_context(model: str, tokenizer: Any, *, trust_remote_code: bool = False) -> int | None:
    """The model's context length: the tokenizer's limit when it has one, else the config's."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit <= SANE_MAX_LENGTH:
        return limit
    from tgeom.models.load import resolve_source

    folder, local, _ = resolve_source(model)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(
            folder, local_files_only=local, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError):
        return None  # unknown context: only the document lengths bound --seq-len
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
