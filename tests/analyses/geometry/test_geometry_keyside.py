"""The exact key-side variance split of each head's QK logits (SPEC section 4, "Attention")."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tgeom.analyses.geometry import GeometryStats, collect_statistics
from tgeom.analyses.geometry.keyside import (
    KeySideSplit,
    attention_input_norm,
    key_side_parts,
    key_side_split,
)
from tgeom.capture import capture
from tgeom.corpus import Windows, load_corpus, make_windows
from tgeom.models import load_model
from tgeom.models.weights import attention_window, layer_rotary
from tgeom.runtime import Runtime
from tiny_models import save_tiny_model, windowed_mistral

CPU = Runtime(torch.device("cpu"), batch_size=4)


def windows_of(ids: torch.Tensor) -> Windows:
    n = ids.shape[0]
    topic_ids = torch.arange(n) % 2
    return Windows(ids, topic_ids, ["a", "b"], [f"d{i}" for i in range(n)], ids.shape[1], 0)


def random_ids(n: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 90, (n, T), generator=torch.Generator().manual_seed(seed))


def token_scale(norm: Any, h: torch.Tensor) -> float:
    """The norm's own divisor for one token ``h [d]``: ``sqrt(var(h) + eps)`` (LayerNorm) or
    ``sqrt(mean(h^2) + eps)`` (RMSNorm), summed by hand."""
    values = [float(v) for v in h]
    d = len(values)
    if norm.kind == "layernorm":
        mean = sum(values) / d
        return math.sqrt(sum((v - mean) ** 2 for v in values) / d + norm.eps)
    return math.sqrt(sum(v * v for v in values) / d + norm.eps)


def linear_at(norm: Any, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``gain * center(v) / scale`` (no bias): the norm made linear at a token of divisor
    ``scale``; ``v`` itself without a norm."""
    if norm is None:
        return v
    centred = v - v.mean() if norm.kind == "layernorm" else v
    return norm.weight.double() * centred / scale


def norm_by_hand(norm: Any, h: torch.Tensor) -> torch.Tensor:
    """``norm(h)`` of one token ``h [d]`` in float64 (None: ``h`` itself)."""
    if norm is None:
        return h
    out = linear_at(norm, h, token_scale(norm, h))
    return out + norm.bias.double() if norm.bias is not None else out


def qk_norm_factor(norm: Any, k: torch.Tensor, head: int) -> torch.Tensor:
    """The QK-norm factor ``gain / rms`` of head ``head`` for one token's ``k [H, dh]``."""
    if norm is None:
        return torch.ones(k.shape[1], dtype=torch.float64)
    chosen = k[head] if norm.scope == "head" else k
    rms = math.sqrt(float((chosen**2).mean()) + norm.eps)
    return norm.weight[head].double() / rms


def brute_force_shares(
    cw: Any, block: int, hidden: torch.Tensor, stats: GeometryStats
) -> dict[str, list[float]]:
    """The split the slow, obvious way: every query (c, t) in a loop, every key's parts from its
    own input vector in float64 (its own norm scale and QK-norm factor), the variances over the
    visible keys summed by hand, the shares averaged with weight = number of visible keys."""
    lw = cw.layers[block]
    dec = stats.decomposition(block)
    mu, pos = dec.mu, dec.pos
    C, T, d = hidden.shape
    first = T - pos.shape[0]
    H = lw.W_Q.shape[0]
    norm = attention_input_norm(cw, block)
    rotary = layer_rotary(cw, block)
    window = attention_window(cw.summary, block)
    W_Q, W_K = lw.W_Q.double(), lw.W_K.double()
    b_Q, b_K = lw.b_Q.double(), lw.b_K.double()
    names = ["positional", "content", "scale"] + (["alibi"] if cw.alibi_slopes is not None else [])
    totals = {name: [0.0] * H for name in names}
    weights = [0.0] * H
    for c in range(C):
        h = hidden[c].double()
        ctx = h[first:].mean(0) - mu
        # per key: its parts' key vectors [H, dh]
        key_parts = {}
        for s in range(first, T):
            x_real = norm_by_hand(norm, h[s])
            k_real = torch.einsum("d,hde->he", x_real, W_K) + b_K
            scale = 1.0 if norm is None else token_scale(norm, h[s])
            has_bias = norm is not None and norm.bias is not None
            beta = norm.bias.double() if has_bias else torch.zeros(d, dtype=torch.float64)
            ins = {
                "positional": linear_at(norm, pos[s - first], scale),
                "content": linear_at(norm, h[s] - mu - pos[s - first] - ctx, scale),
                "scale": linear_at(norm, mu + ctx, scale) + beta,
            }
            ks = {n: torch.einsum("d,hde->he", v, W_K) for n, v in ins.items()}
            ks["scale"] = ks["scale"] + b_K
            for head in range(H):
                f = qk_norm_factor(lw.k_norm, k_real, head)
                for n in ks:
                    vec = ks[n][head] * f
                    if rotary is not None:
                        vec = rotary.apply(vec[None], torch.tensor([s]))[0]
                    key_parts[(s, head, n)] = vec
        for t in range(T):
            x = norm_by_hand(norm, h[t])
            q_all = torch.einsum("d,hde->he", x, W_Q) + b_Q
            visible = [
                s
                for s in range(first, T)
                if not cw.summary.is_causal or (s <= t and (not window or t - s < window))
            ]
            if len(visible) < 2:
                continue
            for head in range(H):
                q = q_all[head] * qk_norm_factor(lw.q_norm, q_all, head)
                if rotary is not None:
                    q = rotary.apply(q[None], torch.tensor([t]))[0]
                rows = {n: [] for n in names}
                for s in visible:
                    for n in ("positional", "content", "scale"):
                        rows[n].append(cw.attn_scale * float(q @ key_parts[(s, head, n)]))
                    if "alibi" in rows:
                        rows["alibi"].append(float(cw.alibi_slopes[head]) * (s - t))
                logit = [sum(rows[n][i] for n in names) for i in range(len(visible))]

                def var(values: list[float]) -> float:
                    m = sum(values) / len(values)
                    return sum((v - m) ** 2 for v in values) / len(values)

                weights[head] += len(visible)
                for n in names:
                    totals[n][head] += len(visible) * var(rows[n]) / var(logit)
    shares = {n: [totals[n][h] / weights[h] for h in range(H)] for n in names}
    shares["cross"] = [1 - sum(shares[n][h] for n in names) for h in range(H)]
    return shares


