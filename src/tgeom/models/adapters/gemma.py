"""Gemma family (Gemma 1, 2, 3), one adapter switched by flags per model type (:data:`FLAGS`).

Shared by all three: embeddings scaled by ``sqrt(d)`` (``CanonicalWeights.embed_scale``; ``W_E``
stays the raw parameter), RMSNorm with gain ``1 + w`` (the canonical gains are the effective
ones), GeGLU (``gelu_pytorch_tanh`` gate), RoPE, multi-query / grouped KV heads.
Gemma 2 adds norms on both sides of each sublayer (``ln_attn_out`` / ``ln_mlp_out``), alternating
sliding-window layers, the query scale ``query_pre_attn_scalar ** -0.5`` and soft-capping of the
attention scores and of the final logits. Gemma 3 keeps Gemma 2's layout, adds QK-norm per head
and gives its local (sliding) layers their own RoPE base; its attention does not soft-cap (the
installed transformers never passes ``attn_logit_softcapping`` to Gemma 3's attention).
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
    layer_sequence,
    mlp_projections,
    rotary_context,
    unembedding,
    value_heads,
)
from tgeom.models.adapters.llama import attention_windows
from tgeom.models.weights import (
    ArchitectureSummary,
    CanonicalWeights,
    LayerWeights,
    Norm,
    QKNorm,
    Rotary,
)

FAMILY = "gemma"
MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")

# Per model type: (sandwich norms, attention soft-cap, per-layer-type RoPE, config activation key).
FLAGS: dict[str, tuple[bool, bool, bool, str]] = {
    "gemma": (False, False, False, "hidden_act"),
    "gemma2": (True, True, False, "hidden_activation"),
    "gemma3_text": (True, False, True, "hidden_activation"),
}


def blocks(hf: Any) -> nn.ModuleList:
    return base_model(hf).layers


def summarize(hf: Any) -> ArchitectureSummary:
    c = hf.config
    _, attn_cap, _, act_key = FLAGS[c.model_type]
    if getattr(c, "use_bidirectional_attention", False):
        raise TgeomError(
            f"this {c.model_type} config uses bidirectional attention "
            "(use_bidirectional_attention), which tgeom does not model: load a causal checkpoint."
        )
    W_E = base_model(hf).embed_tokens.weight
    W_U, _, has_head = unembedding(hf, W_E)
    global_rope, _ = _rotaries(hf)
    return ArchitectureSummary(
        family=FAMILY,
        model_type=c.model_type,
        n_blocks=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads,
        d_model=c.hidden_size,
        d_head=c.head_dim,
        d_mlp=c.intermediate_size,
        vocab_size=W_E.shape[0],
        n_ctx=rotary_context(c),
        position_scheme="rotary",
        tied_embeddings=is_tied(W_E, W_U),
        norm="rmsnorm",
        norm_placement="pre",
        gated_mlp=True,
        parallel_residual=False,
        is_causal=True,
        activation=getattr(c, act_key),
        has_lm_head=has_head,
        rotary_dim=global_rope.rotary_dim,
        qk_norm="head" if hasattr(blocks(hf)[0].self_attn, "q_norm") else "none",
        attention_windows=attention_windows(c) if c.model_type != "gemma" else (),
        attn_logit_softcap=getattr(c, "attn_logit_softcapping", None) if attn_cap else None,
        final_logit_softcap=getattr(c, "final_logit_softcapping", None) if has_head else None,
    )


def _rotaries(hf: Any) -> tuple[Rotary, Rotary | None]:
    """``(global RoPE, local RoPE or None)`` from the model's rotary module: Gemma 3 keeps one
    ``<layer type>_inv_freq`` buffer per layer type, Gemma 1 and 2 one ``inv_freq``."""
    rope = base_model(hf).rotary_emb
    if not FLAGS[hf.config.model_type][2]:
        return Rotary(rope.inv_freq.detach().clone(), float(rope.attention_scaling)), None

    def of(kind: str) -> Rotary:
        inv_freq = getattr(rope, f"{kind}_inv_freq").detach().clone()
        return Rotary(inv_freq, float(getattr(rope, f"{kind}_attention_scaling")))

    local = of("sliding_attention") if "sliding_attention" in rope.layer_types else None
    return of("full_attention"), local


def _norm(module: Any) -> Norm:
    """A Gemma RMSNorm (``x / rms(x) * (1 + w)``) with its effective gain ``1 + w``."""
    w = module.weight.detach()
    return Norm("rmsnorm", (1.0 + w.float()).to(w.dtype), None, float(module.eps))


def _qk_norm(module: Any, n_heads: int) -> QKNorm:
    """Gemma 3's q_norm / k_norm: one effective gain ``1 + w`` of ``d_head`` shared by every
    head, normalised per head; ``[n_heads, d_head]``."""
    w = module.weight.detach()
    gain = (1.0 + w.float()).to(w.dtype)[None, :].expand(n_heads, -1).clone()
    return QKNorm(gain, float(module.eps), "head")


def extract(hf: Any, summary: ArchitectureSummary) -> CanonicalWeights:
    base = base_model(hf)
    global_rope, _ = _rotaries(hf)
    W_E = base.embed_tokens.weight.detach()
    W_U, b_U, _ = unembedding(hf, W_E)
    return CanonicalWeights(
        summary=summary,
        W_E=W_E,
        W_U=W_U.detach(),
        b_U=b_U,
        W_pos=None,
        W_type=None,
        embed_norm=None,
        final_norm=_norm(base.norm),
        rotary=global_rope,
        activation=activation(summary.activation),
        attn_scale=float(getattr(hf.config, "query_pre_attn_scalar", None) or summary.d_head)
        ** -0.5,
        layers=layer_sequence(hf, summary, blocks(hf), extract_layer),
        # The model rounds sqrt(d) to the weights' dtype (bfloat16: sqrt(3072) -> 55.5).
        embed_scale=float(base.embed_tokens.embed_scale.to(W_E.dtype)),
    )


def extract_layer(hf: Any, summary: ArchitectureSummary, index: int) -> LayerWeights:
    """Block ``index`` in canonical form (views of its projections; K/V expanded per head)."""
    layer = base_model(hf).layers[index]
    H, K, dh = summary.n_heads, summary.n_kv_heads, summary.d_head
    sandwich, _, _, _ = FLAGS[summary.model_type]
    _, local_rope = _rotaries(hf)
    layer_types = getattr(hf.config, "layer_types", None) or ()
    attn, mlp = layer.self_attn, layer.mlp
    qk_norm = hasattr(attn, "q_norm")
    local = local_rope is not None and layer_types[index] == "sliding_attention"
    return LayerWeights(
        **attention_projections(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, H, K, dh),
        **mlp_projections(mlp.up_proj, mlp.down_proj, gate=mlp.gate_proj),
        ln_attn=_norm(layer.input_layernorm),
        ln_mlp=_norm(
            layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm
        ),
        q_norm=_qk_norm(attn.q_norm, H) if qk_norm else None,
        k_norm=_qk_norm(attn.k_norm, H) if qk_norm else None,
        ln_attn_out=_norm(layer.post_attention_layernorm) if sandwich else None,
        ln_mlp_out=_norm(layer.post_feedforward_layernorm) if sandwich else None,
        rotary=local_rope if local else None,
    )


def value_projection(block: Any, summary: ArchitectureSummary) -> tuple[Any, ValueHeads]:
    """``v_proj`` (KV heads) and the map from its output ``[B, T, K dh]`` to ``V [B, H, T, dh]``."""
    return block.self_attn.v_proj, value_heads(summary.n_heads, summary.d_head)


def attention_module(block: Any) -> Any:
    """The block's attention module (returns ``(output, attention probabilities)``)."""
    return block.self_attn
