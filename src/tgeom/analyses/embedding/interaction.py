"""Per-head interaction matrices in token space and their exact top pairs [DAR] (SPEC section 3).

``QK_h = E W_Q[h] W_K[h]^T E^T`` (row = query token, column = key token) and
``OV_h = E W_V[h] W_O[h] E^T`` (row = source token the head attends to, column = token promoted
in the output) are ``[V, V]``; each is the product of two ``[V, d_head]`` factors, and
:func:`tgeom.linalg.topk.factored_topk` returns their top entries without materialising them.
Raw parameters, no biases, no attention scale. For rotary models the token-only QK ignores the
position-dependent rotation; results carry a ``rope_note`` saying so.

Precision: for bfloat16 / float16 weights the factors are computed in float64 from those
weights (a product of two such numbers is exact in float64), a few thousand vocabulary rows at a
time (no float64 copy of ``E``); the top-k screens in the weights' own dtype and rescores in
float64, so the pairs are those of the dense float64 product of the same weights.

QK-norm heads (Qwen 3, OLMo 2; SPEC section 1) read the normalised factors
``F_Q[v] = n_q(E[v] W_Q)[h]`` and ``F_K[v] = n_k(E[v] W_K)[h]``: each token's projection divided
by its own RMS (over the head's ``d_head`` coordinates, or over all heads' projection for OLMo 2),
times the gain (:func:`qk_factor`); results carry a ``qk_norm_note`` saying so.

Which vocabulary matrix sits on each side (SPEC sections 0 and 3; ``E`` argument, CLI
``--embedding``):

- ``"out"`` (default) / ``"in"`` / a ``[V, d]`` tensor: Dar et al.'s convention, one matrix ``E``
  on both sides of both circuits: ``W_U`` (``"out"``), ``W_E`` (``"in"``) or the tensor.
- ``"tl"``: TransformerLens' convention for untied models, each side read by the matrix that
  belongs there: a token that *enters* the head is embedded with ``E_in = W_E`` and a token the
  head *promotes* is read with ``E_out = W_U``. So ``QK_h = W_E W_Q W_K^T W_E^T`` (query and key
  tokens are both inputs) and ``OV_h = W_E W_V W_O W_U^T`` (source token in, promoted token
  out): TransformerLens' full QK and OV circuits (its ``QK``/``OV`` factored matrices with the
  input embedding on the input sides and the unembedding on the output side).

A model without an LM head (BERT encoders such as MiniLM) has no ``W_U``: its ``W_E`` is read
instead and named so. Results record the convention and the matrix used on each side
(``row_embedding``, ``col_embedding``); for tied models ``W_U`` and ``W_E`` are the same matrix
and the conventions agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from tgeom.analyses.embedding.projection import Embedding, embedding_name, vocab_matrix
from tgeom.errors import TgeomError, check_index
from tgeom.linalg.precision import LOW_PRECISION
from tgeom.linalg.topk import factored_topk
from tgeom.models.weights import CanonicalWeights, QKNorm
from tgeom.results import results_frame

if TYPE_CHECKING:
    import pandas as pd

Circuit = Literal["qk", "ov"]
ROPE_NOTE = (
    "this model uses rotary position embeddings: the token-only QK matrix ignores the rotation, "
    "so real attention scores also depend on the relative position of query and key."
)
ALIBI_NOTE = (
    "this model uses ALiBi: each head adds slope * (key position - query position) to its "
    "scores, which the token-only QK matrix leaves out (it does not depend on the tokens)."
)


def position_note(cw: CanonicalWeights) -> str | None:
    """What the token-only QK matrix leaves out of the model's scores: rotary's rotation or
    ALiBi's bias (None for learned positions, which enter through the tokens' hidden states)."""
    if cw.rotary is not None:
        return ROPE_NOTE
    return ALIBI_NOTE if cw.alibi_slopes is not None else None


QK_NORM_NOTE = (
    "this model normalises queries and keys (QK-norm, {scope}): the QK pairs use the normalised "
    "factors n_q(E[v] W_Q) and n_k(E[v] W_K), each token's projection divided by its own RMS "
    "and times the gain (no bias)."
)
QK_NORM_SCOPES = {"head": "per head", "all": "over all heads at once"}
SOFTCAP_NOTE = (
    "this model soft-caps its attention scores at {cap} (cap * tanh(score / cap), monotone, so "
    "the top pairs are unchanged); the QK values are reported uncapped."
)
EMBEDDINGS = ("out", "in", "tl")  # the named choices of ``E`` (besides a tensor)
ORIENTATION = {
    "qk": ("query token", "key token"),
    "ov": ("source (attended) token", "promoted (output) token"),
}


@dataclass
class InteractionPairs:
    """Top entries of one head's QK or OV matrix, best first (largest, or most negative)."""

    circuit: str
    block: int
    head: int
    rows: Tensor  # [k'] int64 token ids
    cols: Tensor  # [k'] int64 token ids
    values: Tensor  # [k'] float32 (float64 for bfloat16 / float16 weights)
    largest: bool
    row_embedding: str  # the matrix embedding the row tokens: "W_U" | "W_E" | "custom"
    col_embedding: str  # the matrix embedding the column tokens
    convention: str  # "dar" (one matrix on both sides) | "tl" (W_E in, W_U out)
    rope_note: str | None
    qk_norm_note: str | None = None
    softcap_note: str | None = None

    @property
    def embedding(self) -> str:
        """The matrices in one string: ``"W_U"`` when both sides use it, else ``"W_E / W_U"``
        (rows / columns)."""
        return describe_sides(self.row_embedding, self.col_embedding)

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
            "block": self.block,
            "head": self.head,
            "largest": self.largest,
            "embedding": self.embedding,
            "embedding_convention": self.convention,
            "row_embedding": self.row_embedding,
            "col_embedding": self.col_embedding,
            "row_is": row_means,
            "col_is": col_means,
            "rope_note": self.rope_note,
            "qk_norm_note": self.qk_norm_note,
            "softcap_note": self.softcap_note,
            "pairs": self.pairs(vocab),
        }

    def to_frame(self, vocab: Sequence[str] | None = None) -> pd.DataFrame:
        """:meth:`pairs` as a DataFrame: row, col, (row_token, col_token with ``vocab``), value."""
        return results_frame(self.to_json(vocab), "pairs", ("pairs",))


