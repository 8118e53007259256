"""A plain forward pass written from canonical weights alone (SPEC section 1).

This is the proof that an adapter is right: it must reproduce the Hugging Face model's hidden
states at every layer. It is also the differentiable forward the analyses use when they need
gradients with respect to ``hidden[0]`` (attribution) or to run a model from a middle layer
(stitching). Plain torch ops only, so ``torch.func.jvp``/``vmap`` and autograd work on it.

Padding convention: ``attention_mask [B, T]`` is 1 for real tokens; padded keys are masked out.
Positions are ``0..T-1`` (rotary models) and ``0..T-1`` from the table (learned positions; where
``summary.positions_skip_padding`` (RoBERTa, OPT), real tokens are numbered in order and skip
padding, as Hugging Face does).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tgeom.linalg.precision import scores_against
from tgeom.models.weights import (
    CanonicalWeights,
    LayerWeights,
    Norm,
    attention_window,
    layer_rotary,
    softcap,
    window_keys,
)


def positions_for(cw: CanonicalWeights, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Learned-position indices ``[B, T]`` for ``input_ids [B, T]`` (row t of ``W_pos``)."""
    B, T = input_ids.shape
    if cw.summary.positions_skip_padding:
        real = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).long()
        return ((torch.cumsum(real, dim=1) - 1) * real).clamp(min=0)
    return torch.arange(T, device=input_ids.device).expand(B, T)


def embed(
    cw: CanonicalWeights,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
) -> Tensor:
    """``hidden[0] [B, T, d]``: token embedding times ``embed_scale`` (Gemma: sqrt(d)) (+
    position, + token type) (+ its norm)."""
    h = cw.W_E[input_ids]
    if cw.embed_scale != 1.0:
        h = h * cw.embed_scale
    if cw.W_pos is not None:
        h = h + cw.W_pos[positions_for(cw, input_ids, attention_mask)]
    if cw.W_type is not None:
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        h = h + cw.W_type[types]
    if cw.embed_norm is not None:
        h = cw.embed_norm(h)
    return h


def attention_bias(cw: CanonicalWeights, attention_mask: Tensor | None, B: int, T: int) -> Tensor:
    """Additive bias ``[B, 1, T, T]``: 0 where a query may attend a key, a large negative else
    (padding and causality; a layer's sliding window is added by :func:`block_attention`).
    ALiBi models (``cw.alibi_slopes``) get ``[B, H, T, T]``: head h adds ``slope[h] * (s - t)``
    for query t and key s where the key is allowed, t and s counted over real tokens
    (:func:`alibi_positions`). BLOOM adds ``slope[h] * s``; the two differ by a constant per
    query row, which softmax ignores."""
    device = cw.W_E.device
    allowed = torch.ones(B, 1, T, T, dtype=torch.bool, device=device)
    if cw.summary.is_causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=device).tril()
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    zero = torch.zeros((), dtype=cw.W_E.dtype, device=device)
    if cw.alibi_slopes is not None:
        p = alibi_positions(attention_mask, B, T, device).to(cw.W_E.dtype)
        distance = p[:, None, None, :] - p[:, None, :, None]  # [B, 1, T(query), T(key)]: s - t
        zero = cw.alibi_slopes.to(cw.W_E.dtype)[None, :, None, None] * distance
    return torch.where(allowed, zero, torch.finfo(cw.W_E.dtype).min)


def alibi_positions(
    attention_mask: Tensor | None, B: int, T: int, device: torch.device | str | None
) -> Tensor:
    """``[B, T]`` token positions as ALiBi counts them: real tokens numbered in order (padding
    skipped, as BLOOM's ``cumsum(mask) - 1``), ``0..T-1`` without a mask."""
    if attention_mask is None:
        return torch.arange(T, device=device).expand(B, T)
    real = attention_mask.to(device).long()
    return (torch.cumsum(real, dim=1) - 1) * real


def block_attention(cw: CanonicalWeights, layer: int, x: Tensor, bias: Tensor) -> Tensor:
    """Attention probabilities ``[B, H, T, T]`` of block ``layer`` given its attention input
    ``x [B, T, d]`` (already normalised for pre-LN models) and ``bias`` from
    :func:`attention_bias`. A sliding-window layer (:func:`attention_window`) masks, here and
    only here, every key outside its query's window. Soft-capped scores (Gemma 2:
    ``summary.attn_logit_softcap``) are capped before the mask, as the model does."""
    window = attention_window(cw.summary, layer)
    if window:
        outside = ~window_keys(x.shape[1], window, x.device)
        bias = bias.masked_fill(outside, torch.finfo(bias.dtype).min)
    q, k = _queries_keys(cw, layer, x)
    scores = torch.einsum("bhqe,bhke->bhqk", q, k) * cw.attn_scale
    scores = softcap(scores, cw.summary.attn_logit_softcap) + bias
    return torch.softmax(scores, dim=-1)


def _queries_keys(cw: CanonicalWeights, layer: int, x: Tensor) -> tuple[Tensor, Tensor]:
    lw = cw.layers[layer]
    q = torch.einsum("btd,hde->bhte", x, lw.W_Q) + lw.b_Q[None, :, None, :]
    k = torch.einsum("btd,hde->bhte", x, lw.W_K) + lw.b_K[None, :, None, :]
    if lw.q_norm is not None:  # QK-norm comes before rotary
        q = lw.q_norm(q)
    if lw.k_norm is not None:
        k = lw.k_norm(k)
    rotary = layer_rotary(cw, layer)
    if rotary is not None:
        positions = torch.arange(x.shape[1], device=x.device)
        q, k = rotary.apply(q, positions), rotary.apply(k, positions)
    return q, k


