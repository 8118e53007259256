"""BLOOM: no position weights but ALiBi (head h adds ``slope[h] * key position`` to its scores,
slopes :func:`tgeom.models.weights.alibi_slopes`, positions counted over real tokens), a LayerNorm
right after the word embeddings (``word_embeddings_layernorm``: the canonical ``embed_norm``),
pre-LN blocks with a per-head fused QKV (``query_key_value`` rows ``[q | k | v]`` per head, as
GPT-NeoX), a tanh-approximated GELU MLP of width ``4 d``, tied unembedding.

``apply_residual_connection_post_layernorm=True`` (the residual taken after the norm) is refused
in one line: no released BLOOM uses it and the canonical blocks cannot express it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tgeom.errors import TgeomError
from tgeom.models.adapters.common import (
    ValueHeads,
    activation,
    base_model,
    fused_qkv_per_head,
    is_tied,
    layer_norm,
    layer_sequence,
    unembedding,
)
from tgeom.models.weights import (
    ArchitectureSummary,
    CanonicalWeights,
    LayerWeights,
    alibi_slopes,
    split_heads_out,
)

FAMILY = "bloom"
MODEL_TYPES = ("bloom",)
ACTIVATION = "gelu_pytorch_tanh"  # BloomGelu: x/2 (1 + tanh(0.79788456 x (1 + 0.044715 x^2)))
TRAINED_CONTEXT = 2048  # BLOOM's training length; its config names no maximum (ALiBi)


def blocks(hf: Any) -> nn.ModuleList:
    return base_model(hf).h


def summarize(hf: Any) -> ArchitectureSummary:
    c = hf.config
    if c.apply_residual_connection_post_layernorm:
        raise TgeomError(
            "this BLOOM config sets apply_residual_connection_post_layernorm=True (residual taken "
            "after the norm), which tgeom cannot express: load a checkpoint without it."
        )
    W_E = base_model(hf).word_embeddings.weight
    W_U, _, has_head = unembedding(hf, W_E)
    return ArchitectureSummary(
        family=FAMILY,
        model_type=c.model_type,
        n_blocks=c.n_layer,
        n_heads=c.n_head,
        n_kv_heads=c.n_head,
        d_model=c.hidden_size,
        d_head=c.hidden_size // c.n_head,
        d_mlp=4 * c.hidden_size,
        vocab_size=W_E.shape[0],
        n_ctx=getattr(c, "seq_length", None) or TRAINED_CONTEXT,
        position_scheme="alibi",
        tied_embeddings=is_tied(W_E, W_U),
        norm="layernorm",
        norm_placement="pre",
        gated_mlp=False,
        parallel_residual=False,
        is_causal=True,
        activation=ACTIVATION,
        has_lm_head=has_head,
    )


def extract(hf: Any, summary: ArchitectureSummary) -> CanonicalWeights:
    base = base_model(hf)
    W_E = base.word_embeddings.weight.detach()
    W_U, b_U, _ = unembedding(hf, W_E)
    return CanonicalWeights(
        summary=summary,
        W_E=W_E,
        W_U=W_U.detach(),
        b_U=b_U,
        W_pos=None,
        W_type=None,
        embed_norm=layer_norm(base.word_embeddings_layernorm, W_E),
        final_norm=layer_norm(base.ln_f, W_E),
        rotary=None,
        activation=activation(ACTIVATION),
        attn_scale=summary.d_head**-0.5,
        layers=layer_sequence(hf, summary, blocks(hf), extract_layer),
        alibi_slopes=alibi_slopes(summary.n_heads).to(device=W_E.device, dtype=W_E.dtype),
    )


def extract_layer(hf: Any, summary: ArchitectureSummary, index: int) -> LayerWeights:
    """Block ``index`` in canonical form (views of its parameters)."""
    layer = base_model(hf).h[index]
    H, dh = summary.n_heads, summary.d_head
    attn, mlp = layer.self_attention, layer.mlp
    w, b = fused_qkv_per_head(attn.query_key_value, H, dh)
    return LayerWeights(
        W_Q=w[:, 0],
        W_K=w[:, 1],
        W_V=w[:, 2],
        W_O=split_heads_out(attn.dense.weight.detach(), H),
        b_Q=b[:, 0],
        b_K=b[:, 1],
        b_V=b[:, 2],
        b_O=attn.dense.bias.detach(),
        W_in=mlp.dense_h_to_4h.weight.detach().T,
        b_in=mlp.dense_h_to_4h.bias.detach(),
        W_gate=None,
        W_out=mlp.dense_4h_to_h.weight.detach().T,
        b_out=mlp.dense_4h_to_h.bias.detach(),
        ln_attn=layer_norm(layer.input_layernorm, w),
        ln_mlp=layer_norm(layer.post_attention_layernorm, w),
    )


def value_projection(block: Any, summary: ArchitectureSummary) -> tuple[Any, ValueHeads]:
    """The module whose output holds the block's value vectors (``query_key_value``, per head
    ``[q | k | v]``), and the map from that output ``[B, T, 3 H dh]`` to ``V [B, H, T, dh]``."""
    H, dh = summary.n_heads, summary.d_head
    return block.self_attention.query_key_value, lambda out: out.unflatten(-1, (H, 3, dh))[
        ..., 2, :
    ].transpose(1, 2)


def attention_module(block: Any) -> Any:
    """The block's attention module (returns ``(output, attention probabilities)``)."""
    return block.self_attention
