"""``tgeom weights ...``: weights in embedding space [DAR] (SPEC section 3)."""

from __future__ import annotations

import typer

from tgeom.cli import app

weights_app = typer.Typer(
    help="Weights in embedding space: projections, QK/OV top pairs, atlas.", no_args_is_help=True
)
app.add_typer(weights_app, name="weights")
