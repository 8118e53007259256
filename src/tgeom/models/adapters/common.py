"""Pieces shared by the adapters: base model, unembedding, activations, norms and biases."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN

from tgeom.models.placement import onloaded
from tgeom.models.weights import (
    ArchitectureSummary,
    LayerSequence,
    LayerWeights,
    Norm,
    expand_kv,
    split_heads_in,
    split_heads_out,
    zeros_bias,
)

ValueHeads = Callable[[Tensor], Tensor]
"""Maps the output of a block's value-producing module to ``V [B, H, T, d_head]``."""


def base_model(hf: Any) -> Any:
    """The bare transformer under any task head (``GPT2LMHeadModel`` -> ``GPT2Model``)."""
    return getattr(hf, "base_model", hf)


def layer_sequence(
    hf: Any,
    summary: ArchitectureSummary,
    blocks: nn.ModuleList,
    read: Callable[[Any, ArchitectureSummary, int], LayerWeights],
) -> LayerSequence:
    """The blocks' canonical weights, block ``i`` read by ``read(hf, summary, i)`` when indexed,
    with its offloaded parameters (``device_map="auto"``) on their execution device meanwhile."""

    def one(index: int) -> LayerWeights:
        with onloaded(blocks[index]):
            return read(hf, summary, index)

    return LayerSequence(summary.n_blocks, one)


def unembedding(hf: Any, W_E: Tensor) -> tuple[Tensor, Tensor | None, bool]:
    """``(W_U [V, d], b_U [V] | None, has_lm_head)``; encoders without an LM head read with W_E.

    Only the final linear map is used: an MLM head's dense+norm transform is not part of W_U.
    """
    get = getattr(hf, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is None or getattr(head, "weight", None) is None:
        return W_E, None, False
    bias = getattr(head, "bias", None)
    return head.weight.detach(), bias.detach() if bias is not None else None, True


def activation(name: str) -> Callable[[Tensor], Tensor]:
    return ACT2FN[name]


def is_tied(W_E: Tensor, W_U: Tensor) -> bool:
    return W_E.data_ptr() == W_U.data_ptr() or (
        W_E.shape == W_U.shape and bool(torch.equal(W_E, W_U))
    )


def detached(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.detach()


def value_heads(n_heads: int, d_head: int) -> ValueHeads:
    """The map from a value projection's output ``[B, T, K d_head]`` (``K`` KV heads, ``K`` divides
    ``n_heads``) to ``V [B, n_heads, T, d_head]``: query head h reads KV head ``h // (n_heads / K)``
    (Hugging Face's ``repeat_kv``)."""

    def heads(out: Tensor) -> Tensor:
        v = out.unflatten(-1, (-1, d_head)).transpose(1, 2)  # [B, K, T, d_head]
        return v.repeat_interleave(n_heads // v.shape[1], dim=1) if v.shape[1] != n_heads else v

    return heads


def layer_norm(module: Any, like: Tensor) -> Norm:
    """A ``torch.nn.LayerNorm`` as a canonical :class:`Norm` (gain 1 and no bias when the module
    has no affine parameters, e.g. OPT's ``layer_norm_elementwise_affine=False``; the gain is
    then made with the dtype and device of ``like``)."""
    weight = module.weight
    if weight is None:
        weight = like.new_ones(module.normalized_shape[-1])
    return Norm("layernorm", weight.detach(), detached(module.bias), float(module.eps))


def head_bias(linear: Any, n_heads: int, d_head: int) -> Tensor:
    """An input projection's bias as ``[n_heads, d_head]`` (zeros when it has none)."""
    if linear.bias is None:
        return zeros_bias(n_heads, d_head, linear.weight)
    return linear.bias.detach().reshape(n_heads, d_head)


def output_bias(linear: Any) -> Tensor:
    """An output projection's bias ``[d]`` (zeros when it has none)."""
    if linear.bias is None:
        return linear.weight.new_zeros(linear.weight.shape[0])
    return linear.bias.detach()


def attention_projections(
    q: Any, k: Any, v: Any, o: Any, n_heads: int, n_kv_heads: int, d_head: int
) -> dict[str, Any]:
    """``W_Q, W_K, W_V [H, d, dh]``, ``W_O [H, dh, d]`` and their biases (``b_O [d]``, zeros
    where a projection has none) of an attention with separate ``nn.Linear`` projections ``q, k,
    v`` and output ``o``: views of the parameters, grouped K/V expanded to every query head (a
    copy of this block's only). Keyword arguments of :class:`LayerWeights`."""
    H, K = n_heads, n_kv_heads
    return {
        "W_Q": split_heads_in(q.weight.detach(), H),
        "W_K": expand_kv(split_heads_in(k.weight.detach(), K), H),
        "W_V": expand_kv(split_heads_in(v.weight.detach(), K), H),
        "W_O": split_heads_out(o.weight.detach(), H),
        "b_Q": head_bias(q, H, d_head),
        "b_K": expand_kv(head_bias(k, K, d_head), H),
        "b_V": expand_kv(head_bias(v, K, d_head), H),
        "b_O": output_bias(o),
    }


def mlp_projections(fc_in: Any, fc_out: Any, gate: Any = None) -> dict[str, Any]:
    """``W_in [d, d_mlp]``, ``W_gate`` (None without a gate), ``W_out [d_mlp, d]`` and the
    biases (None where a projection has none) of an MLP of ``nn.Linear`` layers: views of the
    parameters. Keyword arguments of :class:`LayerWeights`."""
    return {
        "W_in": fc_in.weight.detach().T,
        "b_in": detached(fc_in.bias),
        "W_gate": None if gate is None else gate.weight.detach().T,
        "W_out": fc_out.weight.detach().T,
        "b_out": detached(fc_out.bias),
    }


LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
"""Rotary types whose frequencies Hugging Face recomputes from the sequence length: past
``original_max_position_embeddings`` they are no longer the ones read at load."""


def rotary_context(config: Any, default: int | None = None) -> int:
    """The context over which the rotary frequencies read at load are the model's own.

    ``max_position_embeddings`` (or ``default``), except for length-dependent rotary types
    (:data:`LENGTH_DEPENDENT_ROPE`: dynamic NTK, Phi-3's LongRoPE), where Hugging Face switches to
    other frequencies for sequences longer than ``original_max_position_embeddings``: tgeom's
    canonical rotary is fixed, so its context stops there and longer inputs are refused rather
    than read with the wrong rotation."""
    context = int(default if default is not None else config.max_position_embeddings)
    params = getattr(config, "rope_parameters", None) or {}
    per_type = [params] if "rope_type" in params or "type" in params else list(params.values())
    for rope in per_type:
        if not isinstance(rope, dict):
            continue
        kind = str(rope.get("rope_type", rope.get("type", "default")))
        if any(name in kind for name in LENGTH_DEPENDENT_ROPE):
            original = rope.get("original_max_position_embeddings") or getattr(
                config, "original_max_position_embeddings", None
            )
            if original:
                context = min(context, int(original))
    return context


def fused_qkv_per_head(linear: Any, n_heads: int, d_head: int) -> tuple[Tensor, Tensor]:
    """A fused QKV ``nn.Linear`` laid out per head (``[q_h; k_h; v_h]`` for each head h: GPT-NeoX,
    BLOOM) as views ``W [H, 3, d, dh]`` and ``b [H, 3, dh]`` (index 1: 0 = Q, 1 = K, 2 = V)."""
    d = linear.weight.shape[1]
    W = linear.weight.detach().reshape(n_heads, 3, d_head, d).transpose(2, 3)
    return W, linear.bias.detach().reshape(n_heads, 3, d_head)