def logits_by_hand(cw: Any, block: int, hidden: torch.Tensor) -> torch.Tensor:
    """The block's full logits ``[B, H, T, T]`` float64 from its input ``hidden [B, T, d]``:
    each token normalised on its own, q and k, QK-norm, RoPE, ALiBi's ``slope (s - t)``."""
    lw = cw.layers[block]
    norm = attention_input_norm(cw, block)
    B, T, _ = hidden.shape
    x = torch.stack(
        [
            torch.stack([norm_by_hand(norm, hidden[b, t].double()) for t in range(T)])
            for b in range(B)
        ]
    )
    q = torch.einsum("btd,hde->bthe", x, lw.W_Q.double()) + lw.b_Q.double()
    k = torch.einsum("btd,hde->bthe", x, lw.W_K.double()) + lw.b_K.double()
    H = q.shape[2]
    for b in range(B):
        for t in range(T):
            q_f = [qk_norm_factor(lw.q_norm, q[b, t].clone(), h) for h in range(H)]
            k_f = [qk_norm_factor(lw.k_norm, k[b, t].clone(), h) for h in range(H)]
            q[b, t] = q[b, t] * torch.stack(q_f)
            k[b, t] = k[b, t] * torch.stack(k_f)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, dh]
    rotary = layer_rotary(cw, block)
    if rotary is not None:
        q, k = rotary.apply(q, torch.arange(T)), rotary.apply(k, torch.arange(T))
    logits = cw.attn_scale * torch.einsum("bhte,bhse->bhts", q, k)
    if cw.alibi_slopes is not None:
        distance = (torch.arange(T)[None, :] - torch.arange(T)[:, None]).double()
        logits = logits + cw.alibi_slopes.double()[:, None, None] * distance
    return logits


def tiny(family: str, tmp_path: Path) -> Any:
    if family == "mistral":  # both layers windowed over 4 keys
        folder = save_tiny_model("mistral", tmp_path / "m", spec=windowed_mistral(4, 8))
    else:
        folder = save_tiny_model(family, tmp_path / family)
    return load_model(str(folder), device="cpu")


TINY = ["gpt2", "llama", "bert", "qwen3", "olmo2", "bloom", "mistral", "gemma2", "phi"]


