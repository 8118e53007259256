"""What the CLI prints besides ``results.json``: warnings, and tables that never cut a value.

Tables are plain text padded to each column's widest cell, whatever the terminal's width: a
narrow terminal or a log wraps a long line but never turns a number into ``0.0…``. When a
summary shows only the first rows of a longer list, a last line says how many rows were left
out and where they all are.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any


def print_warnings(warnings: Sequence[str]) -> None:
    """One line per warning on stderr: ``tgeom: warning: ...`` (also in ``results.json``)."""
    for warning in warnings:
        print(f"tgeom: warning: {' '.join(warning.split())}", file=sys.stderr)


def cell(value: Any, fmt: str | None = None) -> str:
    """Display string of a table cell: ``fmt`` when given, floats to 4 significant digits,
    strings with newlines, tabs and control characters made visible."""
    if fmt is not None and not isinstance(value, str):
        try:
            return fmt.format(value)
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in value)
    return str(value)


def format_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    right: Sequence[bool] | None = None,
) -> list[str]:
    """Lines of a plain-text table: title, header, rule, one line per row (cells already
    strings or formatted by :func:`cell`). ``right[j]``: right-align column j (default: numbers
    right, text left, judged by the column's first row)."""
    text = [[c if isinstance(c, str) else cell(c) for c in row] for row in rows]
    if right is None:
        first = rows[0] if rows else [""] * len(columns)
        right = [isinstance(v, int | float) and not isinstance(v, bool) for v in first]
    widths = [max([len(name)] + [len(r[j]) for r in text]) for j, name in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)
        ]
        return "  ".join(padded).rstrip()

    return [title, line(list(columns)), "  ".join("-" * w for w in widths), *map(line, text)]


def print_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    limit: int | None = None,
    rest_in: str | None = None,
    right: Sequence[bool] | None = None,
) -> None:
    """Print the table of :func:`format_table` on stdout, its first ``limit`` rows only when
    given, then ``N more rows in REST_IN`` for the rows left out."""
    shown = rows if limit is None else rows[:limit]
    for text in format_table(title, columns, shown, right=right):
        print(text)
    left_out = len(rows) - len(shown)
    if left_out:
        where = f" in {rest_in}" if rest_in else ""
        print(f"{left_out} more row{'s' * (left_out != 1)}{where}")
