"""The paper's four-part picture of the QK logits [SZ] (SPEC section 4, "Attention"): a figure.

Its parts do not add up to shares of anything a head does (the global mean and the biases sit
on the positional side and the squares of a sum are not the sum of the squares): on MiniLM's
block 2 pos-pos carried 0.90-1.00 of the summed squares for all 12 heads. The numbers
``tgeom geometry qk`` reports are the exact key-side variance split
(:mod:`tgeom.analyses.geometry.keyside`); this module draws the picture beside it, and its
parts are never reported as shares.

Block ``b`` (0-based) reads hidden state ``b``: its attention input is ``norm(hidden[b])``
(pre-LN; post-LN models read ``hidden[b]`` directly). With ``h[c, t] = mu + pos_t + ctx_c +
resid`` we write the query-side input as ``x = P(t) + C(c)`` where ``P(t) = lin(mu + pos_t) +
beta`` (global mean and position) and ``C(c) = lin(ctx_c)``; then for query (c, t) and key (c, s)

    logit = scale * q(t, c) . k(s, c) = pos-pos + pos-ctx + ctx-pos + ctx-ctx

with ``q = (P(t) + C(c)) W_Q + b_Q`` (bias on the positional side), likewise ``k``, rotary
embeddings applied at t and s (rotation is linear, so the split stays exact). The residual is
left out (it averages to zero over contexts and positions). QK-norm (Qwen 3, OLMo 2) is made
linear per token as SPEC section 4 says: each part of the query ``(c, t)`` is divided by that
token's own QK-norm scale (the RMS of its whole projection ``x W_Q + b_Q``, per head or over all
heads) and multiplied by the gain, likewise for keys, so the parts still sum to the logit.
ALiBi (BLOOM) adds a fifth, purely positional part, ``slope[h] * (s - t)`` (SPEC section 1,
"ALiBi"; the reference forward's bias), the same for every context.

The norm is not linear; we use its corpus-level linearisation: ``lin(h) = gamma * center(h) / s``
with ``s`` the root-mean-square norm of hidden state ``b``'s vectors over the whole corpus
(``center`` removes the channel mean for LayerNorm and is the identity for RMSNorm). This choice
is recorded in the results. Parts are summarised by their root-mean-square over contexts and
the position pairs the block computes: a query sees
keys ``s <= t`` in a causal model, and in a sliding-window block only the keys of its window
(``t - w < s <= t``, :func:`tgeom.models.weights.window_keys`, the reference forward's mask), so
a query weighs in by its number of visible keys (SPEC section 1, "Sliding windows"). Positions
are consecutive, so the window (a bound on ``t - s``) is the same on the split's positions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tgeom.analyses.geometry.stats import GeometryStats
from tgeom.errors import check_index
from tgeom.models.weights import (
    CanonicalWeights,
    Norm,
    QKNorm,
    Rotary,
    attention_window,
    layer_rotary,
    window_keys,
)

PARTS = ("pos-pos", "pos-ctx", "ctx-pos", "ctx-ctx")
ALIBI = "alibi"
QK_NORM_SPLIT = (
    "QK-norm (scope: {scope}): every part of a query (key) is divided by that token's own "
    "QK-norm scale and multiplied by the gain, so the parts sum to the logits exactly; "
    "wqk_positional_share folds the gains into W_Q and W_K"
)


def linearised_norm(norm: Norm | None, scale: float) -> Any:
    """``h -> gamma * center(h) / scale`` (the bias is added on the positional side)."""

    def apply(h: Tensor) -> Tensor:
        if norm is None:
            return h
        centred = h - h.mean(-1, keepdim=True) if norm.kind == "layernorm" else h
        return norm.weight.double() * centred / scale

    return apply


def split_inputs(
    stats: GeometryStats, cw: CanonicalWeights, block: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``P [T', d]``, ``C [C, d]`` (float64) and the positions ``[T']`` of block ``block``'s
    attention input (hidden state ``block``), under the linearised norm."""
    check_index("block", block, len(cw.layers))
    dec = stats.decomposition(block)
    n = stats.n_windows * stats.n_positions
    pre_norm = cw.summary.norm_placement == "pre"
    norm = cw.layers[block].ln_attn if pre_norm else None
    rms = float((stats.sumsq[block].sum() / n / stats.d_model) ** 0.5)
    lin = linearised_norm(norm, rms)
    beta = norm.bias.double() if norm is not None and norm.bias is not None else 0.0
    P = lin(dec.mu[None, :] + dec.pos) + beta
    C = lin(dec.ctx)
    first = 0 if stats.meta.get("options", {}).get("keep_first", False) else 1
    positions = torch.arange(first, first + stats.n_positions)
    return P, C, positions


