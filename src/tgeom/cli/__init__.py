"""The ``tgeom`` command: thin wrappers that parse, call the API, write results, print a summary.

Each command group lives in its own module and registers itself on :data:`app`. A
:class:`~tgeom.errors.TgeomError` raised below becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys

import typer

from tgeom.errors import TgeomError
from tgeom.runtime import retain_freed_memory

app = typer.Typer(
    name="tgeom",
    help="Read a trained transformer geometrically: weights and hidden states in vocabulary space.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Command modules register themselves on `app` when imported.
from tgeom.cli import (  # noqa: E402, F401
    corpus_cmd,
    geometry_cmd,
    heads_cmd,
    identify_cmd,
    info_cmd,
    report_cmd,
    weights_cmd,
    weights_compare_cmd,
)


def main() -> None:
    """Console entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    retain_freed_memory()  # batch after batch, large tensors reuse mapped memory
    try:
        app(standalone_mode=True)
    except TgeomError as exc:
        print(f"tgeom: error: {exc}", file=sys.stderr)
        sys.exit(2)
