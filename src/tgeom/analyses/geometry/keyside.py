"""The exact key-side variance split of each head's QK logits (SPEC section 4, "Attention").

Softmax ignores a constant added to a query's row of logits, so what a head does is how its
logit varies over the keys ``s`` a query ``(c, t)`` sees (causal prefix, sliding window, or every
key of an encoder; only real keys). Block ``b`` reads hidden state ``b``; each key's input is
split with the collection's statistics (:class:`GeometryStats`) of that hidden state:

    h[c, s] = mu + pos_s + ctx_c + resid[c, s]

(``ctx_c`` is the window's own mean over the measured positions minus ``mu``, exactly the
statistics' ``ctx_c`` for a collected window; ``resid`` is what is left). The attention input's
norm is made linear *per token*: LayerNorm centres each part and divides it by the key's own
``sigma_s`` (``sqrt(var(h_s) + eps)``), RMSNorm divides by the key's own ``rms_s``, both times the
gain; post-LN blocks (BERT) and OLMo 2 read ``h`` itself. Then ``k = x W_K + b_K``, QK-norm
multiplies every part by the key's own factor ``gain / rms(k_s)`` (per head or over all heads),
and RoPE rotates every part at ``s`` (linear). The query is the model's real query
(``norm(h_t) W_Q + b_Q``, q-norm, RoPE at ``t``), so the logit row is the exact sum

    logit[t, s] = positional + content + scale (+ alibi)

with ``positional`` from ``pos_s``, ``content`` from ``resid[c, s]``, ``scale`` from
``mu + ctx_c`` *and the constants* (the norm's bias and ``b_K``): these are the same vector for
every key of a window, so their part varies over ``s`` only through the key's own norm scales
(and, with RoPE, through the rotation at ``s``). ALiBi (BLOOM) adds ``slope[h] * (s - t)`` as a
part of its own. Per query, after centring each part over the visible keys:
``share_p = Var_s(part p) / Var_s(logit)`` and ``cross = 1 - sum_p share_p`` (twice the
covariances between parts, over the logit variance: it can be negative). Shares are averaged
over queries weighted by their number of visible keys. Queries with fewer than two visible keys
(no variance) and rows whose logit is constant over the keys (``Var_s <= (1e-12 rms)^2``, e.g. a
head with ``W_K = 0``) are skipped and counted. The split is of the uncapped logits (Gemma 2's
soft-cap is monotone).

The keys are the positions the statistics measure (position 0, the attention sink, is dropped
unless they were collected with ``keep_first``); queries are every real position with two or more
such visible keys. :class:`KeySideSplit` is an accumulator fed one block's input hidden state at
a time by whoever runs the forward pass; its float64 sums are one tensor, summed over ranks
under ``torchrun``. :func:`key_side_split` reads a corpus (or an evenly spaced sample of it) a
second time after the collection to feed it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tgeom.analyses.geometry.stats import GeometryStats
from tgeom.errors import TgeomError, check_index
from tgeom.models.reference import alibi_positions
from tgeom.models.weights import CanonicalWeights, Norm, attention_window, layer_rotary

PARTS = ("positional", "content", "scale")
ALIBI = "alibi"
CROSS = "cross"
# Columns of the per-(block, head) sums: the weight (visible keys of the used queries), the
# queries used, the real queries skipped with fewer than 2 visible keys, those skipped with a
# constant logit row, the weighted logit variance, then one weighted share per SHARE_FIELDS.
FIELDS = ("weight", "queries", "skipped_under_two_keys", "skipped_constant", "logit_var")
SHARE_FIELDS = (*PARTS, ALIBI)
FLAT = 1e-12  # a row whose logit std is below FLAT times its RMS is constant over the keys
CHUNK = 1 << 22  # batch elements per chunk: B' H T S <= CHUNK (float64 [B', H, T, S] parts)


def attention_input_norm(cw: CanonicalWeights, block: int) -> Norm | None:
    """The norm between hidden state ``block`` and block ``block``'s attention (None: the
    block reads the hidden state itself, post-LN BERT and OLMo 2's post-sublayer norms)."""
    if cw.summary.norm_placement in ("post", "post_sublayer"):
        return None
    return cw.layers[block].ln_attn


def _inverse_scale(norm: Norm, h: Tensor) -> Tensor:
    """The per-token factor ``1 / sigma`` (LayerNorm) or ``1 / rms`` (RMSNorm) of ``h [..., d]``
    (float64): ``[..., 1]``."""
    if norm.kind == "layernorm":
        return torch.rsqrt(h.var(-1, unbiased=False, keepdim=True) + norm.eps)
    return torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)


