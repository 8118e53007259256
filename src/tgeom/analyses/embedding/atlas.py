"""The head atlas: the exact top pairs of every head's QK and OV matrices [DAR] (SPEC section 3).

One table with a row per (block, head, circuit, rank): ``block, head, circuit, rank, row, col,
row_token, col_token, value``. Each head goes through
:func:`tgeom.analyses.embedding.interaction.head_top_pairs`, so every row is exact.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor

from tgeom.analyses.embedding.interaction import (
    circuit_embeddings,
    describe_sides,
    embedding_convention,
    head_top_pairs,
    position_note,
    qk_norm_note,
    softcap_note,
)
from tgeom.errors import TgeomError, check_index
from tgeom.models.weights import CanonicalWeights
from tgeom.results import atomic_write_text, results_frame

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class AtlasRow:
    block: int
    head: int
    circuit: str
    rank: int
    row: int
    col: int
    row_token: str
    col_token: str
    value: float


COLUMNS = tuple(f.name for f in fields(AtlasRow))


@dataclass
class HeadAtlas:
    """The atlas table (``rows``, in block, head, circuit, rank order) and its options.

    ``embedding``: the vocabulary matrices in one string (``"W_U"``, or per circuit when the
    sides differ); ``convention``: ``"dar"`` | ``"tl"``; ``sides``: per circuit, the matrix
    embedding the row and the column tokens (``{"ov": {"rows": "W_E", "cols": "W_U"}}``).
    """

    rows: list[AtlasRow]
    k: int
    largest: bool
    embedding: str
    blocks: list[int]
    circuits: list[str]
    rope_note: str | None
    options: dict[str, Any] = field(default_factory=dict)
    qk_norm_note: str | None = None
    softcap_note: str | None = None
    heads: list[int] = field(default_factory=list)
    convention: str = "dar"
    sides: dict[str, dict[str, str]] = field(default_factory=dict)

    def column(self, name: str) -> list[Any]:
        return [getattr(row, name) for row in self.rows]

    def to_csv(self, path: str | Path | None = None) -> str:
        """The table as CSV text (header + one line per row); written to ``path`` if given."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(astuple(row) for row in self.rows)
        text = buffer.getvalue()
        if path is not None:
            atomic_write_text(path, text)
        return text

    def to_json(self, include_rows: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "k": self.k,
            "largest": self.largest,
            "embedding": self.embedding,
            "embedding_convention": self.convention,
            "embedding_sides": self.sides,
            "blocks": self.blocks,
            "heads": self.heads,
            "circuits": self.circuits,
            "rope_note": self.rope_note,
            "qk_norm_note": self.qk_norm_note,
            "softcap_note": self.softcap_note,
            "columns": list(COLUMNS),
            "n_rows": len(self.rows),
            **self.options,
        }
        if include_rows:
            out["rows"] = [dict(zip(COLUMNS, astuple(row), strict=True)) for row in self.rows]
        return out

    def to_frame(self) -> pd.DataFrame:
        """The table as a DataFrame, one row per (block, head, circuit, rank): :data:`COLUMNS`."""
        return results_frame(self.to_json(), "rows", ("rows",))


def head_atlas(
    cw: CanonicalWeights,
    k: int,
    *,
    vocab: Sequence[str] | None = None,
    blocks: Iterable[int] | None = None,
    heads: Iterable[int] | None = None,
    circuits: Sequence[str] = ("qk", "ov"),
    largest: bool = True,
    row_mask: Tensor | None = None,
    col_mask: Tensor | None = None,
    E: Tensor | str | None = None,
    quiet: bool = False,
) -> HeadAtlas:
    """Top-``k`` pairs of every chosen head for each of ``circuits``: heads ``heads`` (default
    all) of blocks ``blocks`` (default all), in ascending order, each once.

    ``vocab``: display strings per token id (``lm.vocab_strings``); ids are shown as
    ``<id:N>`` without it. ``E``: the vocabulary matrices, as in
    :func:`~tgeom.analyses.embedding.interaction.head_top_pairs` (``"out"``, ``"in"``, ``"tl"``
    or a tensor). A rich progress bar counts heads unless ``quiet``.
    """
    n_blocks, n_heads = len(cw.layers), cw.summary.n_heads
    chosen = _chosen("block", blocks, n_blocks)
    chosen_heads = _chosen("head", heads, n_heads)
    circuits = list(dict.fromkeys(circuits))  # each once, in the given order
    if not circuits:
        raise TgeomError("no circuit chosen: pick qk, ov or both.")
    sides = {}
    for circuit in circuits:  # validates the circuit names and E
        (_, row_name), (_, col_name) = circuit_embeddings(cw, circuit, E)
        sides[circuit] = {"rows": row_name, "cols": col_name}
    named = {c: describe_sides(side["rows"], side["cols"]) for c, side in sides.items()}
    name = (
        next(iter(named.values()))
        if len(set(named.values())) == 1
        else ", ".join(f"{c}: {n}" for c, n in named.items())
    )
    rows: list[AtlasRow] = []
    with Progress(
        TextColumn("[bold]atlas[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=quiet,
        transient=True,
    ) as progress:
        task = progress.add_task("", total=len(chosen) * len(chosen_heads) * len(circuits))
        qk_scales: dict[tuple[int, str], Tensor] = {}  # OLMo 2's QK-norm scales, once per block
        for block in chosen:
            for head in chosen_heads:
                for circuit in circuits:
                    progress.update(task, description=f"block {block} head {head} {circuit}")
                    pairs = head_top_pairs(
                        cw,
                        block,
                        head,
                        circuit,
                        k,
                        largest=largest,
                        row_mask=row_mask,
                        col_mask=col_mask,
                        E=E,
                        qk_scales=qk_scales,
                    )
                    rows.extend(_rows(block, head, circuit, pairs, vocab))
                    progress.advance(task)
    rope = position_note(cw) if "qk" in circuits else None
    return HeadAtlas(
        rows,
        k,
        largest,
        name,
        chosen,
        list(circuits),
        rope,
        heads=chosen_heads,
        convention=embedding_convention(E),
        sides=sides,
        qk_norm_note=qk_norm_note(cw) if "qk" in circuits else None,
        softcap_note=softcap_note(cw) if "qk" in circuits else None,
    )


def _chosen(what: str, values: Iterable[int] | None, size: int) -> list[int]:
    """``values`` sorted without repeats (all of ``0..size-1`` when None), each in range."""
    if values is None:
        return list(range(size))
    chosen = sorted({int(x) for x in values})
    if not chosen:
        raise TgeomError(f"no {what} chosen: pass at least one, or none for all.")
    for value in chosen:
        check_index(what, value, size)
    return chosen


def _rows(
    block: int, head: int, circuit: str, pairs: Any, vocab: Sequence[str] | None
) -> list[AtlasRow]:
    def show(i: int) -> str:
        return vocab[i] if vocab is not None else f"<id:{i}>"

    return [
        AtlasRow(block, head, circuit, rank, r, c, show(r), show(c), v)
        for rank, (r, c, v) in enumerate(
            zip(pairs.rows.tolist(), pairs.cols.tolist(), pairs.values.tolist(), strict=True)
        )
    ]
