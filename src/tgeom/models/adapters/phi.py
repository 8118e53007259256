"""Phi (Phi-1, Phi-1.5, Phi-2): attention and MLP in parallel from one LayerNorm
(``input_layernorm``), partial rotary (rotate-half on the first ``partial_rotary_factor * d_head``
coordinates of each head), biases on every projection and on the LM head, grouped KV heads.

The one norm is both ``ln_attn`` and ``ln_mlp`` (the same :class:`Norm`), with
``parallel_residual``. ``qk_layernorm=True`` (a LayerNorm on each head's queries and keys) is a
QK-norm, which the canonical form does not carry yet: such a model is refused in one line.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tgeom.errors import TgeomError
from tgeom.models.adapters.common import (
    ValueHeads,
    activation,
    attention_projections,
    base_model,
    is_tied,
    layer_norm,
    layer_sequence,
    mlp_projections,
    rotary_context,
    unembedding,
    value_heads,
)
from tgeom.models.weights import (
    ArchitectureSummary,
    CanonicalWeights,
    LayerWeights,
    Rotary,
)

FAMILY = "phi"
MODEL_TYPES = ("phi",)


def blocks(hf: Any) -> nn.ModuleList:
    return base_model(hf).layers


def summarize(hf: Any) -> ArchitectureSummary:
    c = hf.config
    if getattr(c, "qk_layernorm", False):
        raise TgeomError(
            "Phi with qk_layernorm=True (a LayerNorm on each head's queries and keys) is not "
            "supported yet: tgeom has no QK-norm in its canonical form; use a Phi model without it."
        )
    base = base_model(hf)
    W_E = base.embed_tokens.weight
    W_U, _, has_head = unembedding(hf, W_E)
    attn = base.layers[0].self_attn
    return ArchitectureSummary(
        family=FAMILY,
        model_type=c.model_type,
        n_blocks=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads or c.num_attention_heads,
        d_model=c.hidden_size,
        d_head=attn.head_dim,
        d_mlp=c.intermediate_size,
        vocab_size=W_E.shape[0],
        n_ctx=rotary_context(c),
        position_scheme="rotary",
        tied_embeddings=is_tied(W_E, W_U),
        norm="layernorm",
        norm_placement="pre",
        gated_mlp=False,
        parallel_residual=True,
        is_causal=True,
        activation=c.hidden_act,
        has_lm_head=has_head,
        rotary_dim=attn.rotary_ndims,
    )


def extract(hf: Any, summary: ArchitectureSummary) -> CanonicalWeights:
    base = base_model(hf)
    W_E = base.embed_tokens.weight.detach()
    W_U, b_U, _ = unembedding(hf, W_E)
    rope = base.rotary_emb
    return CanonicalWeights(
        summary=summary,
        W_E=W_E,
        W_U=W_U.detach(),
        b_U=b_U,
        W_pos=None,
        W_type=None,
        embed_norm=None,
        final_norm=layer_norm(base.final_layernorm, W_E),
        rotary=Rotary(rope.inv_freq.detach().clone(), float(rope.attention_scaling)),
        activation=activation(summary.activation),
        attn_scale=summary.d_head**-0.5,
        layers=layer_sequence(hf, summary, blocks(hf), extract_layer),
    )


def extract_layer(hf: Any, summary: ArchitectureSummary, index: int) -> LayerWeights:
    """Block ``index`` in canonical form (views of its projections; K/V expanded per head)."""
    layer = base_model(hf).layers[index]
    H, K, dh = summary.n_heads, summary.n_kv_heads, summary.d_head
    attn, mlp = layer.self_attn, layer.mlp
    ln = layer_norm(layer.input_layernorm, attn.q_proj.weight)
    return LayerWeights(
        **attention_projections(attn.q_proj, attn.k_proj, attn.v_proj, attn.dense, H, K, dh),
        **mlp_projections(mlp.fc1, mlp.fc2),
        ln_attn=ln,
        ln_mlp=ln,
    )


def value_projection(block: Any, summary: ArchitectureSummary) -> tuple[Any, ValueHeads]:
    """The module whose output holds the block's value vectors (``v_proj``, KV heads), and the
    map from that output ``[B, T, K dh]`` to ``V [B, H, T, dh]`` (query head h reads KV head
    ``h // (H / K)``)."""
    return block.self_attn.v_proj, value_heads(summary.n_heads, summary.d_head)


def attention_module(block: Any) -> Any:
    """The block's attention module (returns ``(output, attention probabilities)``)."""
    return block.self_attn