def _linear(norm: Norm | None, part: Tensor, inverse: Tensor | None) -> Tensor:
    """The norm made linear at the token: ``gain * center(part) * inverse`` (no bias)."""
    if norm is None or inverse is None:
        return part
    centred = part - part.mean(-1, keepdim=True) if norm.kind == "layernorm" else part
    return norm.weight.to(part) * centred * inverse


def key_side_parts(
    cw: CanonicalWeights,
    block: int,
    hidden: Tensor,
    mu: Tensor,
    pos: Tensor,
    attention_mask: Tensor | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """The key-side parts of block ``block``'s logits (module docstring) for a batch.

    ``hidden [B, T, d]``: the block's input hidden state; ``mu [d]`` and ``pos [T', d]`` the
    statistics' mean and positional means of that hidden state, for the measured positions
    ``T - T'..T-1``; ``attention_mask [B, T]`` (1: real token). Returns the parts (names
    :data:`PARTS`, then ``alibi`` for ALiBi models), each ``[B, H, T, T']`` float64 (query t,
    key ``T - T' + s``; their sum is the real logit), and the visible pairs ``[B, T, T']`` bool.
    """
    lw = cw.layers[block]
    h = hidden.double()
    B, T, _ = h.shape
    first = T - pos.shape[0]
    if first not in (0, 1):
        raise TgeomError(
            f"the hidden state has {T} positions but the statistics measure {pos.shape[0]}; "
            "feed windows of the length that collected them."
        )
    device = h.device
    mu, pos = mu.to(device, torch.float64), pos.to(device, torch.float64)
    real = (
        torch.ones(B, T, dtype=torch.bool, device=device)
        if attention_mask is None
        else attention_mask.to(device).bool()
    )
    norm = attention_input_norm(cw, block)
    W_Q, W_K = lw.W_Q.to(device, torch.float64), lw.W_K.to(device, torch.float64)
    b_Q, b_K = lw.b_Q.to(device, torch.float64), lw.b_K.to(device, torch.float64)
    positions = torch.arange(T, device=device)
    rotary = layer_rotary(cw, block)

    # The real query of every position.
    x = h if norm is None else _norm64(norm, h)
    q = torch.einsum("btd,hde->bhte", x, W_Q) + b_Q[None, :, None, :]
    if lw.q_norm is not None:
        q = lw.q_norm.weight.to(q)[:, None, :] * q * lw.q_norm.inverse_scale(q)
    if rotary is not None:
        q = rotary.apply(q, positions)

    # The keys' inputs split over the measured positions.
    hk, keep = h[:, first:], real[:, first:]
    n_real = keep.sum(1, keepdim=True).clamp(min=1).to(h)
    ctx = (hk * keep[..., None]).sum(1) / n_real - mu  # [B, d]: the window's own ctx_c
    resid = hk - mu - pos[None] - ctx[:, None]
    # mu + ctx_c and pos_s are shared by many keys: project each once, then apply the key's
    # own norm factor (a number per key); only the residual is projected key by key.
    inverse = (
        torch.ones(B, T - first, 1, dtype=torch.float64, device=device)
        if norm is None
        else _inverse_scale(norm, hk)
    )[:, None]  # [B, 1, T', 1]
    beta = torch.zeros_like(mu) if norm is None or norm.bias is None else norm.bias.to(h)
    const = torch.einsum("d,hde->he", beta, W_K) + b_K  # [H, dh]: the norm's bias and b_K
    ones = torch.ones((), dtype=torch.float64, device=device)
    pos_k = torch.einsum("sd,hde->hse", _linear(norm, pos, ones), W_K)
    mean_k = torch.einsum("bd,hde->bhe", _linear(norm, mu + ctx, ones), W_K)
    keys = {
        "positional": pos_k[None] * inverse,
        "content": torch.einsum("bsd,hde->bhse", _linear(norm, resid, inverse[:, 0]), W_K),
        "scale": mean_k[:, :, None] * inverse + const[None, :, None],
    }
    if lw.k_norm is not None:  # the key's own QK-norm factor, from its real k
        real_k = torch.einsum("bsd,hde->bhse", x[:, first:], W_K) + b_K[None, :, None, :]
        factor = lw.k_norm.weight.to(h)[:, None, :] * lw.k_norm.inverse_scale(real_k)
        keys = {name: factor * k for name, k in keys.items()}
    if rotary is not None:
        keys = {name: rotary.apply(k, positions[first:]) for name, k in keys.items()}
    parts = {
        name: cw.attn_scale * torch.einsum("bhte,bhse->bhts", q, k) for name, k in keys.items()
    }
    if cw.alibi_slopes is not None:
        p = alibi_positions(attention_mask, B, T, device).double()
        distance = p[:, None, first:] - p[:, :, None]  # [B, T(query), T'(key)]: s - t
        slopes = cw.alibi_slopes.to(device, torch.float64)
        parts[ALIBI] = slopes[None, :, None, None] * distance[:, None]
    return parts, _visible(cw, block, real, first)


def _norm64(norm: Norm, h: Tensor) -> Tensor:
    """``norm(h)`` in float64 (the model's norm, without its float32 round trip)."""
    out = _linear(norm, h, _inverse_scale(norm, h))
    return out + norm.bias.to(h) if norm.bias is not None else out


def _visible(cw: CanonicalWeights, block: int, real: Tensor, first: int) -> Tensor:
    """``[B, T, T']`` bool: query t (real) sees key ``first + s`` (real; causal, windowed)."""
    T = real.shape[1]
    t = torch.arange(T, device=real.device)[:, None]
    s = torch.arange(first, T, device=real.device)[None, :]
    allowed = torch.ones(T, T - first, dtype=torch.bool, device=real.device)
    if cw.summary.is_causal:
        allowed = s <= t
        window = attention_window(cw.summary, block)
        if window:
            allowed = allowed & (t - s < window)
    return allowed[None] & real[:, :, None] & real[:, None, first:]


def row_variances(
    parts: dict[str, Tensor], visible: Tensor
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """``Var_s`` over the visible keys of the logit row (the parts' sum) and of each part, and
    the row's mean square: ``[B, H, T]`` float64 each (0 where a query sees no key)."""
    mask = visible[:, None].to(torch.float64)  # [B, 1, T, T']
    n = mask.sum(-1).clamp(min=1)

    def var(x: Tensor) -> Tensor:
        mean = (x * mask).sum(-1) / n
        return ((x - mean[..., None]) ** 2 * mask).sum(-1) / n

    logit = torch.stack(list(parts.values())).sum(0)
    mean_sq = (logit**2 * mask).sum(-1) / n
    return var(logit), {name: var(x) for name, x in parts.items()}, mean_sq


class KeySideSplit:
    """Running float64 sums of the key-side split of the heads of ``blocks`` (module
    docstring). Feed :meth:`update` with each block's input hidden state; read :meth:`shares`.

    ``sums [n_blocks, H, len(FIELDS) + len(SHARE_FIELDS)]`` is the whole state (sum it over
    ranks under ``torchrun``); the ``alibi`` column stays 0 without ALiBi.
    """

    def __init__(self, cw: CanonicalWeights, stats: GeometryStats, blocks: list[int]) -> None:
        n_blocks = len(cw.layers)
        if stats.n_hidden != n_blocks + 1 or stats.d_model != cw.summary.d_model:
            raise TgeomError(
                "the statistics come from another model (hidden states or d_model differ); "
                "pass the model that collected them."
            )
        self.blocks = [check_index("block", b, n_blocks) for b in blocks]
        if len(set(self.blocks)) != len(self.blocks):
            raise TgeomError(f"blocks {self.blocks} repeat a block; name each once.")
        self.cw = cw
        self.stats = stats
        self.has_alibi = cw.alibi_slopes is not None
        self.n_heads = int(cw.summary.n_heads)
        width = len(FIELDS) + len(SHARE_FIELDS)
        self.sums = torch.zeros(len(self.blocks), self.n_heads, width, dtype=torch.float64)
        self._row = {b: i for i, b in enumerate(self.blocks)}
        self._means: dict[int, tuple[Tensor, Tensor]] = {}

    @property
    def parts(self) -> tuple[str, ...]:
        """The shares :meth:`shares` returns, in order."""
        return (*PARTS, *((ALIBI,) if self.has_alibi else ()), CROSS)

    def decomposition(self, block: int) -> tuple[Tensor, Tensor]:
        """``mu [d]`` and ``pos [T', d]`` of hidden state ``block`` (cached per block)."""
        if block not in self._means:
            dec = self.stats.decomposition(block)
            self._means[block] = (dec.mu, dec.pos)
        return self._means[block]

    @torch.no_grad()
    def update(self, block: int, hidden_in: Tensor, attention_mask: Tensor | None = None) -> None:
        """Add the queries of ``hidden_in [B, T, d]`` (block ``block``'s input hidden state, any
        device; ``attention_mask [B, T]``, 1 = real token) to the sums."""
        if block not in self._row:
            raise TgeomError(f"block {block} is not one of this split's blocks {self.blocks}.")
        mu, pos = self.decomposition(block)
        B, T = hidden_in.shape[:2]
        step = max(1, CHUNK // max(1, self.n_heads * T * T))
        for lo in range(0, B, step):
            mask = None if attention_mask is None else attention_mask[lo : lo + step]
            chunk = hidden_in[lo : lo + step]
            parts, visible = key_side_parts(self.cw, block, chunk, mu, pos, mask)
            real = torch.ones(chunk.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
            self._add(self._row[block], parts, visible, real)

    def _add(self, row: int, parts: dict[str, Tensor], visible: Tensor, real: Tensor) -> None:
        var_logit, var_parts, mean_sq = row_variances(parts, visible)
        n = visible.sum(-1)[:, None].expand_as(var_logit).double()  # [B, H, T] visible keys
        single = (n < 2) & real[:, None].to(n.device)
        flat = (n >= 2) & (var_logit <= (FLAT**2) * mean_sq)
        used = (n >= 2) & ~flat
        w = torch.where(used, n, torch.zeros_like(n))
        safe = torch.where(used, var_logit, torch.ones_like(var_logit))
        columns = [
            w.sum((0, 2)),
            used.sum((0, 2)).double(),
            single.sum((0, 2)).double(),
            flat.sum((0, 2)).double(),
            (w * var_logit).sum((0, 2)),
        ]
        for name in SHARE_FIELDS:
            share = var_parts[name] / safe if name in var_parts else torch.zeros_like(safe)
            columns.append((w * share).sum((0, 2)))
        self.sums[row] += torch.stack(columns, dim=-1).cpu()

    def counts(self) -> dict[int, dict[str, Tensor]]:
        """Per block, per field of :data:`FIELDS` (``weight``, ``queries``, ...): ``[H]``."""
        return {
            b: {name: self.sums[i, :, j].clone() for j, name in enumerate(FIELDS)}
            for i, b in enumerate(self.blocks)
        }

    def shares(self) -> dict[int, dict[str, Tensor]]:
        """Per block, per part of :attr:`parts`: the weighted mean share ``[H]`` float64 (NaN
        for a head with no usable query)."""
        out: dict[int, dict[str, Tensor]] = {}
        for i, b in enumerate(self.blocks):
            weight = self.sums[i, :, 0]
            denom = torch.where(weight > 0, weight, torch.full_like(weight, float("nan")))
            shares = {
                name: self.sums[i, :, len(FIELDS) + j] / denom
                for j, name in enumerate(SHARE_FIELDS)
                if name != ALIBI or self.has_alibi
            }
            total = sum(shares.values())
            assert isinstance(total, Tensor)
            shares[CROSS] = 1.0 - total
            out[b] = shares
        return out


@torch.no_grad()
def key_side_split(
    lm: Any,
    token_ids: Tensor,
    stats: GeometryStats,
    blocks: list[int] | None = None,
    runtime: Any = None,
    *,
    max_windows: int | None = None,
    attention_mask: Tensor | None = None,
    shard: Any = None,
) -> tuple[KeySideSplit, dict[str, Any]]:
    """Read ``token_ids [C, T]`` (the windows that collected ``stats``, or others of the same
    length) a second time and feed a :class:`KeySideSplit` of ``blocks`` (default: all).

    ``max_windows``: an evenly spaced sample of that many windows (default: every window).
    Under ``torchrun`` (``shard``, default from the environment) each rank reads a contiguous
    share and the sums are all-reduced. Returns the split and what was read (``second_pass``:
    ``windows``, ``of``, ``sample``), for the results."""
    from tgeom.capture import stream_hidden
    from tgeom.capture.distributed import shard_from_env
    from tgeom.runtime import Runtime

    n_total, T = int(token_ids.shape[0]), int(token_ids.shape[1])
    expected = stats.n_positions + (0 if stats.meta.get("options", {}).get("keep_first") else 1)
    if expected != T:
        raise TgeomError(
            f"the windows have {T} tokens but the statistics were collected on {expected}; "
            "pass the corpus and --seq-len that collected them."
        )
    if max_windows is not None and max_windows < 1:
        raise TgeomError(f"--max-windows must be at least 1 (got {max_windows}).")
    chosen = torch.arange(n_total)
    if max_windows is not None and max_windows < n_total:
        chosen = torch.linspace(0, n_total - 1, max_windows).round().long().unique()
    cw = lm.weights()
    split = KeySideSplit(cw, stats, list(range(len(cw.layers))) if blocks is None else blocks)
    shard = shard if shard is not None else shard_from_env()
    mine = chosen[shard.indices(len(chosen))]
    runtime = runtime or Runtime.auto()
    wanted = set(split.blocks)
    for start in range(0, len(mine), runtime.batch_size):
        rows = mine[start : start + runtime.batch_size]
        mask = None if attention_mask is None else attention_mask[rows]

        def fold(index: int, hidden: Tensor, mask: Tensor | None = mask) -> None:
            if index in wanted:
                split.update(index, hidden, mask)

        stream_hidden(lm, token_ids[rows], fold, mask)
    shard.all_reduce_sum({"key_side_sums": split.sums})
    sample = "every window" if len(chosen) == n_total else "evenly spaced sample"
    info = {
        "pass": "second pass over the corpus after the collection",
        "windows": len(chosen),
        "of": n_total,
        "sample": sample,
    }
    return split, info
