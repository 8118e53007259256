"""OPT: learned positions stored with an offset of 2, ReLU, separate biased q/k/v projections,
pre- or post-LN by ``do_layer_norm_before``, optional ``project_in``/``project_out``.

Positions are numbered over real tokens only (``cumsum(attention_mask) - 1``, as Hugging Face
does), so canonical ``W_pos`` drops the two offset rows and sets ``positions_skip_padding``.
When ``word_embed_proj_dim != hidden_size`` the token embedding lives in a smaller space and
bias-free linear maps ``project_in`` / ``project_out`` join it to the residual stream; both are
folded into the vocabulary matrices so that they are ``[V, d]`` like every family's:
``W_E = embed_tokens @ project_in.T`` and ``W_U = lm_head @ project_out`` (logits are
``project_out(final_norm(h)) @ lm_head.T``). Post-LN OPT (``do_layer_norm_before=False``,
OPT-350m) has no final norm.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from tgeom.models.adapters.common import (
    ValueHeads,
    activation,
    attention_projections,
    base_model,
    is_tied,
    layer_norm,
    layer_sequence,
    mlp_projections,
    unembedding,
    value_heads,
)
from tgeom.models.weights import (
    ArchitectureSummary,
    CanonicalWeights,
    LayerWeights,
    learned_positions,
)

FAMILY = "opt"
MODEL_TYPES = ("opt",)
POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding stores position t in row t + 2


def blocks(hf: Any) -> nn.ModuleList:
    return base_model(hf).decoder.layers


def summarize(hf: Any) -> ArchitectureSummary:
    c = hf.config
    decoder = base_model(hf).decoder
    raw_E = decoder.embed_tokens.weight
    raw_U, _, has_head = unembedding(hf, raw_E)
    return ArchitectureSummary(
        family=FAMILY,
        model_type=c.model_type,
        n_blocks=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_attention_heads,
        d_model=c.hidden_size,
        d_head=c.hidden_size // c.num_attention_heads,
        d_mlp=c.ffn_dim,
        vocab_size=raw_E.shape[0],
        n_ctx=decoder.embed_positions.weight.shape[0] - POSITION_OFFSET,
        position_scheme="learned",
        tied_embeddings=is_tied(raw_E, raw_U),  # tied as stored (before folding projections)
        norm="layernorm",
        norm_placement="pre" if c.do_layer_norm_before else "post",
        gated_mlp=False,
        parallel_residual=False,
        is_causal=True,
        activation=c.activation_function,
        has_lm_head=has_head,
        positions_skip_padding=True,
        embedding_projection=decoder.project_in is not None,
    )


def extract(hf: Any, summary: ArchitectureSummary) -> CanonicalWeights:
    decoder = base_model(hf).decoder
    raw_E = decoder.embed_tokens.weight.detach()
    raw_U, b_U, _ = unembedding(hf, raw_E)
    final = decoder.final_layer_norm
    return CanonicalWeights(
        summary=summary,
        W_E=_fold(raw_E, decoder.project_in, into_residual=True),
        W_U=_fold(raw_U.detach(), decoder.project_out, into_residual=False),
        b_U=b_U,
        W_pos=learned_positions(decoder.embed_positions.weight.detach(), POSITION_OFFSET),
        W_type=None,
        embed_norm=None,
        final_norm=layer_norm(final, raw_E) if final is not None else None,
        rotary=None,
        activation=activation(hf.config.activation_function),
        attn_scale=summary.d_head**-0.5,
        layers=layer_sequence(hf, summary, blocks(hf), extract_layer),
    )


def extract_layer(hf: Any, summary: ArchitectureSummary, index: int) -> LayerWeights:
    """Block ``index`` in canonical form (views of its parameters)."""
    layer = base_model(hf).decoder.layers[index]
    H, dh = summary.n_heads, summary.d_head
    attn = layer.self_attn
    return LayerWeights(
        **attention_projections(attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, H, H, dh),
        **mlp_projections(layer.fc1, layer.fc2),
        ln_attn=layer_norm(layer.self_attn_layer_norm, attn.q_proj.weight),
        ln_mlp=layer_norm(layer.final_layer_norm, attn.q_proj.weight),
    )


def _fold(vocab: Tensor, projection: Any, into_residual: bool) -> Tensor:
    """``[V, d_embed]`` vocabulary rows -> ``[V, d]``: ``E @ project_in.T`` for the input side,
    ``U @ project_out`` for the output side (``project_*.weight`` is ``[out, in]``)."""
    if projection is None:
        return vocab
    weight = projection.weight.detach()
    return vocab @ weight.T if into_residual else vocab @ weight


def value_projection(block: Any, summary: ArchitectureSummary) -> tuple[Any, ValueHeads]:
    """The module whose output holds the block's value vectors (``v_proj``), and the map from
    that output ``[B, T, H dh]`` to ``V [B, H, T, dh]``."""
    return block.self_attn.v_proj, value_heads(summary.n_heads, summary.d_head)


def attention_module(block: Any) -> Any:
    """The block's attention module (returns ``(output, attention probabilities)``)."""
    return block.self_attn
