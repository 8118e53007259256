"""GPT-J: attention and MLP in parallel from one LayerNorm (``ln_1``), rotary on the first
``rotary_dim`` coordinates of each head with interleaved pairs (rotate-every-two), bias-free
q/k/v/out projections, an LM head with a bias.

The one norm is both ``ln_attn`` and ``ln_mlp`` (the same :class:`Norm`), with
``parallel_residual``: ``h + attn(ln(h)) + mlp(ln(h))``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

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

FAMILY = "gptj"
MODEL_TYPES = ("gptj",)
ROPE_BASE = 10000.0  # fixed in Hugging Face's GPT-J (create_sinusoidal_positions)


def blocks(hf: Any) -> nn.ModuleList:
    return base_model(hf).h


def summarize(hf: Any) -> ArchitectureSummary:
    c = hf.config
    W_E = base_model(hf).wte.weight
    W_U, _, has_head = unembedding(hf, W_E)
    d_head = c.n_embd // c.n_head
    return ArchitectureSummary(
        family=FAMILY,
        model_type=c.model_type,
        n_blocks=c.n_layer,
        n_heads=c.n_head,
        n_kv_heads=c.n_head,
        d_model=c.n_embd,
        d_head=d_head,
        d_mlp=c.n_inner or 4 * c.n_embd,
        vocab_size=W_E.shape[0],
        n_ctx=rotary_context(c, default=c.n_positions),
        position_scheme="rotary",
        tied_embeddings=is_tied(W_E, W_U),
        norm="layernorm",
        norm_placement="pre",
        gated_mlp=False,
        parallel_residual=True,
        is_causal=True,
        activation=c.activation_function,
        has_lm_head=has_head,
        rotary_dim=c.rotary_dim or d_head,
        rotary_interleaved=True,
    )


def extract(hf: Any, summary: ArchitectureSummary) -> CanonicalWeights:
    base = base_model(hf)
    W_E = base.wte.weight.detach()
    W_U, b_U, _ = unembedding(hf, W_E)
    return CanonicalWeights(
        summary=summary,
        W_E=W_E,
        W_U=W_U.detach(),
        b_U=b_U,
        W_pos=None,
        W_type=None,
        embed_norm=None,
        final_norm=layer_norm(base.ln_f, W_E),
        rotary=Rotary.default(summary.rotary_dim, ROPE_BASE, interleaved=True, device=W_E.device),
        activation=activation(summary.activation),
        attn_scale=summary.d_head**-0.5,
        layers=layer_sequence(hf, summary, blocks(hf), extract_layer),
    )


def extract_layer(hf: Any, summary: ArchitectureSummary, index: int) -> LayerWeights:
    """Block ``index`` in canonical form (views of its parameters)."""
    block = base_model(hf).h[index]
    H, dh = summary.n_heads, summary.d_head
    attn, mlp = block.attn, block.mlp
    ln = layer_norm(block.ln_1, attn.q_proj.weight)
    return LayerWeights(
        **attention_projections(attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, H, H, dh),
        **mlp_projections(mlp.fc_in, mlp.fc_out),
        ln_attn=ln,
        ln_mlp=ln,
    )


def value_projection(block: Any, summary: ArchitectureSummary) -> tuple[Any, ValueHeads]:
    """The module whose output holds the block's value vectors (``v_proj``), and the map from
    that output ``[B, T, H dh]`` to ``V [B, H, T, dh]``."""
    return block.attn.v_proj, value_heads(summary.n_heads, summary.d_head)


def attention_module(block: Any) -> Any:
    """The block's attention module (returns ``(output, attention probabilities)``)."""
    return block.attn
