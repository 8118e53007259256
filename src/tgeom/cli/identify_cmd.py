"""``tgeom attention ...`` and ``tgeom identify ...``: identifiability [BRU] (SPEC section 5)."""

from __future__ import annotations

import typer

from tgeom.cli import app

attention_app = typer.Typer(
    help="Attention null spaces and effective attention.", no_args_is_help=True
)
identify_app = typer.Typer(
    help="Token identifiability and hidden token attribution.", no_args_is_help=True
)
app.add_typer(attention_app, name="attention")
app.add_typer(identify_app, name="identify")