def values(lw: LayerWeights, x: Tensor) -> Tensor:
    """Per-head value vectors ``[B, H, T, dh] = x W_V + b_V`` for attention input ``x``."""
    return torch.einsum("btd,hde->bhte", x, lw.W_V) + lw.b_V[None, :, None, :]


def attention_output(cw: CanonicalWeights, layer: int, x: Tensor, bias: Tensor) -> Tensor:
    """The attention sublayer's output ``[B, T, d]`` (before the residual addition)."""
    lw = cw.layers[layer]
    probs = block_attention(cw, layer, x, bias)
    z = torch.einsum("bhqk,bhke->bhqe", probs, values(lw, x))
    return torch.einsum("bhqe,hed->bqd", z, lw.W_O) + lw.b_O


def mlp_activations(cw: CanonicalWeights, layer: int, x: Tensor) -> Tensor:
    """The MLP's neuron activations ``[..., d_mlp]`` for MLP input ``x [..., d]``."""
    lw = cw.layers[layer]
    pre = x @ lw.W_in + (lw.b_in if lw.b_in is not None else 0.0)
    if lw.W_gate is not None:
        return cw.activation(x @ lw.W_gate) * pre
    return cw.activation(pre)


def mlp_output(cw: CanonicalWeights, layer: int, x: Tensor) -> Tensor:
    lw = cw.layers[layer]
    out = mlp_activations(cw, layer, x) @ lw.W_out
    return out + lw.b_out if lw.b_out is not None else out


def _output_norm(norm: Norm | None, out: Tensor) -> Tensor:
    return out if norm is None else norm(out)


def after_attention(cw: CanonicalWeights, layer: int, h: Tensor, bias: Tensor) -> Tensor:
    """A pre-LN block's residual stream after its attention sublayer, ``[B, T, d]``:
    ``h + attn(ln_attn(h))``, with the output norm ``ln_attn_out`` where the block has one
    (Gemma 2, 3)."""
    lw = cw.layers[layer]
    return h + _output_norm(lw.ln_attn_out, attention_output(cw, layer, lw.ln_attn(h), bias))


def run_block(cw: CanonicalWeights, layer: int, h: Tensor, bias: Tensor) -> Tensor:
    """``hidden[layer + 1]`` from ``hidden[layer]`` (both ``[B, T, d]``)."""
    lw = cw.layers[layer]
    s = cw.summary
    if s.norm_placement == "post":
        h = lw.ln_attn(h + attention_output(cw, layer, h, bias))
        return lw.ln_mlp(h + mlp_output(cw, layer, h))
    if s.norm_placement == "post_sublayer":
        h = h + lw.ln_attn(attention_output(cw, layer, h, bias))
        return h + lw.ln_mlp(mlp_output(cw, layer, h))
    if s.parallel_residual:
        return (
            h
            + attention_output(cw, layer, lw.ln_attn(h), bias)
            + mlp_output(cw, layer, lw.ln_mlp(h))
        )
    h = after_attention(cw, layer, h, bias)
    return h + _output_norm(lw.ln_mlp_out, mlp_output(cw, layer, lw.ln_mlp(h)))


def run_blocks(
    cw: CanonicalWeights,
    hidden0: Tensor,
    attention_mask: Tensor | None = None,
    *,
    start: int = 0,
    stop: int | None = None,
) -> list[Tensor]:
    """Run blocks ``start..stop-1`` from ``hidden0`` (= ``hidden[start]``, ``[B, T, d]``).

    Returns ``[hidden[start], ..., hidden[stop]]``, before the final norm.
    """
    B, T, _ = hidden0.shape
    bias = attention_bias(cw, attention_mask, B, T).to(hidden0.dtype)
    stop = len(cw.layers) if stop is None else stop
    hidden = [hidden0]
    for layer in range(start, stop):
        hidden.append(run_block(cw, layer, hidden[-1], bias))
    return hidden


def reference_forward(
    cw: CanonicalWeights, input_ids: Tensor, attention_mask: Tensor | None = None
) -> list[Tensor]:
    """``hidden[0..L]``, each ``[B, T, d]``, from token ids ``[B, T]``."""
    return run_blocks(cw, embed(cw, input_ids, attention_mask), attention_mask)


def logits(cw: CanonicalWeights, hidden: Tensor) -> Tensor:
    """Vocabulary scores ``[..., V]`` of a residual-stream state: final norm, ``W_U`` (+ ``b_U``),
    then the model's final soft-cap where it has one (Gemma 2, 3:
    ``summary.final_logit_softcap``). float32 or better whatever the weights' precision
    (:func:`tgeom.linalg.precision.scores_against`)."""
    h = cw.final_norm(hidden) if cw.final_norm is not None else hidden
    out = scores_against(h.reshape(-1, h.shape[-1]), cw.W_U).reshape(*h.shape[:-1], -1)
    out = out + cw.b_U if cw.b_U is not None else out
    return softcap(out, cw.summary.final_logit_softcap)
