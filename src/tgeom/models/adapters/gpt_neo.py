"""GPT-Neo: GPT-2's block with separate bias-free q/k/v (``attn.attention.{q,k,v}_proj``),
learned positions, no ``1/sqrt(d_head)`` scaling of the scores, and layers alternating between
global attention and local attention over a sliding window of ``window_size`` keys
(``attention_layers``), carried as ``summary.attention_windows`` (the reference forward, effective
attention and null spaces use each query's window: SPEC section 1, "Sliding windows").
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
    unembedding,
    value_heads,
)
from tgeom.models.weights import (
    ArchitectureSummary,
    CanonicalWeights,
    LayerWeights,
)

FAMILY = "gpt_neo"
MODEL_TYPES = ("gpt_neo",)


def blocks(hf: Any) -> nn.ModuleList:
    return base_model(hf).h


def summarize(hf: Any) -> ArchitectureSummary:
    c = hf.config
    W_E = base_model(hf).wte.weight
    W_U, _, has_head = unembedding(hf, W_E)
    windows = tuple(c.window_size if kind == "local" else 0 for kind in c.attention_layers)
    return ArchitectureSummary(
        family=FAMILY,
        model_type=c.model_type,
        n_blocks=c.num_layers,
        n_heads=c.num_heads,
        n_kv_heads=c.num_heads,
        d_model=c.hidden_size,
        d_head=c.hidden_size // c.num_heads,
        d_mlp=c.intermediate_size or 4 * c.hidden_size,
        vocab_size=W_E.shape[0],
        n_ctx=c.max_position_embeddings,
        position_scheme="learned",
        tied_embeddings=is_tied(W_E, W_U),
        norm="layernorm",
        norm_placement="pre",
        gated_mlp=False,
        parallel_residual=False,
        is_causal=True,
        activation=c.activation_function,
        has_lm_head=has_head,
        attention_windows=windows if any(windows) else (),
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
        W_pos=base.wpe.weight.detach(),
        W_type=None,
        embed_norm=None,
        final_norm=layer_norm(base.ln_f, W_E),
        rotary=None,
        activation=activation(summary.activation),
        attn_scale=1.0,  # GPT-Neo does not scale q.k
        layers=layer_sequence(hf, summary, blocks(hf), extract_layer),
    )


def extract_layer(hf: Any, summary: ArchitectureSummary, index: int) -> LayerWeights:
    """Block ``index`` in canonical form (views of its parameters)."""
    block = base_model(hf).h[index]
    H, dh = summary.n_heads, summary.d_head
    attn, mlp = block.attn.attention, block.mlp
    return LayerWeights(
        **attention_projections(attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, H, H, dh),
        **mlp_projections(mlp.c_fc, mlp.c_proj),
        ln_attn=layer_norm(block.ln_1, attn.q_proj.weight),
        ln_mlp=layer_norm(block.ln_2, attn.q_proj.weight),
    )


def value_projection(block: Any, summary: ArchitectureSummary) -> tuple[Any, ValueHeads]:
    """The module whose output holds the block's value vectors (``v_proj``), and the map from
    that output ``[B, T, H dh]`` to ``V [B, H, T, dh]``."""
    return block.attn.attention.v_proj, value_heads(summary.n_heads, summary.d_head)


def attention_module(block: Any) -> Any:
    """The block's attention module (returns ``(output, attention probabilities)``)."""
    return block.attn.attention