@pytest.mark.parametrize("family", TINY)
def test_parts_sum_to_the_real_logits_and_equal_the_brute_force(family: str, tmp_path: Path):
    """On real forward passes of tiny models (QK-norm: qwen3, olmo2; ALiBi: bloom; sliding
    windows: mistral; soft-cap: gemma2; partial rotary: phi; post-LN: bert): the parts sum to the
    logits computed token by token (1e-10 relative), whose softmax is the model's own attention
    (1e-5); the accumulator's shares equal the brute-force loop over queries (1e-9)."""
    lm = tiny(family, tmp_path)
    cw = lm.weights()
    ids = random_ids(3, 10, seed=1)
    stats = collect_statistics(lm, windows_of(ids), CPU, progress=False)
    captured = capture(lm, ids, attentions=True)
    first = 1  # position 0 dropped by default
    split = KeySideSplit(cw, stats, list(range(len(cw.layers))))
    for block in range(len(cw.layers)):
        hidden = captured.hidden[block]
        dec = stats.decomposition(block)
        parts, visible = key_side_parts(cw, block, hidden, dec.mu, dec.pos)
        total = torch.stack(list(parts.values())).sum(0)
        full = logits_by_hand(cw, block, hidden)
        mine = total[visible[:, None].expand_as(total)]
        want = full[..., first:][visible[:, None].expand_as(total)]
        assert float((mine - want).abs().max()) <= 1e-10 * float(want.abs().max())
        if cw.summary.attn_logit_softcap is None:  # capped scores: the split is of the uncapped
            probs = captured.attentions[block].double()
            allowed = probs > 0
            masked = full.masked_fill(~allowed, float("-inf"))
            assert torch.allclose(torch.softmax(masked, -1), probs, atol=1e-5)
        split.update(block, hidden)
        brute = brute_force_shares(cw, block, hidden, stats)
        shares = split.shares()[block]
        assert list(shares) == list(brute)
        for name, values in brute.items():
            assert torch.allclose(
                shares[name], torch.tensor(values, dtype=torch.float64), atol=1e-9
            )
    if family == "mistral":  # the windows cut pairs on these positions
        assert all(attention_window(cw.summary, b) == 4 for b in range(len(cw.layers)))


def test_convenience_reads_the_corpus_a_second_time_and_says_which(tmp_path: Path):
    """key_side_split over the windows equals feeding the accumulator by hand; a sample of
    windows is evenly spaced and named; windows of another length are refused."""
    lm = tiny("llama", tmp_path)
    ids = random_ids(6, 10, seed=2)
    stats = collect_statistics(lm, windows_of(ids), CPU, progress=False)
    split, info = key_side_split(lm, ids, stats, [1], CPU)
    assert info["windows"] == info["of"] == 6 and info["sample"] == "every window"
    by_hand = KeySideSplit(lm.weights(), stats, [1])
    by_hand.update(1, capture(lm, ids).hidden[1])
    assert torch.allclose(split.sums, by_hand.sums, rtol=1e-12, atol=0)
    sample, info = key_side_split(lm, ids, stats, [1], CPU, max_windows=3)
    assert info["windows"] == 3 and info["sample"] == "evenly spaced sample"
    picked = KeySideSplit(lm.weights(), stats, [1])
    picked.update(1, capture(lm, ids[[0, 2, 5]]).hidden[1])  # linspace(0, 5, 3) rounded
    assert torch.allclose(sample.sums, picked.sums, rtol=1e-12, atol=0)
    counts = split.counts()[1]
    # 6 windows x 10 queries: t = 0 and 1 see fewer than 2 of the measured keys 1..9
    assert counts["skipped_under_two_keys"].tolist() == [12.0] * 4
    assert counts["queries"].tolist() == [48.0] * 4
    from tgeom.errors import TgeomError

    with pytest.raises(TgeomError, match="collected on 10"):
        key_side_split(lm, random_ids(2, 12), stats, [1], CPU)


