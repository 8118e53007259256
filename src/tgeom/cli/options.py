"""Options shared by several command groups: the model's precision, and the two layer indices,
named apart.

``--dtype`` (every command that loads a model's weights): float32 (default), bfloat16 or
float16, the precision of the weights and forward passes (statistics still accumulate in
float64); recorded as ``dtype`` beside ``model`` in ``results.json``.

``--hidden H`` picks a hidden state (0..L: 0 the embedding output, H the output of block H-1);
``--block B`` picks a transformer block (0..L-1; block B reads hidden B and writes hidden B+1).
The old ``--layer`` meant one or the other depending on the command; it is refused with one line
that names its replacement.
"""

from __future__ import annotations

from typing import Any

import typer

from tgeom.errors import TgeomError

HIDDEN_MEANING = "a hidden state 0..L, 0 = the embedding output, H = the output of block H-1"
BLOCK_MEANING = "a block 0..L-1; block B reads hidden state B and writes B+1"

# Annotate the parameter ``dtype: DtypeName = DTYPE_OPT`` (tgeom.runtime.DtypeName, imported at
# module level): typer offers the Literal's names as the only choices.
DTYPE_OPT: Any = typer.Option(
    "float32",
    "--dtype",
    help="Precision of the weights and forward passes: float32, bfloat16 or float16 "
    "(statistics still accumulate in float64).",
)

DEVICE_MAP_OPT: Any = typer.Option(
    None,
    "--device-map",
    help="auto: spread a model larger than one device over the GPUs, then the CPU "
    "(accelerate); default: the whole model on one device.",
)


def renamed_layer(new: str, meaning: str, flag: str = "--layer") -> Any:
    """A hidden ``flag`` option that stops the command with one line naming ``new``."""

    def refuse(value: str | None) -> None:
        if value is not None:
            raise TgeomError(f"{flag} was renamed: pass {new} ({meaning}).")

    return typer.Option(None, flag, hidden=True, callback=refuse, help=f"Renamed: use {new}.")


def int_list(text: str | None, option: str) -> list[int] | None:
    """``"0,3, 5"`` -> ``[0, 3, 5]`` (order kept, repeats dropped); None -> None (= all)."""
    if text is None:
        return None
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TgeomError(
            f"{option} must be comma-separated integers (e.g. 0,3), got {text!r}."
        ) from None
    if not values:
        raise TgeomError(f"{option} must name at least one index (e.g. 0,3), got {text!r}.")
    return list(dict.fromkeys(values))
