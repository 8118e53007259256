"""Llama family (Llama, Mistral, Qwen2, Qwen3, OLMo 2, SmolLM): RMSNorm, RoPE, gated SiLU MLP,
grouped KV heads. Qwen 3 adds QK-norm per head; OLMo 2 QK-norm over all heads at once and its
norms on each sublayer's output (:data:`LAYOUTS`). Mistral's, Qwen2's and Qwen3's sliding windows
(:func:`attention_windows`)."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

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
from tgeom.models.weights import (
    ArchitectureSummary,
    CanonicalWeights,
    LayerWeights,
    Norm,
    QKNorm,
    Rotary,
    expand_kv,
)

FAMILY = "llama"
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "olmo2")

# Per model type, what differs from Llama: norm placement, the modules holding the block's two
# norms (ln_attn, ln_mlp) and the scope of QK-norm (used where the attention has q_norm/k_norm).
LAYOUTS: dict[str, tuple[str, tuple[str, str], Literal["head", "all"]]] = {
    "olmo2": ("post_sublayer", ("post_attention_layernorm", "post_feedforward_layernorm"), "all"),
}
LLAMA_LAYOUT: tuple[str, tuple[str, str], Literal["head", "all"]] = (
    "pre",
    ("input_layernorm", "post_attention_layernorm"),
    "head",
)


def blocks(hf: Any) -> nn.ModuleList:
    return base_model(hf).layers


def summarize(hf: Any) -> ArchitectureSummary:
    c = hf.config
    W_E = base_model(hf).embed_tokens.weight
    W_U, _, has_head = unembedding(hf, W_E)
    n_heads = c.num_attention_heads
    placement, _, scope = LAYOUTS.get(c.model_type, LLAMA_LAYOUT)
    return ArchitectureSummary(
        family=FAMILY,
        model_type=c.model_type,
        n_blocks=c.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(c, "num_key_value_heads", None) or n_heads,
        d_model=c.hidden_size,
        d_head=getattr(c, "head_dim", None) or c.hidden_size // n_heads,
        d_mlp=c.intermediate_size,
        vocab_size=W_E.shape[0],
        n_ctx=rotary_context(c),
        position_scheme="rotary",
        tied_embeddings=is_tied(W_E, W_U),
        norm="rmsnorm",
        norm_placement=placement,
        gated_mlp=True,
        parallel_residual=False,
        is_causal=True,
        activation=c.hidden_act,
        has_lm_head=has_head,
        rotary_dim=2 * base_model(hf).rotary_emb.inv_freq.shape[0],
        qk_norm=scope if hasattr(blocks(hf)[0].self_attn, "q_norm") else "none",
        attention_windows=attention_windows(c),
    )


def attention_windows(c: Any) -> tuple[int, ...]:
    """Per layer, the keys a query sees (itself included; 0: all), or ``()`` without windows.

    Mistral windows every layer over ``sliding_window`` keys when that is set. Qwen2 and Qwen3
    window the layers their config's ``layer_types`` marks ``sliding_attention`` (the config folds
    ``use_sliding_window`` and ``max_window_layers`` into them: layers ``>= max_window_layers``,
    and ``sliding_window`` is None unless ``use_sliding_window``). Hugging Face's mask lets query
    ``i`` see key ``j`` when ``i - window < j <= i``."""
    window = getattr(c, "sliding_window", None) or 0
    if not window:
        return ()
    types = None if c.model_type == "mistral" else getattr(c, "layer_types", None)
    if types is None:
        return (window,) * c.num_hidden_layers
    windows = tuple(window if kind == "sliding_attention" else 0 for kind in types)
    return windows if any(windows) else ()


def _rmsnorm(module: Any) -> Norm:
    eps = getattr(module, "variance_epsilon", None) or module.eps
    return Norm("rmsnorm", module.weight.detach(), None, float(eps))


def _qk_norm(module: Any, n_heads: int, d_head: int, scope: Literal["head", "all"]) -> QKNorm:
    """A q_norm / k_norm module as a :class:`QKNorm` with its gain ``[n_heads, d_head]``: one
    gain of ``d_head`` shared by every head (Qwen 3) or one per head of the projection (OLMo 2),
    repeated per query head like the KV heads."""
    gain = expand_kv(module.weight.detach().reshape(-1, d_head), n_heads)
    eps = getattr(module, "variance_epsilon", None) or module.eps
    return QKNorm(gain, float(eps), scope)


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
        final_norm=_rmsnorm(base.norm),
        rotary=Rotary(rope.inv_freq.detach().clone(), float(rope.attention_scaling)),
        activation=activation(hf.config.hidden_act),
        attn_scale=summary.d_head**-0.5,
        layers=layer_sequence(hf, summary, blocks(hf), extract_layer),
    )


def extract_layer(hf: Any, summary: ArchitectureSummary, index: int) -> LayerWeights:
    """Block ``index`` in canonical form (views of its parameters; K/V expanded per head)."""
    layer = base_model(hf).layers[index]
    H, K, dh = summary.n_heads, summary.n_kv_heads, summary.d_head
    _, (attn_norm, mlp_norm), scope = LAYOUTS.get(summary.model_type, LLAMA_LAYOUT)
    attn, mlp = layer.self_attn, layer.mlp
    qk_norm = hasattr(attn, "q_norm")
    return LayerWeights(
        **attention_projections(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, H, K, dh),
        **mlp_projections(mlp.up_proj, mlp.down_proj, gate=mlp.gate_proj),
        ln_attn=_rmsnorm(getattr(layer, attn_norm)),
        ln_mlp=_rmsnorm(getattr(layer, mlp_norm)),
        q_norm=_qk_norm(attn.q_norm, H, dh, scope) if qk_norm else None,
        k_norm=_qk_norm(attn.k_norm, H, dh, scope) if qk_norm else None,
    )


def value_projection(block: Any, summary: ArchitectureSummary) -> tuple[Any, ValueHeads]:
    """The module whose output holds the block's value vectors (``v_proj``, KV heads), and the
    map from that output ``[B, T, K dh]`` to ``V [B, H, T, dh]`` (query head h reads KV head
    ``h // (H / K)``)."""
    return block.self_attn.v_proj, value_heads(summary.n_heads, summary.d_head)


def attention_module(block: Any) -> Any:
    """The block's attention module (returns ``(output, attention probabilities)``)."""
    return block.self_attn