def planted_gpt2(tmp_path: Path, reads: str) -> Any:
    """A tiny GPT-2 whose token embeddings live in one subspace A and position embeddings in an
    orthogonal subspace B (both orthogonal to the all-ones vector, each of one norm, so block
    0's LayerNorm divides every token by the same sigma), with block 0's W_K reading only
    ``reads`` ("positions": B, "tokens": A)."""
    lm = load_model(str(save_tiny_model("gpt2", tmp_path / f"planted-{reads}")), device="cpu")
    g = torch.Generator().manual_seed(3)
    d = lm.summary.d_model
    basis = torch.linalg.qr(torch.cat([torch.ones(d, 1), torch.randn(d, d - 1, generator=g)], 1))[0]
    A, B = basis[:, 1 : d // 2], basis[:, d // 2 :]

    def rows(n: int, sub: torch.Tensor, radius: float) -> torch.Tensor:
        coords = torch.randn(n, sub.shape[1], generator=g)
        return radius * (coords / coords.norm(dim=1, keepdim=True)) @ sub.T

    hf = lm.hf.transformer
    with torch.no_grad():
        hf.wte.weight.copy_(rows(hf.wte.weight.shape[0], A, 3.0))
        hf.wpe.weight.copy_(rows(hf.wpe.weight.shape[0], B, 2.0))
        ln = hf.h[0].ln_1
        ln.weight.fill_(1.0)
        ln.bias.zero_()
        sub = B if reads == "positions" else A
        W_K = sub @ sub.T @ torch.randn(d, d, generator=g)  # [in, out]: reads only sub
        hf.h[0].attn.c_attn.weight[:, d : 2 * d].copy_(W_K)
    return lm


def test_a_head_reading_only_key_positions_is_positional(tmp_path: Path):
    """Block 0's keys depend on the key's position alone: positional = 1, every other part 0."""
    lm = planted_gpt2(tmp_path, "positions")
    ids = random_ids(12, 16, seed=4)
    stats = collect_statistics(lm, windows_of(ids), CPU, progress=False)
    split, _ = key_side_split(lm, ids, stats, [0], CPU)
    shares = split.shares()[0]
    assert torch.allclose(shares["positional"], torch.ones(4, dtype=torch.float64), atol=1e-6)
    for name in ("content", "scale", "cross"):
        assert float(shares[name].abs().max()) < 1e-6, name


def test_a_head_reading_only_key_tokens_is_content(tmp_path: Path):
    """Block 0's keys depend on the key's token alone, on windows that are a Latin square of
    n tokens over the n measured positions (each position and each window holds every token
    once), so the token part has no positional or context mean: content = 1."""
    lm = planted_gpt2(tmp_path, "tokens")
    n = 15  # measured positions 1..15 of 16-token windows
    tokens = torch.arange(10, 10 + n)
    ids = torch.stack(
        [torch.cat([torch.tensor([5]), tokens[(c + torch.arange(n)) % n]]) for c in range(n)]
    )
    stats = collect_statistics(lm, windows_of(ids), CPU, progress=False)
    split, _ = key_side_split(lm, ids, stats, [0], CPU)
    shares = split.shares()[0]
    assert torch.allclose(shares["content"], torch.ones(4, dtype=torch.float64), atol=1e-6)
    for name in ("positional", "scale", "cross"):
        assert float(shares[name].abs().max()) < 1e-6, name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_real_models_parts_sum_to_the_logits(name: str, request: pytest.FixtureRequest):
    """On real text the parts sum to the logits computed token by token (1e-10 relative) in a
    few blocks, and the shares differ between heads."""
    lm = request.getfixturevalue(name)
    windows = make_windows(load_corpus("builtin"), lm.tokenizer, 16, max_windows_per_topic=2)
    stats = collect_statistics(lm, windows, CPU, progress=False)
    cw = lm.weights()
    ids = windows.token_ids[:3]
    captured = capture(lm, ids)
    for block in (0, 2):
        hidden = captured.hidden[block]
        dec = stats.decomposition(block)
        parts, visible = key_side_parts(cw, block, hidden, dec.mu, dec.pos)
        total = torch.stack(list(parts.values())).sum(0)
        full = logits_by_hand(cw, block, hidden)[..., 1:]
        on = visible[:, None].expand_as(total)
        assert float((total[on] - full[on]).abs().max()) <= 1e-10 * float(full[on].abs().max())


def test_sums_add_over_windows_as_ranks_all_reduce_them(tmp_path: Path):
    """The state is sums: two accumulators fed disjoint windows add up to one fed them all
    (what the all-reduce under torchrun relies on), to 1e-12."""
    lm = tiny("qwen3", tmp_path)
    ids = random_ids(5, 10, seed=6)
    stats = collect_statistics(lm, windows_of(ids), CPU, progress=False)
    hidden = capture(lm, ids).hidden
    whole, first, second = (KeySideSplit(lm.weights(), stats, [0, 1]) for _ in range(3))
    for block in (0, 1):
        whole.update(block, hidden[block])
        first.update(block, hidden[block][:2])
        second.update(block, hidden[block][2:])
    assert torch.allclose(first.sums + second.sums, whole.sums, rtol=1e-12, atol=1e-12)


def test_results_warn_where_parts_cancel(tmp_path: Path):
    """A head whose positional and content parts cancel (cross < -1) is named in the result's
    warnings; a split whose heads partition the variance has none."""
    from tgeom.analyses.geometry.qk import qk_split

    lm = planted_gpt2(tmp_path, "positions")
    ids = random_ids(12, 16, seed=4)
    stats = collect_statistics(lm, windows_of(ids), CPU, progress=False)
    result = qk_split(lm, stats, ids, [0], CPU)
    assert result.warnings == []
    entry = result.by_block[0]
    entry["heads"][1] = {**entry["heads"][1], "positional": 3.0, "content": 2.0, "cross": -4.0}
    (line,) = result.warnings
    assert line.startswith("block 0: heads [1] have cross < -1")