def describe_sides(row_name: str, col_name: str) -> str:
    """``"W_U"`` when both sides use one matrix, else ``"W_E / W_U"`` (rows / columns)."""
    return row_name if row_name == col_name else f"{row_name} / {col_name}"


def embedding_convention(E: Tensor | str | None) -> str:
    """``"tl"`` for ``E="tl"``, else ``"dar"`` (one matrix on both sides); validates ``E``."""
    if isinstance(E, str) and E not in EMBEDDINGS:
        raise TgeomError(
            f"embedding must be 'out' (W_U), 'in' (W_E) or 'tl' (W_E in, W_U out), got {E!r}."
        )
    return "tl" if E == "tl" else "dar"


def circuit_embeddings(
    cw: CanonicalWeights, circuit: str, E: Tensor | str | None = None
) -> tuple[tuple[Tensor, str], tuple[Tensor, str]]:
    """``((E_rows, name), (E_cols, name))``, each ``[V, d]``: the vocabulary matrix that embeds
    the row tokens and the column tokens of ``circuit`` under ``E`` (module docstring):
    ``None``/``"out"`` -> ``W_U`` on both sides; ``"in"`` -> ``W_E``; a tensor -> itself
    (``"custom"``); ``"tl"`` -> ``W_E`` on both QK sides and on the OV rows, ``W_U`` on the OV
    columns. ``W_U`` is named ``W_E`` on a model without an LM head."""
    if circuit not in ORIENTATION:
        raise TgeomError(f"circuit must be qk or ov, got {circuit!r}.")
    convention = embedding_convention(E)
    if isinstance(E, Tensor):
        if E.ndim != 2 or E.shape[1] != cw.W_E.shape[1]:
            raise TgeomError(f"the vocabulary matrix must be [V, {cw.W_E.shape[1]}].")
        return (E, "custom"), (E, "custom")
    if convention == "tl":
        rows = (cw.W_E, embedding_name(cw, "in"))
        return rows, ((cw.W_U, embedding_name(cw, "out")) if circuit == "ov" else rows)
    key: Embedding = "in" if E == "in" else "out"
    side = (vocab_matrix(cw, key), embedding_name(cw, key))
    return side, side


def qk_norm_note(cw: CanonicalWeights) -> str | None:
    """What QK pairs of ``cw`` read under QK-norm (:data:`QK_NORM_NOTE`), or None without it."""
    norm = cw.layers[0].q_norm if cw.layers else None
    return None if norm is None else QK_NORM_NOTE.format(scope=QK_NORM_SCOPES[norm.scope])


