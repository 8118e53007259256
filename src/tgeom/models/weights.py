"""Canonical weights: every architecture's parameters in one layout (SPEC section 0).

Shapes follow TransformerLens, row-vector convention (``x @ W``):
``W_Q, W_K, W_V: [n_heads, d_model, d_head]``, ``W_O: [n_heads, d_head, d_model]``,
``W_in, W_gate: [d_model, d_mlp]``, ``W_out: [d_mlp, d_model]``, ``W_E, W_U: [vocab, d_model]``.
Grouped-query attention is expanded to one K/V per query head (head ``h`` reads KV group
``h // (n_heads // n_kv_heads)``, as Hugging Face's ``repeat_kv`` does).

Canonical weights hold no second copy of the model: a block's tensors are read when the block is
indexed (:class:`LayerSequence`), as views of the Hugging Face parameters where the layout allows
and as copies of that one block otherwise (grouped K/V expanded per query head, a folded scale).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, overload

import torch
from torch import Tensor

from tgeom.errors import TgeomError

NormKind = Literal["layernorm", "rmsnorm"]


@dataclass(frozen=True)
class ArchitectureSummary:
    """What ``tgeom info`` prints: the facts an analysis needs about an architecture."""

    family: str  # the adapter's FAMILY, e.g. 'gpt2', 'bert', 'llama', 'gpt_neo', 'phi3'
    model_type: str  # the transformers model_type, e.g. 'roberta', 'qwen2'
    n_blocks: int  # L: blocks are 0..L-1, hidden states 0..L (block b reads b, writes b + 1)
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    vocab_size: int
    n_ctx: int
    position_scheme: str  # 'learned' | 'rotary' | 'alibi' (BLOOM)
    tied_embeddings: bool
    norm: NormKind
    norm_placement: str  # 'pre' | 'post' | 'post_sublayer' (LayerWeights says where each sits)
    gated_mlp: bool
    parallel_residual: bool
    is_causal: bool
    activation: str
    has_lm_head: bool
    # Mechanisms most families leave off (each one is handled once, in the reference forward):
    rotary_dim: int = 0  # coordinates of each head that rotary rotates (0: no rotary)
    rotary_interleaved: bool = False  # rotary pairs (2i, 2i+1) (GPT-J), not (i, i + dim/2)
    positions_skip_padding: bool = False  # learned positions count real tokens (RoBERTa, OPT)
    embedding_projection: bool = False  # W_E / W_U fold a projection d_embed <-> d (OPT)
    # Per layer, the number of keys a query sees, itself included (0: all); () for no windows.
    attention_windows: tuple[int, ...] = ()
    qk_norm: str = "none"  # 'none' | 'head' | 'all': QKNorm's scope (Qwen 3 | OLMo 2)
    # Soft-caps (:func:`softcap`), None where off: attention scores before the mask (Gemma 2),
    # vocabulary logits (Gemma 2, 3).
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None

    def mechanisms(self) -> dict[str, Any]:
        """The special mechanisms in one place (``tgeom info``): ``position_scheme`` ('learned' |
        'rotary' | 'alibi'), ``qk_norm`` (None | 'head' | 'all'), ``sliding_window`` (per layer,
        None for a global layer; None when no layer has a window), ``softcap`` (None, or the
        ``attention`` and ``final`` caps, each None where off) and ``parallel_block`` (attention
        and MLP read the same input)."""
        windows = [w or None for w in self.attention_windows] if self.attention_windows else None
        caps = {"attention": self.attn_logit_softcap, "final": self.final_logit_softcap}
        return {
            "position_scheme": self.position_scheme,
            "qk_norm": None if self.qk_norm == "none" else self.qk_norm,
            "sliding_window": windows,
            "softcap": caps if any(v is not None for v in caps.values()) else None,
            "parallel_block": self.parallel_residual,
        }

    @property
    def n_layers(self) -> int:
        """The number of blocks L (the same as :attr:`n_blocks`; kept for the API)."""
        return self.n_blocks


@dataclass
class Norm:
    """A LayerNorm or RMSNorm with its parameters; callable on ``[..., d]``."""

    kind: NormKind
    weight: Tensor  # [d]
    bias: Tensor | None  # [d] or None
    eps: float

    def __call__(self, x: Tensor) -> Tensor:
        if self.kind == "layernorm":  # gains of a bfloat16 model widen to a float32 input
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return torch.nn.functional.layer_norm(
                x, (x.shape[-1],), self.weight.to(x.dtype), bias, self.eps
            )
        # Hugging Face's RMSNorm normalises in float32, then scales.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * normed.to(x.dtype)
        return out + self.bias if self.bias is not None else out


@dataclass
class Rotary:
    """Rotary position embedding (RoPE) on the first ``rotary_dim`` coordinates of every head
    (partial rotary when ``rotary_dim < d_head``; the rest pass through unrotated).

    Frequency ``i`` rotates the pair ``(i, i + rotary_dim / 2)`` (rotate-half: Llama, GPT-NeoX,
    Phi) or, with ``interleaved``, the adjacent pair ``(2i, 2i + 1)`` (GPT-J's rotate-every-two).
    """

    inv_freq: Tensor  # [rotary_dim // 2]
    attention_scaling: float = 1.0
    interleaved: bool = False

    @classmethod
    def default(
        cls,
        rotary_dim: int,
        base: float = 10000.0,
        interleaved: bool = False,
        device: torch.device | None = None,
    ) -> Rotary:
        """The original RoPE frequencies ``base^(-2i / rotary_dim)``, ``i < rotary_dim / 2``."""
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim
        return cls(1.0 / (base**exponents), 1.0, interleaved)

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.shape[0]

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``positions [T]`` -> ``cos, sin [T, rotary_dim]`` (coordinate j holds the angle of the
        pair it belongs to)."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq.float()[None, :]
        if self.interleaved:
            emb = freqs.repeat_interleave(2, dim=-1)
        else:
            emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    def apply(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x [..., T, d_head]`` at ``positions [T]``."""
        cos, sin = self.cos_sin(positions.to(x.device))
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        if self.interleaved:
            pairs = rot.unflatten(-1, (-1, 2))
            turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        else:
            half = self.rotary_dim // 2
            turned = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        return torch.cat([rot * cos + turned * sin, rest], dim=-1)


@dataclass
class QKNorm:
    """QK-norm: an RMSNorm on every query (or key) after its projection and bias, before rotary
    (Qwen 3, OLMo 2, Gemma 3), gain folded in: ``n(x) = weight * x / sqrt(mean(x^2) + eps)``.

    ``scope="head"``: the mean square is over each head's ``d_head`` coordinates (Qwen 3);
    ``"all"``: over the whole projection, all heads at once (OLMo 2). Grouped keys are expanded
    per query head, each KV head repeated equally often, so the mean over the expanded heads is
    the mean over the KV heads the model normalises. Inputs are ``[..., H, n, d_head]``.
    """

    weight: Tensor  # [H, dh] effective gain (KV heads expanded)
    eps: float
    scope: Literal["head", "all"]

    def inverse_scale(self, x: Tensor) -> Tensor:
        """The per-token factor ``1 / sqrt(mean(x^2) + eps)`` of ``x [..., H, n, dh]``:
        ``[..., H, n, 1]`` (scope ``"head"``) or ``[..., 1, n, 1]`` (``"all"``), computed in
        float32 or better."""
        wide = x if x.dtype == torch.float64 else x.float()
        dims = (-1,) if self.scope == "head" else (-3, -1)
        return torch.rsqrt(wide.pow(2).mean(dims, keepdim=True) + self.eps)

    def __call__(self, x: Tensor) -> Tensor:
        """``n(x)``, ``[..., H, n, dh]``, in ``x``'s dtype."""
        wide = x if x.dtype == torch.float64 else x.float()
        return (self.weight[:, None, :] * (wide * self.inverse_scale(x))).to(x.dtype)


@dataclass
class LayerWeights:
    """One block's parameters in canonical form.

    ``ln_attn`` / ``ln_mlp`` are the norms before attention / MLP for pre-LN models
    (``norm_placement="pre"``), the norms after the attention / MLP residual additions for
    post-LN models (``"post"``: BERT), and the norms on the attention / MLP outputs before their
    residual additions (``"post_sublayer"``: OLMo 2). ``q_norm`` / ``k_norm``: QK-norm, or None.
    ``ln_attn_out`` / ``ln_mlp_out``: pre-LN models with norms on both sides of each sublayer
    (Gemma 2, 3: "sandwich"), the norm on the sublayer's output before its residual addition.
    ``rotary``: this layer's RoPE where it differs from the model's (:func:`layer_rotary`).
    """

    W_Q: Tensor  # [H, d, dh]
    W_K: Tensor  # [H, d, dh]
    W_V: Tensor  # [H, d, dh]
    W_O: Tensor  # [H, dh, d]
    b_Q: Tensor  # [H, dh]
    b_K: Tensor  # [H, dh]
    b_V: Tensor  # [H, dh]
    b_O: Tensor  # [d]
    W_in: Tensor  # [d, dm]
    b_in: Tensor | None  # [dm]
    W_gate: Tensor | None  # [d, dm] (gated MLPs: out = act(x W_gate) * (x W_in))
    W_out: Tensor  # [dm, d]
    b_out: Tensor | None  # [d]
    ln_attn: Norm
    ln_mlp: Norm
    q_norm: QKNorm | None = None
    k_norm: QKNorm | None = None
    ln_attn_out: Norm | None = None
    ln_mlp_out: Norm | None = None
    rotary: Rotary | None = None  # Gemma 3: local layers have their own RoPE base


class LayerSequence(Sequence[LayerWeights]):
    """The blocks' canonical weights, each read when indexed: ``read(i)`` builds block ``i``'s
    :class:`LayerWeights` (views of the model's parameters where the layout allows, one block's
    copies otherwise), so no second copy of the whole model is ever held. The last ``keep``
    blocks read stay cached, so that loops over a block's heads do not read it again."""

    def __init__(self, n_blocks: int, read: Callable[[int], LayerWeights], keep: int = 2) -> None:
        self._n = n_blocks
        self._read = read
        self._keep = keep
        self._cache: OrderedDict[int, LayerWeights] = OrderedDict()

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, index: int) -> LayerWeights: ...

    @overload
    def __getitem__(self, index: slice) -> list[LayerWeights]: ...

    def __getitem__(self, index: int | slice) -> LayerWeights | list[LayerWeights]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._n))]
        i = index + self._n if index < 0 else index
        if not 0 <= i < self._n:
            raise IndexError(f"block {index} out of range for {self._n} blocks")
        layer = self._cache.pop(i, None)
        if layer is None:
            layer = self._read(i)
        self._cache[i] = layer
        while len(self._cache) > self._keep:
            self._cache.popitem(last=False)
        return layer

    def __iter__(self) -> Iterator[LayerWeights]:
        return (self[i] for i in range(self._n))

    def __repr__(self) -> str:
        return f"LayerSequence({self._n} blocks, read on demand)"


