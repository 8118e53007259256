"""GPT-2: learned positions, pre-LN, fused Conv1D ``c_attn`` laid out ``[d, q | k | v]``."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from tgeom.models.adapters.common import (
    ValueHeads,
    activation,
    base_model,
    detached,
    is_tied,
    layer_sequence,
    unembedding,
)
from tgeom.models.weights import ArchitectureSummary, CanonicalWeights, LayerWeights, Norm

FAMILY = "gpt2"
MODEL_TYPES = ("gpt2",)


def blocks(hf: Any) -> nn.ModuleList:
    return base_model(hf).h


def summarize(hf: Any) -> ArchitectureSummary:
    c = hf.config
    W_E = base_model(hf).wte.weight
    W_U, _, has_head = unembedding(hf, W_E)
    return ArchitectureSummary(
        family=FAMILY,
        model_type=c.model_type,
        n_blocks=c.n_layer,
        n_heads=c.n_head,
        n_kv_heads=c.n_head,
        d_model=c.n_embd,
        d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd,
        vocab_size=W_E.shape[0],
        n_ctx=c.n_positions,
        position_scheme="learned",
        tied_embeddings=is_tied(W_E, W_U),
        norm="layernorm",
        norm_placement="pre",
        gated_mlp=False,
        parallel_residual=False,
        is_causal=True,
        activation=c.activation_function,
        has_lm_head=has_head,
    )


def extract(hf: Any, summary: ArchitectureSummary) -> CanonicalWeights:
    c = hf.config
    base = base_model(hf)
    W_E = base.wte.weight.detach()
    W_U, b_U, _ = unembedding(hf, W_E)
    return CanonicalWeights(
        summary=summary,
        W_E=W_E,
        W_U=W_U.detach(),
        b_U=b_U,
        W_pos=base.wpe.weight.detach(),
        W_type=None,
        embed_norm=None,
        final_norm=_layernorm(base.ln_f, c.layer_norm_epsilon),
        rotary=None,
        activation=activation(c.activation_function),
        attn_scale=1.0 / math.sqrt(summary.d_head) if c.scale_attn_weights else 1.0,
        layers=layer_sequence(hf, summary, blocks(hf), extract_layer),
    )


def extract_layer(hf: Any, summary: ArchitectureSummary, index: int) -> LayerWeights:
    """Block ``index`` in canonical form: views of its parameters (the query side is a copy only
    when ``scale_attn_by_inverse_layer_idx`` folds a scale into it)."""
    c = hf.config
    block = base_model(hf).h[index]
    H, d, dh = summary.n_heads, summary.d_model, summary.d_head
    eps = c.layer_norm_epsilon
    qkv_w = block.attn.c_attn.weight.detach()  # [d, 3d], Conv1D stores [in, out]
    qkv_b = block.attn.c_attn.bias.detach()  # [3d]
    w_q, w_k, w_v = (w.reshape(d, H, dh).permute(1, 0, 2) for w in qkv_w.split(d, dim=1))
    b_q, b_k, b_v = (b.reshape(H, dh) for b in qkv_b.split(d))
    scale = _inverse_layer_scale(c, index)
    return LayerWeights(
        W_Q=w_q * scale if scale != 1.0 else w_q,
        W_K=w_k,
        W_V=w_v,
        W_O=block.attn.c_proj.weight.detach().reshape(H, dh, d),
        b_Q=b_q * scale if scale != 1.0 else b_q,
        b_K=b_k,
        b_V=b_v,
        b_O=block.attn.c_proj.bias.detach(),
        W_in=block.mlp.c_fc.weight.detach(),
        b_in=detached(block.mlp.c_fc.bias),
        W_gate=None,
        W_out=block.mlp.c_proj.weight.detach(),
        b_out=detached(block.mlp.c_proj.bias),
        ln_attn=_layernorm(block.ln_1, eps),
        ln_mlp=_layernorm(block.ln_2, eps),
    )


def _layernorm(module: Any, eps: float) -> Norm:
    return Norm("layernorm", module.weight.detach(), module.bias.detach(), eps)


def _inverse_layer_scale(config: Any, index: int) -> float:
    """GPT-2's optional ``scale_attn_by_inverse_layer_idx``, folded into the query side."""
    return 1.0 / (index + 1) if getattr(config, "scale_attn_by_inverse_layer_idx", False) else 1.0


def value_projection(block: Any, summary: ArchitectureSummary) -> tuple[Any, ValueHeads]:
    """The module whose output holds the block's value vectors (``c_attn``, ``[q | k | v]``),
    and the map from that output ``[B, T, 3d]`` to ``V [B, H, T, dh]``."""
    H, dh = summary.n_heads, summary.d_head
    return (
        block.attn.c_attn,
        lambda out: out[..., 2 * H * dh :].unflatten(-1, (H, dh)).transpose(1, 2),
    )


def attention_module(block: Any) -> Any:
    """The block's attention module (returns ``(output, attention probabilities)``)."""
    return block.attn
