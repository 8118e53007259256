"""BERT-like encoders (BERT, RoBERTa, XLM-R, DistilBERT): post-LN, learned positions, separate
q/k/v projections; token types except in DistilBERT.

The families differ only in where each tensor lives (:data:`PATHS`: dotted module paths under the
base model and under each block) and in RoBERTa's positions: it numbers real tokens from
``padding_idx + 1`` and skips padding, so canonical ``W_pos`` drops those offset rows (row t is
position t for every family) and ``positions_skip_padding`` is set.
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
    head_bias,
    is_tied,
    layer_norm,
    layer_sequence,
    output_bias,
    unembedding,
    value_heads,
)
from tgeom.models.weights import (
    ArchitectureSummary,
    CanonicalWeights,
    LayerWeights,
    learned_positions,
    split_heads_in,
    split_heads_out,
)

FAMILY = "bert"
MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert")

_BERT = {
    "blocks": "encoder.layer",
    "W_Q": "attention.self.query",
    "W_K": "attention.self.key",
    "W_V": "attention.self.value",
    "W_O": "attention.output.dense",
    "ln_attn": "attention.output.LayerNorm",
    "W_in": "intermediate.dense",
    "W_out": "output.dense",
    "ln_mlp": "output.LayerNorm",
}
_DISTILBERT = {
    "blocks": "transformer.layer",
    "W_Q": "attention.q_lin",
    "W_K": "attention.k_lin",
    "W_V": "attention.v_lin",
    "W_O": "attention.out_lin",
    "ln_attn": "sa_layer_norm",
    "W_in": "ffn.lin1",
    "W_out": "ffn.lin2",
    "ln_mlp": "output_layer_norm",
}
PATHS = {"bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "distilbert": _DISTILBERT}
"""Per model type: where each canonical tensor's module lives (``blocks`` under the base model,
the rest under each block; embeddings are ``embeddings.*`` in every BERT-like model)."""


def _paths(config: Any) -> dict[str, str]:
    return PATHS[config.model_type]


def _module(root: Any, path: str) -> Any:
    return root.get_submodule(path)


def blocks(hf: Any) -> nn.ModuleList:
    return _module(base_model(hf), _paths(hf.config)["blocks"])


def position_offset(config: Any) -> int:
    """Index of position 0 in the position table: ``padding_idx + 1`` for RoBERTa, else 0."""
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta"):
        return int(config.pad_token_id) + 1  # type: ignore[attr-defined]
    return 0


def summarize(hf: Any) -> ArchitectureSummary:
    c = hf.config
    W_E = base_model(hf).embeddings.word_embeddings.weight
    W_U, _, has_head = unembedding(hf, W_E)
    first = blocks(hf)[0]
    return ArchitectureSummary(
        family=FAMILY,
        model_type=c.model_type,
        n_blocks=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_attention_heads,
        d_model=c.hidden_size,
        d_head=c.hidden_size // c.num_attention_heads,
        d_mlp=_module(first, _paths(c)["W_in"]).weight.shape[0],
        vocab_size=W_E.shape[0],
        n_ctx=c.max_position_embeddings - position_offset(c),
        position_scheme="learned",
        tied_embeddings=is_tied(W_E, W_U),
        norm="layernorm",
        norm_placement="post",
        gated_mlp=False,
        parallel_residual=False,
        is_causal=bool(getattr(c, "is_decoder", False)),
        activation=getattr(c, "hidden_act", None) or c.activation,  # DistilBERT: ``activation``
        has_lm_head=has_head,
        positions_skip_padding=position_offset(c) > 0,
    )


def extract(hf: Any, summary: ArchitectureSummary) -> CanonicalWeights:
    c = hf.config
    emb = base_model(hf).embeddings
    W_E = emb.word_embeddings.weight.detach()
    W_U, b_U, _ = unembedding(hf, W_E)
    types = getattr(emb, "token_type_embeddings", None)
    return CanonicalWeights(
        summary=summary,
        W_E=W_E,
        W_U=W_U.detach(),
        b_U=b_U,
        W_pos=learned_positions(emb.position_embeddings.weight.detach(), position_offset(c)),
        W_type=types.weight.detach() if types is not None else None,
        embed_norm=layer_norm(emb.LayerNorm, W_E),
        final_norm=None,
        rotary=None,
        activation=activation(summary.activation),
        attn_scale=1.0 / math.sqrt(summary.d_head),
        layers=layer_sequence(hf, summary, blocks(hf), extract_layer),
    )


def extract_layer(hf: Any, summary: ArchitectureSummary, index: int) -> LayerWeights:
    """Block ``index`` in canonical form (views of its parameters)."""
    H, dh = summary.n_heads, summary.d_head
    paths = _paths(hf.config)
    layer = blocks(hf)[index]
    q, k, v, o, fc_in, fc_out = (
        _module(layer, paths[name]) for name in ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out")
    )
    return LayerWeights(
        W_Q=split_heads_in(q.weight.detach(), H),
        W_K=split_heads_in(k.weight.detach(), H),
        W_V=split_heads_in(v.weight.detach(), H),
        W_O=split_heads_out(o.weight.detach(), H),
        b_Q=head_bias(q, H, dh),
        b_K=head_bias(k, H, dh),
        b_V=head_bias(v, H, dh),
        b_O=output_bias(o),
        W_in=fc_in.weight.detach().T,
        b_in=detached(fc_in.bias),
        W_gate=None,
        W_out=fc_out.weight.detach().T,
        b_out=detached(fc_out.bias),
        ln_attn=layer_norm(_module(layer, paths["ln_attn"]), q.weight),
        ln_mlp=layer_norm(_module(layer, paths["ln_mlp"]), q.weight),
    )


def value_projection(block: Any, summary: ArchitectureSummary) -> tuple[Any, ValueHeads]:
    """The module whose output holds the block's value vectors, and the map from that output
    ``[B, T, H dh]`` to ``V [B, H, T, dh]``."""
    value = _module(block, PATHS[summary.model_type]["W_V"])
    return value, value_heads(summary.n_heads, summary.d_head)


def attention_module(block: Any) -> Any:
    """The block's attention module (returns ``(output, attention probabilities)``): BERT's
    ``attention.self``, DistilBERT's ``attention``."""
    return getattr(block.attention, "self", block.attention)
