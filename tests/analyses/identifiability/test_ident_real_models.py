"""[BRU] on the real models (MiniLM encoder, SmolLM2 decoder) with built-in corpus windows:
prints per-layer numbers (run with ``-s``) and checks the properties that must hold."""

from __future__ import annotations

import pytest
import torch

from tgeom.analyses.identifiability import (
    effective_attention,
    null_space_dims,
    token_attribution,
    token_identifiability,
)
from tgeom.analyses.identifiability.sequences import varied_length_batch
from tgeom.corpus import load_corpus, make_windows


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_identifiability_on_real_model(request, name):
    lm = request.getfixturevalue(name)
    docs = load_corpus("builtin")
    windows = make_windows(docs, lm.tokenizer, 96, max_windows_per_topic=2, max_context=512)
    # Lengths 8..96 (beyond SmolLM2's d_head of 64), with [CLS]/[SEP] or BOS around each.
    ids, mask = varied_length_batch(lm, windows.token_ids[:8])
    lengths = mask.sum(1).tolist()
    dh = lm.summary.d_head
    print(f"\n== {name}: d_head {dh}, lengths {lengths[: len(ids)]}")

    nulls = null_space_dims(lm, ids, mask)
    expected = (torch.tensor(nulls.lengths) - dh).clamp_min(0)
    generic = (nulls.null_dim == expected[:, None, None]).double().mean()
    print(f"null dim == max(0, d_s - d_head) for {float(generic):.3f} of (sequence, head)")
    for row in nulls.by_length():
        means = [round(float(m), 1) for m in torch.tensor(row["mean_null_dim"]).mean(1)]
        print(f"  d_s {row['length']:3d}: mean null dim per layer {means}")
    assert generic > 0.9

    eff = effective_attention(lm, ids, mask)
    for row in eff.pearson.by_length():
        print(
            f"  d_s {row['length']:3d}: Pearson(raw, eff) per layer "
            f"{[round(v, 3) for v in row['by_block']]}"
        )
    special = 0 if lm.summary.is_causal else 1  # BOS for decoders (none here: col 0), SEP enc.
    types = eff.token_type_attention
    for layer in range(lm.summary.n_layers):
        r = types["raw_signed"][layer].mean(0)
        e = types["effective_signed"][layer].mean(0)
        print(
            f"  layer {layer:2d} mean attention (signed, heads averaged) raw/eff: "
            + ", ".join(
                f"{k} {float(r[i]):.3f}/{float(e[i]):.3f}"
                for i, k in enumerate(("cls/bos", "sep/eos", "punct", "other"))
            )
        )
    assert torch.allclose(types["raw_signed"].sum(-1), torch.ones(1, dtype=torch.float64))
    del special

    # 48 windows of 24 tokens: 33 x 24 = 792 training tokens, more than d + 1 coefficients, so
    # the least-squares g is determined (fewer tokens give a minimum-norm fit that generalises
    # badly); a few layers spread over depth keep the MLP fits short.
    short = make_windows(docs, lm.tokenizer, 24, max_windows_per_topic=6, max_context=512)
    L = lm.summary.n_layers
    layers = None if L <= 8 else [0, 1, L // 2, L]
    ident = token_identifiability(lm, short.token_ids[:48], seed=0, hidden=layers)
    assert not any("underdetermined" in w for w in ident.warnings)
    table: dict[tuple[str, str], list[float]] = {}
    for row in ident.rows:
        table.setdefault((row["g"], row["distance"]), []).append(round(row["rate"], 3))
    for (g, kind), rates in table.items():
        print(f"  identifiability {g:8s} {kind:6s} by layer {rates}")
    assert ident.rate(0, "identity", "cosine") == 1.0

    # Exact mode costs T * d JVPs: fine for MiniLM on CPU, minutes for SmolLM2 (estimate there).
    mode = "exact" if name == "minilm" else "estimate"
    attribution = token_attribution(lm, windows.token_ids[0, :12], mode=mode, samples=8)
    print(
        f"  own contribution by layer {[round(float(v), 3) for v in attribution.own_contribution]}"
    )
    print(
        "  top contributor not own   "
        f"{[round(float(v), 3) for v in attribution.top_contributor_not_own]}"
    )
    c = attribution.contributions
    assert torch.allclose(c.sum(-1), torch.ones_like(c.sum(-1)))
