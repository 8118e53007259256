"""``tgeom info MODEL``: the architecture summary of a model."""

from __future__ import annotations

import dataclasses
import json

import typer

from tgeom.cli import app
from tgeom.cli.options import DEVICE_MAP_OPT, DTYPE_OPT
from tgeom.cli.output import print_table
from tgeom.runtime import DtypeName


@app.command("info")
def info(
    model: str = typer.Argument(
        ..., help="Alias (minilm, smollm2, gemma3), local folder, .gguf or hub id."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow custom model code from the model's author."
    ),
    dtype: DtypeName = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
) -> None:
    """Print the architecture summary: family, blocks (n_blocks), heads, widths, vocabulary,
    norms, and the special mechanisms (positions, QK-norm, sliding windows, soft-caps, parallel
    blocks)."""
    from tgeom.models import load_model

    lm = load_model(
        model,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        device="cpu" if device_map is None else None,
        device_map=device_map,
    )
    summary = {
        **lm.identity,
        **dataclasses.asdict(lm.summary),
        "mechanisms": lm.summary.mechanisms(),
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    print_table(
        f"tgeom info: {lm.source}",
        ["field", "value"],
        [[key, str(value)] for key, value in summary.items() if key != "mechanisms"]
        + [[f"mechanisms.{key}", str(value)] for key, value in summary["mechanisms"].items()],
    )
