"""Identifiability benchmarks [BRU], each against a baseline measured in the same run.

1. Hidden token attribution of one sequence on MiniLM: exact mode (forward-mode JVPs, all layers
   and output tokens from the same passes) vs the naive reverse-mode loop (one vectorised
   backward per output token per layer, full Jacobian blocks; on CPU only ``--naive-tokens``
   output tokens are run and the time is extrapolated, said so in the output); estimate mode at
   16 and 64 samples: time and mean relative error of the norms against exact.
2. Effective attention of a batch vs the plain forward pass with attentions (target <= 1.5x).

Usage: python bench/bench_identify.py [--tokens 128] [--batch 16] [--naive-tokens N]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tgeom.analyses.identifiability.attribution import squared_norms_estimate, squared_norms_exact
from tgeom.analyses.identifiability.effective import effective_attention_batch
from tgeom.corpus import load_corpus, make_windows
from tgeom.models import load_model
from tgeom.models.reference import embed, run_blocks
from tgeom.runtime import Runtime


def timed(fn, device):  # type: ignore[no-untyped-def]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return value, time.perf_counter() - start


def naive_reverse(cw, x0, tokens):  # type: ignore[no-untyped-def]
    """||J^l_ij||_F^2 rows for output tokens ``tokens``: one vectorised backward (full d x T x d
    Jacobian block) per (layer, output token)."""
    L1, T = len(cw.layers) + 1, x0.shape[1]
    G = torch.zeros(L1, T, T, dtype=torch.float64)
    for layer in range(1, L1):
        for i in tokens:
            f = lambda x, layer=layer, i=i: run_blocks(cw, x, stop=layer)[-1][0, i]  # noqa: E731
            J = torch.autograd.functional.jacobian(f, x0, vectorize=True)  # [d, 1, T, d]
            G[layer, i] = (J[:, 0].double() ** 2).sum(dim=(0, 2)).cpu()
    G[0] = torch.eye(T)
    return G


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--naive-tokens", type=int, default=None)
    args = parser.parse_args()
    device = Runtime.auto().device
    lm = load_model("minilm", device=str(device))
    cw = lm.weights()
    windows = make_windows(
        load_corpus("builtin"), lm.tokenizer, args.tokens, max_windows_per_topic=4
    )
    ids = windows.token_ids[:1].to(device)
    T = ids.shape[1]
    with torch.no_grad():
        x0 = embed(cw, ids).detach()
    squared_norms_exact(cw, x0[:, :8])  # warm-up (kernels, allocator)
    exact, t_exact = timed(lambda: squared_norms_exact(cw, x0), device)
    n_naive = args.naive_tokens or (T if device.type == "cuda" else 4)
    rows = list(range(0, T, max(1, T // n_naive)))[:n_naive]
    naive, t_naive = timed(lambda: naive_reverse(cw, x0, rows), device)
    t_naive_full = t_naive * T / len(rows)
    sel = exact[1:, rows]
    report = {
        "device": str(device),
        "model": lm.source,
        "tokens": T,
        "exact_s": t_exact,
        "naive_reverse_output_tokens_run": len(rows),
        "naive_reverse_s_measured": t_naive,
        "naive_reverse_s_full_sequence": t_naive_full,
        "naive_is_extrapolated": len(rows) < T,
        "naive_over_exact": t_naive_full / t_exact,
        "exact_vs_naive_max_rel_diff": float(
            ((sel - naive[1:, rows]).abs() / naive[1:, rows].clamp_min(1e-12)).max()
        ),
    }
    for samples in (16, 64):
        (estimate, _), t = timed(
            lambda s=samples: squared_norms_estimate(cw, x0, s, seed=0), device
        )
        rel = ((estimate[1:].sqrt() - exact[1:].sqrt()).abs() / exact[1:].sqrt()).mean()
        report[f"estimate_{samples}_s"] = t
        report[f"estimate_{samples}_mean_rel_error_of_norms"] = float(rel)
    batch = windows.token_ids[: args.batch].to(device)
    with torch.no_grad():
        lm.hf(input_ids=batch, output_attentions=True)  # warm-up
        effective_attention_batch(lm, batch[:2])
        _, t_plain = timed(lambda: lm.hf(input_ids=batch, output_attentions=True), device)
    _, t_eff = timed(lambda: effective_attention_batch(lm, batch), device)
    report.update(
        batch=int(batch.shape[0]),
        plain_forward_with_attentions_s=t_plain,
        effective_attention_s=t_eff,
        effective_over_plain=t_eff / t_plain,
    )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
