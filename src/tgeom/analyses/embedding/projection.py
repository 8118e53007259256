"""Parameters read as vocabulary scores [DAR] (SPEC section 3: vector projection, FFN, subheads).

A d-vector ``x`` is read through a vocabulary matrix ``E [V, d]`` as ``scores = x @ E.T``; the
top-k (and bottom-k) tokens summarise it. Parameters are projected raw: no bias, no norm gain,
unless ``fold_norm`` asks to multiply a *reading* vector (FFN key/gate, W_Q/W_K/W_V column) by the
gain of the norm that precedes it (writing vectors, FFN values and W_O rows, are unaffected).
The vocabulary matrix is ``W_U`` (``embedding="out"``, the output embedding; equal to ``W_E``
when tied) by default, or ``W_E`` (``embedding="in"``); results record which matrix was read
(``W_E`` for ``"out"`` too when the model has no LM head, e.g. MiniLM: its ``W_U`` is ``W_E``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from tgeom.errors import TgeomError, check_index
from tgeom.linalg.precision import scores_against
from tgeom.models.weights import CanonicalWeights, Norm
from tgeom.results import results_frame

if TYPE_CHECKING:
    import pandas as pd

Embedding = Literal["out", "in"]
EMBEDDING_NAMES = {"out": "W_U", "in": "W_E"}


@dataclass
class VocabProjection:
    """Top (or bottom) tokens of one or more vectors.

    ``token_ids, scores [n, k']`` (best first: highest, or lowest when ``bottom``), ``tokens``
    the display strings ``[n][k']`` (empty lists when no vocabulary was given).
    """

    token_ids: Tensor
    scores: Tensor
    tokens: list[list[str]]
    bottom: bool
    embedding: str

    def records(self, row: int = 0) -> list[dict[str, Any]]:
        """``[{rank, token_id, token, score}]`` of vector ``row``, best first."""
        ids, scores = self.token_ids[row].tolist(), self.scores[row].tolist()
        names = self.tokens[row] if self.tokens else [""] * len(ids)
        return [
            {"rank": r, "token_id": i, "token": t, "score": s}
            for r, (i, t, s) in enumerate(zip(ids, names, scores, strict=True))
        ]

    def to_frame(self, row: int = 0) -> pd.DataFrame:
        """:meth:`records` of vector ``row`` as a DataFrame: rank, token_id, token, score."""
        return results_frame({"records": self.records(row)}, "records", ("records",))


def project_vector(
    x: Tensor,
    E: Tensor,
    k: int,
    *,
    mask: Tensor | None = None,
    bottom: bool = False,
    vocab: Sequence[str] | None = None,
    embedding: str = "custom",
) -> VocabProjection:
    """Top-k (``bottom``: lowest-k) tokens of ``x [d]`` or ``x [n, d]`` read as ``x @ E.T``.

    ``mask [V]`` bool: excluded tokens are set to -inf (+inf for bottom) before selection, so
    ``k' = min(k, allowed tokens)`` come back. Ties go to the smaller token id.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise TgeomError(f"k must be a positive integer, got {k!r}; pass k >= 1.")
    xs = x.reshape(1, -1) if x.ndim == 1 else x
    if xs.ndim != 2 or xs.shape[1] != E.shape[1]:
        raise TgeomError(
            f"vector width {tuple(x.shape)} does not match the vocabulary matrix {tuple(E.shape)}."
        )
    scores = scores_against(xs, E)  # [n, V], float32 or better

    allowed = E.shape[0]
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != (E.shape[0],):
            raise TgeomError(f"the token mask must be a bool tensor of shape [{E.shape[0]}].")
        allowed = int(mask.sum())
        if allowed == 0:
            raise TgeomError("the token filters leave no token; relax them.")
        fill = float("inf") if bottom else float("-inf")
        scores = scores.masked_fill(~mask.to(scores.device), fill)
    kk = min(k, allowed)
    order = torch.sort(scores, dim=1, descending=not bottom, stable=True).indices[:, :kk]
    top = torch.gather(scores, 1, order)
    tokens = [[vocab[i] for i in row] for row in order.tolist()] if vocab is not None else []
    return VocabProjection(order.cpu(), top.cpu(), tokens, bottom, embedding)


def vocab_matrix(cw: CanonicalWeights, embedding: Embedding = "out") -> Tensor:
    """``W_U`` (``"out"``) or ``W_E`` (``"in"``), ``[V, d]``."""
    if embedding not in EMBEDDING_NAMES:
        raise TgeomError(f"embedding must be 'out' (W_U) or 'in' (W_E), got {embedding!r}.")
    return cw.W_U if embedding == "out" else cw.W_E


def embedding_name(cw: CanonicalWeights, embedding: Embedding = "out") -> str:
    """The name of the matrix :func:`vocab_matrix` returns: ``"W_U"`` or ``"W_E"``; a model
    without an LM head (BERT encoders such as MiniLM) has no unembedding, so ``"out"`` reads
    ``W_E`` and is named so."""
    vocab_matrix(cw, embedding)  # validates the name
    return "W_U" if embedding == "out" and cw.summary.has_lm_head else "W_E"


def preceding_norm(cw: CanonicalWeights, block: int, site: Literal["attn", "mlp"]) -> Norm | None:
    """The norm whose output the attention (``"attn"``) or MLP (``"mlp"``) of ``block`` reads.

    Pre-LN: the block's own ``ln_attn`` / ``ln_mlp``. Post-LN (BERT): the MLP reads the output
    of ``ln_attn`` of the same block; the attention reads ``ln_mlp`` of the previous block (the
    embedding norm for block 0). Norms on the sublayer outputs (OLMo 2): none, both read the
    residual stream itself.
    """
    lw = cw.layers[block]
    if cw.summary.norm_placement == "post_sublayer":
        return None
    if cw.summary.norm_placement == "pre":
        return lw.ln_attn if site == "attn" else lw.ln_mlp
    if site == "mlp":
        return lw.ln_attn
    return cw.embed_norm if block == 0 else cw.layers[block - 1].ln_mlp


def _fold(vector: Tensor, norm: Norm | None, fold_norm: bool) -> Tensor:
    return vector * norm.weight if fold_norm and norm is not None else vector


def neuron_vector(
    cw: CanonicalWeights, block: int, neuron: int, side: str, *, fold_norm: bool = False
) -> Tensor:
    """FFN neuron parameter ``[d]``: ``"key"`` = column of ``W_in``, ``"gate"`` = column of
    ``W_gate`` (gated MLPs), ``"value"`` = row of ``W_out``."""
    check_index("block", block, len(cw.layers))
    lw = cw.layers[block]
    check_index("neuron", neuron, lw.W_in.shape[1])
    if side == "key":
        return _fold(lw.W_in[:, neuron], preceding_norm(cw, block, "mlp"), fold_norm)
    if side == "gate":
        if lw.W_gate is None:
            raise TgeomError("this model's MLP has no gate; use --side key or value.")
        return _fold(lw.W_gate[:, neuron], preceding_norm(cw, block, "mlp"), fold_norm)
    if side == "value":
        return lw.W_out[neuron]
    raise TgeomError(f"side must be key, gate or value, got {side!r}.")


def subhead_vector(
    cw: CanonicalWeights, block: int, head: int, which: str, index: int, *, fold_norm: bool = False
) -> Tensor:
    """Subhead ``[d]``: column ``index`` of ``W_Q/W_K/W_V[head]`` (``q/k/v``) or row ``index``
    of ``W_O[head]`` (``o``)."""
    check_index("block", block, len(cw.layers))
    lw = cw.layers[block]
    check_index("head", head, lw.W_Q.shape[0])
    check_index("subhead index", index, lw.W_Q.shape[2])
    if which == "o":
        return lw.W_O[head, index]
    matrices = {"q": lw.W_Q, "k": lw.W_K, "v": lw.W_V}
    if which not in matrices:
        raise TgeomError(f"subhead must be q, k, v or o, got {which!r}.")
    vector = matrices[which][head, :, index]
    return _fold(vector, preceding_norm(cw, block, "attn"), fold_norm)


@dataclass
class ParameterProjection:
    """One parameter vector's top and bottom tokens, with what produced them."""

    parameter: dict[str, Any]  # e.g. {"kind": "neuron", "block": 3, "neuron": 7, "side": "key"}
    embedding: str  # "W_U" | "W_E"
    fold_norm: bool
    top: VocabProjection
    bottom: VocabProjection
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "parameter": self.parameter,
            "embedding": self.embedding,
            "fold_norm": self.fold_norm,
            "top": self.top.records(),
            "bottom": self.bottom.records(),
            **self.options,
        }

    def to_frame(self, table: str = "top") -> pd.DataFrame:
        """The ``top`` (or ``bottom``) tokens as a DataFrame: rank, token_id, token, score."""
        return results_frame(self.to_json(), table, ("top", "bottom"))


def project_parameter(
    lm: Any,
    *,
    block: int,
    neuron: int | None = None,
    side: str = "key",
    head: int | None = None,
    subhead: str = "v",
    index: int = 0,
    k: int = 20,
    mask: Tensor | None = None,
    embedding: Embedding = "out",
    fold_norm: bool = False,
) -> ParameterProjection:
    """Top and bottom ``k`` tokens of one parameter vector of ``lm`` (a LoadedModel): FFN
    ``neuron`` of ``block`` (its ``side``: key, gate or value, see :func:`neuron_vector`) or
    ``subhead[index]`` of ``head`` (q, k, v column or o row, see :func:`subhead_vector`).

    Pass exactly one of ``neuron`` and ``head``. The result's ``parameter`` records the choice
    (``{"kind": "neuron", block, neuron, side}`` or ``{"kind": "subhead", block, head, subhead,
    index}``)."""
    cw = lm.weights()
    parameter: dict[str, Any]
    if (neuron is None) == (head is None):
        raise TgeomError("pass exactly one of neuron= (an FFN neuron) or head= (a subhead).")
    if neuron is not None:
        parameter = {"kind": "neuron", "block": block, "neuron": neuron, "side": side}
        x = neuron_vector(cw, block, neuron, side, fold_norm=fold_norm)
    else:
        assert head is not None
        parameter = {"kind": "subhead", "block": block, "head": head, "subhead": subhead}
        parameter["index"] = index
        x = subhead_vector(cw, block, head, subhead, index, fold_norm=fold_norm)
    E = vocab_matrix(cw, embedding)
    name = embedding_name(cw, embedding)
    vocab = lm.vocab_strings
    top = project_vector(x, E, k, mask=mask, vocab=vocab, embedding=name)
    bottom = project_vector(x, E, k, mask=mask, bottom=True, vocab=vocab, embedding=name)
    return ParameterProjection(parameter, name, fold_norm, top, bottom)