@dataclass
class CanonicalWeights:
    """The whole model in canonical form: what every analysis reads instead of HF modules."""

    summary: ArchitectureSummary
    W_E: Tensor  # [V, d] input embedding
    W_U: Tensor  # [V, d] unembedding rows (W_E itself when tied or when there is no LM head)
    b_U: Tensor | None  # [V]
    W_pos: Tensor | None  # [n_ctx, d] learned positions, row t = position t
    W_type: Tensor | None  # [n_types, d] token-type embedding (BERT); type 0 is used
    embed_norm: Norm | None  # norm applied to the summed embeddings (BERT)
    final_norm: Norm | None  # norm before the unembedding (None for post-LN encoders)
    rotary: Rotary | None
    activation: Callable[[Tensor], Tensor]
    attn_scale: float  # multiplies q.k
    # Block i's weights, read when indexed (:class:`LayerSequence`) or any sequence of them.
    layers: Sequence[LayerWeights] = field(default_factory=list)
    embed_scale: float = 1.0  # hidden[0] = embed_scale * W_E[ids] (+ ...): sqrt(d) for Gemma
    # ALiBi (BLOOM): head h adds alibi_slopes[h] * (s - t) to the score of query t for key s
    # (t, s counted over real tokens; :func:`tgeom.models.reference.attention_bias`).
    alibi_slopes: Tensor | None = None  # [H]

    def named_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """Every parameter tensor with a dotted name (``layers.3.W_Q``, ``final_norm.weight``)."""
        for name in ("W_E", "W_U", "b_U", "W_pos", "W_type", "alibi_slopes"):
            value = getattr(self, name)
            if value is not None:
                yield name, value
        for name in ("embed_norm", "final_norm"):
            norm = getattr(self, name)
            if norm is not None:
                yield from _norm_tensors(name, norm)
        for index, layer in enumerate(self.layers):
            for f in fields(layer):
                value = getattr(layer, f.name)
                if isinstance(value, Norm):
                    yield from _norm_tensors(f"layers.{index}.{f.name}", value)
                elif isinstance(value, QKNorm):
                    yield f"layers.{index}.{f.name}.weight", value.weight
                elif isinstance(value, Rotary):
                    continue  # fixed frequencies, not parameters
                elif value is not None:
                    yield f"layers.{index}.{f.name}", value

    def check_finite(self) -> None:
        """Raise a one-line error naming the first tensor holding NaN or inf.

        Streamed: blocks are read one at a time (:class:`LayerSequence`), so the check holds at
        most one block's copies besides the model. One sum per tensor in the common, finite case
        (NaN and inf reach the sum; a finite sum proves every entry finite); only a non-finite
        sum, which finite entries can give by overflow, pays for the entrywise check (SmolLM2,
        best of 4 on a loaded 2-core machine: 4.8 s entrywise, 0.43 s by sums)."""
        for name, tensor in self.named_tensors():
            if tensor.numel() == 0 or bool(torch.isfinite(tensor.sum())):
                continue
            if not torch.isfinite(tensor).all():
                raise TgeomError(
                    f"the model's weights contain NaN or inf in {name}; the checkpoint is "
                    "corrupt or was saved after a diverged run: load another checkpoint."
                )