def softcap_note(cw: CanonicalWeights) -> str | None:
    """The attention soft-cap the QK values are reported without (:data:`SOFTCAP_NOTE`), or
    None where the model has none (SPEC section 1, "Soft-capping")."""
    cap = cw.summary.attn_logit_softcap
    return None if cap is None else SOFTCAP_NOTE.format(cap=cap)


def wide(t: Tensor) -> Tensor:
    """float64 for a bfloat16 / float16 tensor (the factors of its exact top pairs), else
    ``t`` itself."""
    return t.double() if t.dtype in LOW_PRECISION else t


def project_rows(E: Tensor, W: Tensor, chunk_rows: int = 4096) -> Tensor:
    """``E @ W`` (``E [V, d]``, ``W [d, n]``) -> ``[V, n]``; for bfloat16 / float16 inputs in
    float64, ``chunk_rows`` rows of ``E`` at a time."""
    if E.dtype not in LOW_PRECISION and W.dtype not in LOW_PRECISION:
        return E @ W
    W64 = W.double()
    return torch.cat([chunk.double() @ W64 for chunk in E.split(chunk_rows)])


def qk_token_scales(E: Tensor, W: Tensor, norm: QKNorm, chunk_rows: int = 4096) -> Tensor:
    """``[V, 1]``: each token's QK-norm factor ``1 / sqrt(mean(x^2) + eps)`` over its projection
    ``x = E[v] W`` on every head (scope ``"all"``; ``E [V, d]``, ``W [H, d, d_head]``), computed
    ``chunk_rows`` tokens at a time so at most ``chunk_rows x H d_head`` numbers are held. The
    same for every head of a block."""
    chunks, Ww = E.split(chunk_rows), wide(W)
    return torch.cat(
        [norm.inverse_scale(torch.einsum("vd,hde->hve", wide(c), Ww))[0] for c in chunks]
    )


def qk_factor(
    E: Tensor,
    W: Tensor,
    norm: QKNorm | None,
    head: int,
    chunk_rows: int = 4096,
    scales: Tensor | None = None,
) -> Tensor:
    """``[V, d_head]``: head ``head``'s token factor ``E W[head]`` (``E [V, d]``, ``W [H, d,
    d_head]``), or with QK-norm ``n(E W)[head]``: each token's projection normalised as the model
    normalises it, by the RMS of its own ``d_head`` coordinates (scope ``"head"``) or of its
    projection on every head (``"all"``: :func:`qk_token_scales`, or ``scales`` when the caller
    already has them), times the gain. float64 for bfloat16 / float16 weights
    (:func:`project_rows`)."""
    x = project_rows(E, W[head], chunk_rows)
    if norm is None:
        return x
    if norm.scope == "head":
        inverse = norm.inverse_scale(x[None])[0]
    else:
        inverse = scales if scales is not None else qk_token_scales(E, W, norm, chunk_rows)
    return (norm.weight[head] * (x * inverse)).to(x.dtype)


