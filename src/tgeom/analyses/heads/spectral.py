"""Spectral head scores from ``[d_head, d_head]`` products (SPEC section 7, after Elhage et al.
2021): how much a head's OV circuit copies and how much its QK circuit matches a token to itself.

Both circuits of head ``h`` are ``[V, V]`` products of two ``[V, d_head]`` factors ``A B^T``
(SPEC section 3): ``OV_h = (E_rows W_V[h]) (E_cols W_O[h]^T)^T`` and
``QK_h = (E_rows W_Q[h]) (E_cols W_K[h])^T``. The nonzero eigenvalues of ``A B^T`` are those of
``B^T A`` (``[d_head, d_head]``), so the ``[V, V]`` matrix is never formed:

- ``OV``: eigenvalues of ``W_O[h] (E_cols^T E_rows) W_V[h]``;
- ``QK``: eigenvalues of ``W_K[h]^T (E_cols^T E_rows) W_Q[h]``, or with QK-norm (SPEC section
  1) of ``F_K^T F_Q`` with the normalised factors ``F_Q[v] = n_q(E_rows[v] W_Q)[h]`` and
  ``F_K[v] = n_k(E_cols[v] W_K)[h]``
  (:func:`~tgeom.analyses.embedding.interaction.qk_factor`), accumulated over the vocabulary a
  chunk of tokens at a time.

The score of a circuit is ``sum(Re lambda) / sum(|lambda|)`` over its eigenvalues, in
``[-1, 1]``: 1 when every eigenvalue is real and positive (an OV that is the identity on the
vocabulary; a QK that is positive semi-definite), -1 for the negated circuit; NaN where every
eigenvalue is zero (a head that writes nothing into the tokens' span). ``ov_copying`` is the
OV score, ``qk_same_token`` the QK score. The ratio is scale-free: a circuit that is tiny next
to the head's other circuits (e.g. an OV writing almost only outside the span of the
embeddings) still gets a score in ``[-1, 1]``. For rotary and ALiBi models the token-only QK
leaves positions out, as in ``weights topk`` (``position_note``).

The vocabulary matrices and token filtering are those of ``weights topk``
(:func:`~tgeom.analyses.embedding.interaction.circuit_embeddings`, ``E`` = ``"out"`` by
default, ``"in"``, ``"tl"`` or a tensor; a token ``mask`` keeps the same tokens on both sides:
the ``[V, V]`` matrix restricted to the kept rows and columns). Everything runs in float64.
Cost per model: one ``[d, d]`` Gram per circuit (``V d^2``) and per head a ``d^2 d_head``
product, except QK-norm, whose factors cost ``V d d_head`` per query head and per KV group
(use a ``mask`` of frequent tokens on large vocabularies: Gemma 3 has V = 262,144).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tgeom.analyses.embedding.interaction import (
    circuit_embeddings,
    describe_sides,
    embedding_convention,
    position_note,
    qk_factor,
    qk_norm_note,
    qk_token_scales,
)
from tgeom.errors import TgeomError, check_index
from tgeom.models.weights import CanonicalWeights, LayerWeights
from tgeom.runtime import one_cpu_thread

SCORES = {"ov": "ov_copying", "qk": "qk_same_token"}  # circuit -> score name
CHUNK_ROWS = 4096  # vocabulary rows per chunk (float64: 4096 x d numbers at a time)


def eigen_ratio(eigenvalues: Tensor) -> Tensor:
    """``sum(Re lambda) / sum(|lambda|)`` over the last dimension of ``eigenvalues [..., n]``
    (complex or real): ``[...]`` float64 in ``[-1, 1]``, NaN where every eigenvalue is 0."""
    lam = eigenvalues.to(torch.complex128)
    total = lam.abs().sum(-1)
    ratio = lam.real.sum(-1) / total
    return torch.where(total > 0, ratio, torch.full_like(ratio, float("nan")))


def token_ids(mask: Tensor | None, size: int, device: torch.device) -> Tensor | None:
    """The kept token ids of ``mask [V]`` (int64), None without a mask; refuses an empty one."""
    if mask is None:
        return None
    if mask.shape != (size,):
        raise TgeomError(f"the token mask must have one entry per token ({size}).")
    ids = mask.to(device).nonzero()[:, 0]
    if len(ids) == 0:
        raise TgeomError("the token filters leave no token of the vocabulary; relax them.")
    return ids


def _chunks(E_rows: Tensor, E_cols: Tensor, ids: Tensor | None, chunk_rows: int) -> Any:
    """``(E_rows[c], E_cols[c])`` in float64, ``[n, d]`` each, for consecutive chunks ``c`` of
    the kept tokens (all tokens when ``ids`` is None)."""
    n = E_rows.shape[0] if ids is None else len(ids)
    for start in range(0, n, chunk_rows):
        part = slice(start, start + chunk_rows)
        rows = E_rows[part] if ids is None else E_rows[ids[part]]
        cols = E_cols[part] if ids is None else E_cols[ids[part]]
        yield rows.double(), cols.double()


def vocabulary_gram(
    E_rows: Tensor, E_cols: Tensor, ids: Tensor | None = None, chunk_rows: int = CHUNK_ROWS
) -> Tensor:
    """``E_cols[ids]^T E_rows[ids]``, ``[d, d]`` float64, over the tokens ``ids`` (all when
    None) of ``E_rows, E_cols [V, d]``, ``chunk_rows`` tokens at a time."""
    d = E_rows.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float64, device=E_rows.device)
    for rows, cols in _chunks(E_rows, E_cols, ids, chunk_rows):
        gram += cols.T @ rows
    return gram


def eigenvalues(core: Tensor) -> Tensor:
    """``torch.linalg.eigvals`` of ``core [..., n, n]`` (complex128 for float64), on one intra-op
    thread on the CPU (:func:`~tgeom.runtime.one_cpu_thread`): LAPACK's ``geev`` on small
    matrices gains nothing from threads and loses much when the cores are shared (Gemma 3's
    ``[4, 256, 256]`` on 2 loaded cores: 5.2 s on 2 threads, 0.35 s on one)."""
    with one_cpu_thread(core.device):
        return torch.linalg.eigvals(core)


def ov_eigenvalues(lw: LayerWeights, gram: Tensor) -> Tensor:
    """``[H, d_head]`` complex128: the eigenvalues of ``W_O[h] G W_V[h]`` for every head ``h``
    of one block (``gram`` ``G = E_cols^T E_rows [d, d]``): the nonzero eigenvalues of
    ``OV_h = E_rows W_V[h] W_O[h] E_cols^T``."""
    core = lw.W_O.double() @ gram @ lw.W_V.double()  # [H, dh, dh]
    return eigenvalues(core)


def qk_eigenvalues(lw: LayerWeights, gram: Tensor) -> Tensor:
    """``[H, d_head]`` complex128: the eigenvalues of ``W_K[h]^T G W_Q[h]`` (no QK-norm), the
    nonzero eigenvalues of ``QK_h = E_rows W_Q[h] W_K[h]^T E_cols^T``."""
    core = lw.W_K.double().transpose(1, 2) @ gram @ lw.W_Q.double()
    return eigenvalues(core)


def qk_norm_eigenvalues(
    lw: LayerWeights,
    E_rows: Tensor,
    E_cols: Tensor,
    n_kv_heads: int,
    ids: Tensor | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> Tensor:
    """``[H, d_head]`` complex128: the eigenvalues of ``F_K^T F_Q`` for every head of a block
    with QK-norm, the nonzero eigenvalues of ``QK_h = F_Q F_K^T`` (module docstring), with
    ``F_Q [V, d_head]`` from ``E_rows`` and ``F_K`` from ``E_cols`` (``[V, d]`` each) over the
    tokens ``ids``. The key factor of each of the ``n_kv_heads`` groups is computed once per
    chunk of ``chunk_rows`` tokens and shared by the group's query heads."""
    if lw.q_norm is None or lw.k_norm is None:
        raise TgeomError("qk_norm_eigenvalues needs a block with QK-norm.")
    H, _, dh = lw.W_Q.shape
    group = H // n_kv_heads
    W_Q, W_K = lw.W_Q.double(), lw.W_K.double()
    core = torch.zeros(H, dh, dh, dtype=torch.float64, device=W_Q.device)
    for rows, cols in _chunks(E_rows, E_cols, ids, chunk_rows):
        q_scales = _all_head_scales(rows, W_Q, lw.q_norm)
        k_scales = _all_head_scales(cols, W_K, lw.k_norm)
        for kv in range(n_kv_heads):
            F_K = qk_factor(cols, W_K, lw.k_norm, kv * group, scales=k_scales)  # [n, dh]
            for h in range(kv * group, (kv + 1) * group):
                core[h] += F_K.T @ qk_factor(rows, W_Q, lw.q_norm, h, scales=q_scales)
    return eigenvalues(core)


