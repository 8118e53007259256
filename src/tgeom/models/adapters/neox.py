"""GPT-NeoX / Pythia: parallel residual (optional), partial rotary, per-head interleaved QKV.

``query_key_value`` produces, for each head, ``[q (dh) | k (dh) | v (dh)]`` consecutively.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tgeom.models.adapters.common import (
    ValueHeads,
    activation,
    base_model,
    detached,
    fused_qkv_per_head,
    is_tied,
    layer_sequence,
    rotary_context,
    unembedding,
)
from tgeom.models.weights import (
    ArchitectureSummary,
    CanonicalWeights,
    LayerWeights,
    Norm,
    Rotary,
    split_heads_out,
)

FAMILY = "gpt_neox"
MODEL_TYPES = ("gpt_neox",)


def blocks(hf: Any) -> nn.ModuleList:
    return base_model(hf).layers


def summarize(hf: Any) -> ArchitectureSummary:
    c = hf.config
    W_E = base_model(hf).embed_in.weight
    W_U, _, has_head = unembedding(hf, W_E)
    return ArchitectureSummary(
        family=FAMILY,
        model_type=c.model_type,
        n_blocks=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_attention_heads,
        d_model=c.hidden_size,
        d_head=c.hidden_size // c.num_attention_heads,
        d_mlp=c.intermediate_size,
        vocab_size=W_E.shape[0],
        n_ctx=rotary_context(c),
        position_scheme="rotary",
        tied_embeddings=is_tied(W_E, W_U),
        norm="layernorm",
        norm_placement="pre",
        gated_mlp=False,
        parallel_residual=bool(c.use_parallel_residual),
        is_causal=True,
        activation=c.hidden_act,
        has_lm_head=has_head,
        rotary_dim=2 * base_model(hf).rotary_emb.inv_freq.shape[0],
    )


def _layernorm(module: Any) -> Norm:
    return Norm("layernorm", module.weight.detach(), module.bias.detach(), float(module.eps))


def extract(hf: Any, summary: ArchitectureSummary) -> CanonicalWeights:
    base = base_model(hf)
    W_E = base.embed_in.weight.detach()
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
        final_norm=_layernorm(base.final_layer_norm),
        rotary=Rotary(rope.inv_freq.detach().clone(), float(rope.attention_scaling)),
        activation=activation(hf.config.hidden_act),
        attn_scale=summary.d_head**-0.5,
        layers=layer_sequence(hf, summary, blocks(hf), extract_layer),
    )


def extract_layer(hf: Any, summary: ArchitectureSummary, index: int) -> LayerWeights:
    """Block ``index`` in canonical form (views of its parameters)."""
    layer = base_model(hf).layers[index]
    H, dh = summary.n_heads, summary.d_head
    attn, mlp = layer.attention, layer.mlp
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
        b_in=detached(mlp.dense_h_to_4h.bias),
        W_gate=None,
        W_out=mlp.dense_4h_to_h.weight.detach().T,
        b_out=detached(mlp.dense_4h_to_h.bias),
        ln_attn=_layernorm(layer.input_layernorm),
        ln_mlp=_layernorm(layer.post_attention_layernorm),
    )


def value_projection(block: Any, summary: ArchitectureSummary) -> tuple[Any, ValueHeads]:
    """The module whose output holds the block's value vectors (``query_key_value``, per head
    ``[q | k | v]``), and the map from that output ``[B, T, 3 H dh]`` to ``V [B, H, T, dh]``."""
    H, dh = summary.n_heads, summary.d_head
    return block.attention.query_key_value, lambda out: out.unflatten(-1, (H, 3, dh))[
        ..., 2, :
    ].transpose(1, 2)


def attention_module(block: Any) -> Any:
    """The block's attention module (returns ``(output, attention probabilities)``)."""
    return block.attention
