"""Per-head interaction matrices in token space and their exact top pairs [DAR] (SPEC section 3).

``QK_h = E W_Q[h] W_K[h]^T E^T`` (row = query token, column = key token) and
``OV_h = E W_V[h] W_O[h] E^T`` (row = source token the head attends to, column = token promoted
in the output) are ``[V, V]``; each is the product of two ``[V, d_head]`` factors, and
:func:`tgeom.linalg.topk.factored_topk` returns their top entries without materialising them.
Raw parameters, no biases, no attention scale. For rotary models the token-only QK ignores the
position-dependent rotation; results carry a ``rope_note`` saying so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor

from tgeom.analyses.embedding.projection import EMBEDDING_NAMES
from tgeom.errors import TgeomError, check_index
from tgeom.linalg.topk import factored_topk
from tgeom.models.weights import CanonicalWeights
from tgeom.results import results_frame

if TYPE_CHECKING:
    import pandas as pd

Circuit = Literal["qk", "ov"]
ROPE_NOTE = (
    "this model uses rotary position embeddings: the token-only QK matrix ignores the rotation, "
    "so real attention scores also depend on the relative position of query and key."
)
ORIENTATION = {
    "qk": ("query token", "key token"),
    "ov": ("source (attended) token", "promoted (output) token"),
}


@dataclass
class InteractionPairs:
    """Top entries of one head's QK or OV matrix, best first (largest, or most negative)."""

    circuit: str
    layer: int
    head: int
    rows: Tensor  # [k'] int64 token ids
    cols: Tensor  # [k'] int64 token ids
    values: Tensor  # [k'] float32
    largest: bool
    embedding: str  # "W_U" | "W_E" | "custom"
    rope_note: str | None

    def pairs(self, vocab: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """``[{row, col, row_token, col_token, value}]``, best first."""
        out = []
        for r, c, v in zip(
            self.rows.tolist(), self.cols.tolist(), self.values.tolist(), strict=True
        ):
            entry: dict[str, Any] = {"row": r, "col": c}
            if vocab is not None:
                entry["row_token"], entry["col_token"] = vocab[r], vocab[c]
            entry["value"] = v
            out.append(entry)
        return out

    def to_json(self, vocab: Sequence[str] | None = None) -> dict[str, Any]:
        row_means, col_means = ORIENTATION[self.circuit]
        return {
            "circuit": self.circuit,
            "layer": self.layer,
            "head": self.head,
            "largest": self.largest,
            "embedding": self.embedding,
            "row_is": row_means,
            "col_is": col_means,
            "rope_note": self.rope_note,
            "pairs": self.pairs(vocab),
        }

    def to_frame(self, vocab: Sequence[str] | None = None) -> pd.DataFrame:
        """:meth:`pairs` as a DataFrame: row, col, (row_token, col_token with ``vocab``), value."""
        return results_frame(self.to_json(vocab), "pairs", ("pairs",))


def resolve_embedding(cw: CanonicalWeights, E: Tensor | str | None) -> tuple[Tensor, str]:
    """``None``/``"out"`` -> ``W_U``; ``"in"`` -> ``W_E``; a ``[V, d]`` tensor -> itself."""
    if E is None or isinstance(E, str):
        key = E or "out"
        if key not in EMBEDDING_NAMES:
            raise TgeomError(f"embedding must be 'out' (W_U) or 'in' (W_E), got {key!r}.")
        return (cw.W_U if key == "out" else cw.W_E), EMBEDDING_NAMES[key]
    if E.ndim != 2 or E.shape[1] != cw.W_E.shape[1]:
        raise TgeomError(f"the vocabulary matrix must be [V, {cw.W_E.shape[1]}].")
    return E, "custom"


def circuit_factors(
    cw: CanonicalWeights, layer: int, head: int, circuit: str, E: Tensor
) -> tuple[Tensor, Tensor]:
    """The two ``[V, d_head]`` factors of ``QK_h`` (``E W_Q, E W_K``) or ``OV_h``
    (``E W_V, E W_O^T``)."""
    check_index("layer", layer, len(cw.layers))
    lw = cw.layers[layer]
    check_index("head", head, lw.W_Q.shape[0])
    if circuit == "qk":
        return E @ lw.W_Q[head], E @ lw.W_K[head]
    if circuit == "ov":
        return E @ lw.W_V[head], E @ lw.W_O[head].T
    raise TgeomError(f"circuit must be qk or ov, got {circuit!r}.")


def head_top_pairs(
    cw: CanonicalWeights,
    layer: int,
    head: int,
    circuit: str,
    k: int,
    *,
    largest: bool = True,
    row_mask: Tensor | None = None,
    col_mask: Tensor | None = None,
    E: Tensor | str | None = None,
    chunk_size: int | None = None,
) -> InteractionPairs:
    """Exact top-k entries of head ``head``'s ``circuit`` ("qk" | "ov") matrix in ``layer``.

    ``row_mask`` / ``col_mask`` [V] bool: token filters on rows and columns (applied before
    selection). ``E``: vocabulary matrix (default ``W_U``; ``"in"`` for ``W_E``).
    """
    matrix, name = resolve_embedding(cw, E)
    A, B = circuit_factors(cw, layer, head, circuit, matrix)
    top = factored_topk(
        A, B, k, largest=largest, row_mask=row_mask, col_mask=col_mask, chunk_size=chunk_size
    )
    if len(top) == 0:
        raise TgeomError("the token filters leave no token pair; relax them.")
    rope = ROPE_NOTE if circuit == "qk" and cw.rotary is not None else None
    return InteractionPairs(
        circuit, layer, head, top.rows, top.cols, top.values, largest, name, rope
    )


def qk_top_pairs(
    cw: CanonicalWeights, layer: int, head: int, k: int, **kwargs: Any
) -> InteractionPairs:
    """Top entries of ``QK_h`` (row = query token, column = key token)."""
    return head_top_pairs(cw, layer, head, "qk", k, **kwargs)


def ov_top_pairs(
    cw: CanonicalWeights, layer: int, head: int, k: int, **kwargs: Any
) -> InteractionPairs:
    """Top entries of ``OV_h`` (row = source token, column = promoted token)."""
    return head_top_pairs(cw, layer, head, "ov", k, **kwargs)