def _all_head_scales(E: Tensor, W: Tensor, norm: Any) -> Tensor | None:
    """QK-norm over all heads at once (OLMo 2): the tokens' scales ``[n, 1]``; else None."""
    return qk_token_scales(E, W, norm) if norm.scope == "all" else None


@dataclass
class SpectralScores:
    """``ov_copying`` and ``qk_same_token`` of every head of the chosen ``blocks``: ``[len(blocks),
    H]`` float64 each (row ``i`` is block ``blocks[i]``; NaN where a circuit is zero on the kept
    tokens), with the vocabulary matrices used (``sides``: per circuit, the matrix embedding the
    row and column tokens), the ``convention`` ("dar" | "tl") and the number of kept tokens."""

    ov_copying: Tensor
    qk_same_token: Tensor
    blocks: list[int]
    convention: str
    sides: dict[str, dict[str, str]]
    n_tokens: int
    qk_norm_note: str | None = None
    position_note: str | None = None  # what the token-only QK leaves out (RoPE, ALiBi)
    options: dict[str, Any] = field(default_factory=dict)

    def score(self, name: str, block: int, head: int) -> float:
        """One head's ``name`` score (``"ov_copying"`` | ``"qk_same_token"``)."""
        return float(getattr(self, name)[self.blocks.index(block), head])

    def rows(self) -> list[dict[str, Any]]:
        """``[{block, head, ov_copying, qk_same_token}]`` in block, head order."""
        return [
            {
                "block": block,
                "head": head,
                "ov_copying": float(self.ov_copying[i, head]),
                "qk_same_token": float(self.qk_same_token[i, head]),
            }
            for i, block in enumerate(self.blocks)
            for head in range(self.ov_copying.shape[1])
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "definition": "sum(Re lambda) / sum(|lambda|) over the circuit's eigenvalues",
            "embedding_convention": self.convention,
            "embedding_sides": self.sides,
            "embedding": {c: describe_sides(s["rows"], s["cols"]) for c, s in self.sides.items()},
            "n_tokens": self.n_tokens,
            "qk_norm_note": self.qk_norm_note,
            "position_note": self.position_note,
            "blocks": self.blocks,
            "ov_copying": self.ov_copying.tolist(),
            "qk_same_token": self.qk_same_token.tolist(),
            **self.options,
        }


