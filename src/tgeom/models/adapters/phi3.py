"""Phi-3: Llama's block (RMSNorm, RoPE, gated SiLU MLP, grouped KV heads) with fused projections,
``qkv_proj`` (rows ``[q | k | v]``: ``H d_head`` query rows, then ``K d_head`` key and ``K d_head``
value rows) and ``gate_up_proj`` (rows ``[gate | up]``, the activation on the gate), rotary on the
first ``partial_rotary_factor * d_head`` coordinates (rotate-half pairs), and a sliding window of
``sliding_window`` keys on every layer when the config sets one (Hugging Face's Phi-3 takes the
sliding-window mask for all layers then), carried as ``summary.attention_windows``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from tgeom.models.adapters.common import (
    ValueHeads,
    activation,
    base_model,
    is_tied,
    layer_sequence,
    output_bias,
    rotary_context,
    unembedding,
    value_heads,
)
from tgeom.models.weights import (
    ArchitectureSummary,
    CanonicalWeights,
    LayerWeights,
    Norm,
    Rotary,
    expand_kv,
    split_heads_in,
    split_heads_out,
    zeros_bias,
)

FAMILY = "phi3"
MODEL_TYPES = ("phi3",)


def blocks(hf: Any) -> nn.ModuleList:
    return base_model(hf).layers


def summarize(hf: Any) -> ArchitectureSummary:
    c = hf.config
    W_E = base_model(hf).embed_tokens.weight
    W_U, _, has_head = unembedding(hf, W_E)
    n_heads = c.num_attention_heads
    window = getattr(c, "sliding_window", None) or 0
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
        norm_placement="pre",
        gated_mlp=True,
        parallel_residual=False,
        is_causal=True,
        activation=c.hidden_act,
        has_lm_head=has_head,
        rotary_dim=2 * base_model(hf).rotary_emb.inv_freq.shape[0],
        attention_windows=(window,) * c.num_hidden_layers if window else (),
    )


def _rmsnorm(module: Any) -> Norm:
    return Norm("rmsnorm", module.weight.detach(), None, float(module.variance_epsilon))


def _split_qkv(linear: Any, H: int, K: int, dh: int) -> tuple[Tensor, Tensor, Tensor]:
    """``qkv_proj`` as canonical ``W_Q, W_K, W_V [H, d, dh]`` (KV heads expanded)."""
    w_q, w_k, w_v = linear.weight.detach().split([H * dh, K * dh, K * dh], dim=0)
    return (
        split_heads_in(w_q, H),
        expand_kv(split_heads_in(w_k, K), H),
        expand_kv(split_heads_in(w_v, K), H),
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
        final_norm=_rmsnorm(base.norm),
        rotary=Rotary(rope.inv_freq.detach().clone(), float(rope.attention_scaling)),
        activation=activation(hf.config.hidden_act),
        attn_scale=summary.d_head**-0.5,
        layers=layer_sequence(hf, summary, blocks(hf), extract_layer),
    )


def extract_layer(hf: Any, summary: ArchitectureSummary, index: int) -> LayerWeights:
    """Block ``index`` in canonical form (views of its fused projections; K/V expanded per
    head)."""
    layer = base_model(hf).layers[index]
    H, K, dh, dm = summary.n_heads, summary.n_kv_heads, summary.d_head, summary.d_mlp
    attn, mlp = layer.self_attn, layer.mlp
    W_Q, W_K, W_V = _split_qkv(attn.qkv_proj, H, K, dh)
    gate, up = mlp.gate_up_proj.weight.detach().split([dm, dm], dim=0)
    no_bias = zeros_bias(H, dh, W_Q)
    return LayerWeights(
        W_Q=W_Q,
        W_K=W_K,
        W_V=W_V,
        W_O=split_heads_out(attn.o_proj.weight.detach(), H),
        b_Q=no_bias,
        b_K=no_bias,
        b_V=no_bias,
        b_O=output_bias(attn.o_proj),
        W_in=up.T,
        b_in=None,
        W_gate=gate.T,
        W_out=mlp.down_proj.weight.detach().T,
        b_out=None,
        ln_attn=_rmsnorm(layer.input_layernorm),
        ln_mlp=_rmsnorm(layer.post_attention_layernorm),
    )


def value_projection(block: Any, summary: ArchitectureSummary) -> tuple[Any, ValueHeads]:
    """The module whose output holds the block's value vectors (``qkv_proj``: its last ``K
    d_head`` outputs), and the map from that output to ``V [B, H, T, dh]``."""
    H, K, dh = summary.n_heads, summary.n_kv_heads, summary.d_head
    heads = value_heads(H, dh)

    def values(out: Tensor) -> Tensor:
        return heads(out[..., (H + K) * dh :])

    return block.self_attn.qkv_proj, values


def attention_module(block: Any) -> Any:
    """The block's attention module (returns ``(output, attention probabilities)``)."""
    return block.self_attn