def _sides(
    P: Tensor,
    C: Tensor,
    W: Tensor,
    b: Tensor,
    norm: QKNorm | None,
    rotary: Rotary | None,
    positions: Tensor,
) -> tuple[Tensor, Tensor]:
    """The positional and context parts, each ``[C, H, T', dh]``, of the queries (or keys) of
    ``x = P(t) + C(c)``: ``P W + b`` and ``C W``. Under QK-norm both are divided by the token's
    own QK-norm scale (the RMS of its whole ``x W + b``, per head or over all heads) and
    multiplied by the gain, so they still sum to ``n(x W + b)``; then rotary at ``positions``
    (rotation is linear)."""
    T, n_ctx = P.shape[0], C.shape[0]
    pos = torch.einsum("td,hde->hte", P, W.double()) + b.double()[:, None, :]
    pos = pos[None].expand(n_ctx, -1, -1, -1)
    ctx = torch.einsum("cd,hde->che", C, W.double())[:, :, None, :].expand(-1, -1, T, -1)
    if norm is not None:
        factor = norm.weight.double()[:, None, :] * norm.inverse_scale(pos + ctx)
        pos, ctx = factor * pos, factor * ctx
    if rotary is not None:
        pos, ctx = rotary.apply(pos, positions), rotary.apply(ctx, positions)
    return pos, ctx


def parts_of(cw: CanonicalWeights) -> tuple[str, ...]:
    """The names of the logit parts of ``cw``'s heads: :data:`PARTS`, then ``alibi`` for ALiBi
    models."""
    return PARTS + ((ALIBI,) if cw.alibi_slopes is not None else ())


def logit_parts(stats: GeometryStats, cw: CanonicalWeights, block: int) -> dict[str, Tensor]:
    """The parts (:func:`parts_of`) of every head's logits, each ``[C, H, T', T']`` float64
    (query position t, key position s); their sum is the logit of ``x = P(t) + C(c)``. Without
    QK-norm pos-pos is the same for every context; with it, every part carries the query's and
    the key's own QK-norm scale. ALiBi's part is ``slope[h] * (s - t)``, unscaled, the same for
    every context."""
    P, C, positions = split_inputs(stats, cw, block)
    lw = cw.layers[block]
    rotary = layer_rotary(cw, block)  # Gemma 3: local layers have their own base
    q_pos, q_ctx = _sides(P, C, lw.W_Q, lw.b_Q, lw.q_norm, rotary, positions)
    k_pos, k_ctx = _sides(P, C, lw.W_K, lw.b_K, lw.k_norm, rotary, positions)
    scale = cw.attn_scale
    parts = {
        "pos-pos": scale * torch.einsum("chte,chse->chts", q_pos, k_pos),
        "pos-ctx": scale * torch.einsum("chte,chse->chts", q_pos, k_ctx),
        "ctx-pos": scale * torch.einsum("chte,chse->chts", q_ctx, k_pos),
        "ctx-ctx": scale * torch.einsum("chte,chse->chts", q_ctx, k_ctx),
    }
    if cw.alibi_slopes is not None:
        distance = (positions[None, :] - positions[:, None]).double()  # [t, s]: s - t
        alibi = cw.alibi_slopes.double()[:, None, None] * distance  # [H, T', T']
        parts[ALIBI] = alibi[None].expand_as(parts["pos-pos"])
    return parts


PICTURE_CAPTION = (
    "The paper's four-part picture (pos-pos, pos-ctx, ctx-pos, ctx-ctx; the global mean and the "
    "biases on the positional side, the norm linearised at the corpus scale): the RMS of each "
    "part over contexts and the (t, s) pairs the block computes. The parts do not add up and "
    "are not shares; the key-side split is the decomposition that does."
)