def spectral_scores(
    cw: CanonicalWeights,
    *,
    E: Tensor | str | None = None,
    mask: Tensor | None = None,
    blocks: Iterable[int] | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> SpectralScores:
    """``ov_copying`` and ``qk_same_token`` of every head of ``blocks`` (default all), exactly
    (module docstring). ``E``: the vocabulary matrices, as ``weights topk`` reads them
    (``"out"`` default, ``"in"``, ``"tl"`` or a ``[V, d]`` tensor); ``mask [V]`` bool: the
    tokens kept on both sides (special tokens dropped, frequent tokens...), None for all. The
    ``[d, d]`` Grams are computed once per model; QK-norm factors once per block and KV group.
    """
    chosen = _blocks(blocks, len(cw.layers))
    sides: dict[str, dict[str, str]] = {}
    embeddings: dict[str, tuple[Tensor, Tensor]] = {}
    for circuit in ("qk", "ov"):
        (E_rows, row_name), (E_cols, col_name) = circuit_embeddings(cw, circuit, E)
        sides[circuit] = {"rows": row_name, "cols": col_name}
        embeddings[circuit] = (E_rows, E_cols)
    V = embeddings["ov"][0].shape[0]
    ids = token_ids(mask, V, embeddings["ov"][0].device)
    qk_norm = bool(cw.layers) and cw.layers[0].q_norm is not None
    grams = {
        circuit: vocabulary_gram(*embeddings[circuit], ids, chunk_rows)
        for circuit in (("ov",) if qk_norm else ("qk", "ov"))
    }
    ov, qk = [], []
    for block in chosen:
        lw = cw.layers[block]
        ov.append(eigen_ratio(ov_eigenvalues(lw, grams["ov"])))
        if qk_norm:
            lam = qk_norm_eigenvalues(lw, *embeddings["qk"], cw.summary.n_kv_heads, ids, chunk_rows)
        else:
            lam = qk_eigenvalues(lw, grams["qk"])
        qk.append(eigen_ratio(lam))
    H = cw.summary.n_heads
    empty = torch.zeros(0, H, dtype=torch.float64)
    return SpectralScores(
        ov_copying=torch.stack(ov).cpu() if ov else empty,
        qk_same_token=torch.stack(qk).cpu() if qk else empty,
        blocks=chosen,
        convention=embedding_convention(E),
        sides=sides,
        n_tokens=V if ids is None else len(ids),
        qk_norm_note=qk_norm_note(cw),
        position_note=position_note(cw),
    )


def _blocks(blocks: Iterable[int] | None, n_blocks: int) -> list[int]:
    """``blocks`` sorted without repeats (all when None), each in range."""
    if blocks is None:
        return list(range(n_blocks))
    chosen = sorted({int(b) for b in blocks})
    if not chosen:
        raise TgeomError("no block chosen: pass at least one, or none for all.")
    for block in chosen:
        check_index("block", block, n_blocks)
    return chosen
