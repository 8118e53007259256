"""``tgeom geometry ...``: position/context decomposition of hidden states [SZ] (SPEC section 4)."""

from __future__ import annotations

import typer

from tgeom.cli import app

geometry_app = typer.Typer(
    help="Hidden-state geometry: positional and context parts.", no_args_is_help=True
)
app.add_typer(geometry_app, name="geometry")
