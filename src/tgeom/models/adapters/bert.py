"""BERT / RoBERTa: post-LN encoders with learned positions and token types.

RoBERTa numbers positions from ``padding_idx + 1``; canonical ``W_pos`` drops those offset rows so
that row t is position t for every family.
"""

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
    unembedding,
)
from tgeom.models.weights import (
    ArchitectureSummary,
    CanonicalWeights,
    LayerWeights,
    Norm,
    split_heads_in,
    split_heads_out,
)

FAMILY = "bert"
MODEL_TYPES = ("bert", "roberta", "xlm-roberta")


def blocks(hf: Any) -> nn.ModuleList:
    return base_model(hf).encoder.layer


def position_offset(config: Any) -> int:
    """Index of position 0 in the position table: ``padding_idx + 1`` for RoBERTa, else 0."""
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta"):
        return int(config.pad_token_id) + 1  # type: ignore[attr-defined]
    return 0


def summarize(hf: Any) -> ArchitectureSummary:
    c = hf.config
    W_E = base_model(hf).embeddings.word_embeddings.weight
    W_U, _, has_head = unembedding(hf, W_E)
    return ArchitectureSummary(
        family=FAMILY,
        model_type=c.model_type,
        n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_attention_heads,
        d_model=c.hidden_size,
        d_head=c.hidden_size // c.num_attention_heads,
        d_mlp=c.intermediate_size,
        vocab_size=W_E.shape[0],
        n_ctx=c.max_position_embeddings - position_offset(c),
        position_scheme="learned",
        tied_embeddings=is_tied(W_E, W_U),
        norm="layernorm",
        norm_placement="post",
        gated_mlp=False,
        parallel_residual=False,
        is_causal=bool(getattr(c, "is_decoder", False)),
        activation=c.hidden_act,
        has_lm_head=has_head,
    )


def _layernorm(module: Any, eps: float) -> Norm:
    return Norm("layernorm", module.weight.detach(), module.bias.detach(), eps)


def extract(hf: Any, summary: ArchitectureSummary) -> CanonicalWeights:
    c = hf.config
    base = base_model(hf)
    H, dh = summary.n_heads, summary.d_head
    eps = c.layer_norm_eps
    layers = []
    for layer in base.encoder.layer:
        attn = layer.attention.self
        layers.append(
            LayerWeights(
                W_Q=split_heads_in(attn.query.weight.detach(), H),
                W_K=split_heads_in(attn.key.weight.detach(), H),
                W_V=split_heads_in(attn.value.weight.detach(), H),
                W_O=split_heads_out(layer.attention.output.dense.weight.detach(), H),
                b_Q=attn.query.bias.detach().reshape(H, dh),
                b_K=attn.key.bias.detach().reshape(H, dh),
                b_V=attn.value.bias.detach().reshape(H, dh),
                b_O=layer.attention.output.dense.bias.detach(),
                W_in=layer.intermediate.dense.weight.detach().T,
                b_in=detached(layer.intermediate.dense.bias),
                W_gate=None,
                W_out=layer.output.dense.weight.detach().T,
                b_out=detached(layer.output.dense.bias),
                ln_attn=_layernorm(layer.attention.output.LayerNorm, eps),
                ln_mlp=_layernorm(layer.output.LayerNorm, eps),
            )
        )
    emb = base.embeddings
    W_E = emb.word_embeddings.weight.detach()
    W_U, b_U, _ = unembedding(hf, W_E)
    types = getattr(emb, "token_type_embeddings", None)
    return CanonicalWeights(
        summary=summary,
        W_E=W_E,
        W_U=W_U.detach(),
        b_U=b_U,
        W_pos=emb.position_embeddings.weight.detach()[position_offset(c) :],
        W_type=types.weight.detach() if types is not None else None,
        embed_norm=_layernorm(emb.LayerNorm, eps),
        final_norm=None,
        rotary=None,
        activation=activation(c.hidden_act),
        attn_scale=1.0 / math.sqrt(dh),
        layers=layers,
    )


def value_projection(block: Any, summary: ArchitectureSummary) -> tuple[Any, ValueHeads]:
    """The module whose output holds the block's value vectors, and the map from that output
    ``[B, T, H dh]`` to ``V [B, H, T, dh]``."""
    H, dh = summary.n_heads, summary.d_head
    return block.attention.self.value, lambda out: out.unflatten(-1, (H, dh)).transpose(1, 2)


def attention_module(block: Any) -> Any:
    """The block's attention module (returns ``(output, attention probabilities)``)."""
    return block.attention.self