def circuit_factors(
    cw: CanonicalWeights,
    block: int,
    head: int,
    circuit: str,
    E: Tensor,
    E_cols: Tensor | None = None,
    qk_scales: dict[tuple[int, str], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """The two ``[V, d_head]`` factors of ``QK_h`` (``E W_Q, E_cols W_K``; normalised under
    QK-norm, :func:`qk_factor`) or ``OV_h`` (``E W_V, E_cols W_O^T``); ``E_cols`` (default
    ``E``) embeds the column tokens. ``qk_scales``: a cache of QK-norm token scales over all
    heads, keyed ``(block, "q" | "k")``, filled on first use; valid while ``E`` and ``E_cols``
    stay the same (the atlas reads every head of a block with one)."""
    check_index("block", block, len(cw.layers))
    lw = cw.layers[block]
    check_index("head", head, lw.W_Q.shape[0])
    cols = E if E_cols is None else E_cols
    if circuit == "qk":

        def side(E_side: Tensor, W: Tensor, norm: QKNorm | None, key: str) -> Tensor:
            if qk_scales is None or norm is None or norm.scope != "all":
                return qk_factor(E_side, W, norm, head)
            if (block, key) not in qk_scales:
                qk_scales[block, key] = qk_token_scales(E_side, W, norm)
            return qk_factor(E_side, W, norm, head, scales=qk_scales[block, key])

        return side(E, lw.W_Q, lw.q_norm, "q"), side(cols, lw.W_K, lw.k_norm, "k")
    if circuit == "ov":
        return project_rows(E, lw.W_V[head]), project_rows(cols, lw.W_O[head].T)
    raise TgeomError(f"circuit must be qk or ov, got {circuit!r}.")


def head_top_pairs(
    cw: CanonicalWeights,
    block: int,
    head: int,
    circuit: str,
    k: int,
    *,
    largest: bool = True,
    row_mask: Tensor | None = None,
    col_mask: Tensor | None = None,
    E: Tensor | str | None = None,
    chunk_size: int | None = None,
    qk_scales: dict[tuple[int, str], Tensor] | None = None,
) -> InteractionPairs:
    """Exact top-k entries of head ``head``'s ``circuit`` ("qk" | "ov") matrix in ``block``.

    ``row_mask`` / ``col_mask`` [V] bool: token filters on rows and columns (applied before
    selection). ``E``: the vocabulary matrices (module docstring): ``"out"`` (default, ``W_U``
    on both sides), ``"in"`` (``W_E``), ``"tl"`` (``W_E`` in, ``W_U`` out) or a ``[V, d]``
    tensor. ``qk_scales``: see :func:`circuit_factors` (it then holds the masked tokens' scales).
    Only the tokens a mask keeps are embedded (every factor row, QK-norm included, depends on its
    own token alone), so a mask of N tokens costs N, not V, rows (Gemma 3: V = 262,144).
    """
    (E_rows, row_name), (E_cols, col_name) = circuit_embeddings(cw, circuit, E)
    row_ids = None if row_mask is None else row_mask.to(E_rows.device).nonzero()[:, 0]
    col_ids = None if col_mask is None else col_mask.to(E_cols.device).nonzero()[:, 0]
    if (row_ids is not None and len(row_ids) == 0) or (col_ids is not None and len(col_ids) == 0):
        raise TgeomError("the token filters leave no token pair; relax them.")
    # A mask keeping few tokens embeds only those (Gemma 3's 4,096 frequent tokens of 262,144:
    # N factor rows, not V); one keeping most (the special tokens dropped) masks inside the
    # top-k instead: gathering would copy W_U[kept] per side (1.1B Llama in bf16: 2 x 131 MB).
    row_ids = row_ids if row_ids is not None and 2 * len(row_ids) <= len(E_rows) else None
    col_ids = col_ids if col_ids is not None and 2 * len(col_ids) <= len(E_cols) else None
    if row_ids is not None:
        E_rows = E_rows[row_ids]
    if col_ids is not None:
        E_cols = E_cols[col_ids]
    A, B = circuit_factors(cw, block, head, circuit, E_rows, E_cols, qk_scales)
    weights = cw.layers[block].W_V.dtype
    screen = weights if weights in LOW_PRECISION else None  # in the model's own precision
    top = factored_topk(
        A,
        B,
        k,
        largest=largest,
        row_mask=row_mask if row_ids is None else None,
        col_mask=col_mask if col_ids is None else None,
        chunk_size=chunk_size,
        screen_dtype=screen,
    )
    if len(top) == 0:
        raise TgeomError("the token filters leave no token pair; relax them.")
    if row_ids is not None:  # back to vocabulary ids
        top = replace(top, rows=row_ids[top.rows.to(row_ids.device)].to(top.rows.device))
    if col_ids is not None:
        top = replace(top, cols=col_ids[top.cols.to(col_ids.device)].to(top.cols.device))
    rope = position_note(cw) if circuit == "qk" else None
    return InteractionPairs(
        circuit,
        block,
        head,
        top.rows,
        top.cols,
        top.values,
        largest,
        row_name,
        col_name,
        embedding_convention(E),
        rope,
        qk_norm_note(cw) if circuit == "qk" else None,
        softcap_note(cw) if circuit == "qk" else None,
    )


def qk_top_pairs(
    cw: CanonicalWeights, block: int, head: int, k: int, **kwargs: Any
) -> InteractionPairs:
    """Top entries of ``QK_h`` (row = query token, column = key token)."""
    return head_top_pairs(cw, block, head, "qk", k, **kwargs)


def ov_top_pairs(
    cw: CanonicalWeights, block: int, head: int, k: int, **kwargs: Any
) -> InteractionPairs:
    """Top entries of ``OV_h`` (row = source token, column = promoted token)."""
    return head_top_pairs(cw, block, head, "ov", k, **kwargs)