def _norm_tensors(prefix: str, norm: Norm) -> Iterator[tuple[str, Tensor]]:
    yield f"{prefix}.weight", norm.weight
    if norm.bias is not None:
        yield f"{prefix}.bias", norm.bias


def attention_window(summary: ArchitectureSummary, layer: int) -> int:
    """Layer ``layer``'s sliding window: query i sees keys ``i - w < j <= i`` (0: no window)."""
    return summary.attention_windows[layer] if summary.attention_windows else 0


def layer_rotary(cw: CanonicalWeights, layer: int) -> Rotary | None:
    """The RoPE of layer ``layer``: its own (Gemma 3's local layers) or the model's."""
    own = cw.layers[layer].rotary
    return own if own is not None else cw.rotary


def softcap(x: Tensor, cap: float | None) -> Tensor:
    """Soft-capping ``cap * tanh(x / cap)`` (Gemma 2's attention scores, Gemma 2/3's logits):
    monotone, so every ranking is unchanged; ``x`` itself where ``cap`` is None."""
    return x if cap is None else cap * torch.tanh(x / cap)


def window_keys(n: int, window: int, device: torch.device | str | None = None) -> Tensor:
    """``[n, n]`` bool: key ``j`` lies in query ``i``'s window, ``i - window < j <= i`` (every
    family with sliding windows is a decoder: the window is causal)."""
    rows = torch.arange(n, device=device)
    offset = rows[:, None] - rows[None, :]  # i - j
    return (offset >= 0) & (offset < window)


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi's per-head slopes ``[n_heads]`` float32 (Press et al. 2022): for ``n`` a power of two,
    the geometric sequence ``b^i``, ``b = 2^(-8 / n)``, ``i = 1..n``; otherwise those of the
    largest power of two ``n' < n`` followed by the odd powers ``1, 3, 5, ...`` of ``2^(-8 / 2n')``
    until there are ``n_heads``. Powers of a float32 base, as BLOOM's checkpoints were trained
    (a float64 power differs by up to 6e-8, i.e. 1e-4 in a score 2,000 tokens away)."""
    closest = 2 ** math.floor(math.log2(n_heads))

    def powers(n: int, exponents: range) -> Tensor:
        base = torch.tensor(2.0 ** (-8.0 / n), dtype=torch.float32)
        return base ** torch.tensor(list(exponents), dtype=torch.int32)

    slopes = powers(closest, range(1, closest + 1))
    if closest == n_heads:
        return slopes
    extra = powers(2 * closest, range(1, 2 * (n_heads - closest), 2))
    return torch.cat([slopes, extra])


def learned_positions(table: Tensor, offset: int) -> Tensor:
    """Canonical ``W_pos [n_ctx, d]`` (row t = position t) from a position table whose row
    ``offset + t`` holds position t (RoBERTa: ``padding_idx + 1``; OPT: 2)."""
    return table[offset:]


def split_heads_in(weight: Tensor, n_heads: int) -> Tensor:
    """An nn.Linear weight ``[n_heads * dh, d]`` -> ``[n_heads, d, dh]`` (a view of a contiguous
    ``weight``)."""
    out_features, d = weight.shape
    return weight.reshape(n_heads, out_features // n_heads, d).transpose(1, 2)


def split_heads_out(weight: Tensor, n_heads: int) -> Tensor:
    """An nn.Linear output-projection weight ``[d, n_heads * dh]`` -> ``[n_heads, dh, d]`` (a view
    of a contiguous ``weight``: splitting the transposed first axis needs no copy)."""
    d, in_features = weight.shape
    return weight.T.reshape(n_heads, in_features // n_heads, d)


def expand_kv(tensor: Tensor, n_heads: int) -> Tensor:
    """Repeat KV heads ``[n_kv, ...]`` to ``[n_heads, ...]`` (query head h reads h // group):
    ``tensor`` itself without grouping, else a copy (the repeated heads cannot be a strided view of
    one tensor), made for one block when that block is read (:class:`LayerSequence`)."""
    n_kv = tensor.shape[0]
    return tensor if n_kv == n_heads else tensor.repeat_interleave(n_heads // n_kv, dim=0)


def zeros_bias(n_heads: int, d_head: int, like: Tensor) -> Tensor:
    return torch.zeros(n_heads, d_head, dtype=like.dtype, device=like.device)