def four_part_picture(
    stats: GeometryStats, cw: CanonicalWeights, block: int, heads: list[int] | None = None
) -> dict[str, Any]:
    """Per head of block ``block`` (0-based; it reads hidden state ``block``): the RMS of the
    paper's logit parts (``parts``: the four, and ``alibi`` for ALiBi models) over contexts and
    the (query t, key s) pairs the block computes (:func:`visible_pairs`), float64; ``mask``
    names them. Figure data: the parts do not add up and are not shares (``caption``)."""
    check_index("block", block, len(cw.layers))
    lw = cw.layers[block]
    parts = logit_parts(stats, cw, block)
    n_heads = lw.W_Q.shape[0]
    chosen = (
        list(range(n_heads)) if heads is None else [check_index("head", h, n_heads) for h in heads]
    )
    allowed, mask = visible_pairs(cw, block, parts["pos-pos"].shape[-1])
    P, _, _ = split_inputs(stats, cw, block)
    heads_out = []
    for h in chosen:
        squares = {name: float((v[:, h][:, allowed] ** 2).mean()) for name, v in parts.items()}
        heads_out.append(
            {
                "block": block,
                "head": h,
                **{f"rms_{name}": squares[name] ** 0.5 for name in parts},
                "wqk_positional_share": positional_share(
                    _gained(lw.W_Q[h], lw.q_norm, h), _gained(lw.W_K[h], lw.k_norm, h), P
                ),
            }
        )
    return {
        "caption": PICTURE_CAPTION,
        "block": block,
        "input_hidden": block,
        "n_blocks": len(cw.layers),
        "norm_linearisation": "gamma * center(h) / corpus RMS of h (bias with position)",
        "rotary_applied": cw.rotary is not None,
        "mask": mask,
        "attention_window": attention_window(cw.summary, block),
        "parts": list(parts),
        "qk_norm": None if lw.q_norm is None else QK_NORM_SPLIT.format(scope=lw.q_norm.scope),
        # Monotone soft-cap (SPEC 1): the parts are of the uncapped logits; the cap is stated.
        "attn_logit_softcap": cw.summary.attn_logit_softcap,
        "heads": heads_out,
    }


def visible_pairs(cw: CanonicalWeights, block: int, T: int) -> tuple[Tensor, str]:
    """``[T, T]`` bool: query t sees key s in block ``block`` (s <= t in a causal model, and
    inside t's window in a sliding-window block), and the mask's name for the results."""
    allowed = torch.ones(T, T, dtype=torch.bool)
    if not cw.summary.is_causal:
        return allowed, "all pairs"
    window = attention_window(cw.summary, block)
    if not window:
        return allowed.tril(), "causal (s <= t)"
    return window_keys(T, window), f"sliding window of {window} keys (t - {window} < s <= t)"


def _gained(W: Tensor, norm: QKNorm | None, head: int) -> Tensor:
    """``W [d, dh]`` with its head's QK-norm gain folded into the columns (``W`` itself
    without QK-norm): the bilinear form up to the per-token scales."""
    return W if norm is None else W * norm.weight[head]


def positional_share(W_Q: Tensor, W_K: Tensor, P: Tensor, k: int = 3) -> float:
    """Share of ``||W_QK||_F^2`` (``W_QK = W_Q W_K^T``, ``[d, d]``) inside the top-``k``
    positional subspace on both sides: ``||U^T W_QK U||_F^2 / ||W_QK||_F^2``, with ``U [d, k]``
    the top right singular vectors of the centred positional matrix (W_QK in the positional
    basis)."""
    centred = P - P.mean(0, keepdim=True)
    U = torch.linalg.svd(centred, full_matrices=False).Vh[:k].T  # [d, k]
    core = (U.T @ W_Q.double()) @ (W_K.double().T @ U)  # [k, k], never forming d x d twice
    gram_q = W_Q.double().T @ W_Q.double()  # [dh, dh]
    gram_k = W_K.double().T @ W_K.double()
    full = float(torch.trace(gram_q @ gram_k))  # ||W_Q W_K^T||_F^2
    return float((core**2).sum()) / full if full > 0 else 0.0
