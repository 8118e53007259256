"""Identifiability benchmarks [BRU], each against a baseline measured in the same run.

1. Hidden token attribution of one ``--tokens``-token sequence on MiniLM:
   - exact mode: forward-mode JVPs along the d coordinates of each input token x_j (all layers
     and all output tokens from the same passes);
   - the naive reverse-mode loop: one vectorised backward (full d x T x d Jacobian block) per
     output token per layer;
   - estimate mode at 16 and 64 samples: time, and the mean relative error of the norms
     ||dh^l_i/dx_j||_F against exact, beside the mean stated standard error.
   Every pass of one method costs the same whatever token it starts from, so on CPU each method
   runs on a subset (``--exact-inputs`` input tokens, ``--naive-outputs`` output tokens) of the
   full-length sequence and its time is scaled to the whole sequence; the output says which
   numbers are measured and which are scaled. On a GPU everything runs in full by default.
2. Effective attention of a batch (every layer and head) against the plain Hugging Face forward
   pass with attentions (target <= 1.5x) of the model's body (``lm.body``: no output head, which
   effective attention does not run either), for MiniLM (bidirectional) and, with ``--decoder``,
   SmolLM2 (causal: per-prefix null spaces; as in the library, its layers are projected after
   the forward pass, on one worker thread per intra-op thread of the caller). Both run
   back to back in each of ``--rounds`` rounds; reported are the best times and the median of
   the per-round ratios, and the plain forward's best time before the model's first
   effective-attention call (effective attention must not slow later forward passes: its
   worker thread once did, by a quarter). Both run with the malloc settings the CLI uses
   (:func:`tgeom.runtime.retain_freed_memory`: freed blocks under 1 MB are kept for reuse,
   larger ones mapped on their own); ``--default-malloc`` keeps glibc's.

Usage: python bench/bench_identify.py [--tokens 128] [--batch 16] [--exact-inputs K]
       [--naive-outputs N] [--decoder] [--rounds 7] [--skip-attribution] [--default-malloc]
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
from tgeom.runtime import Runtime, retain_freed_memory


def timed(fn, device):  # type: ignore[no-untyped-def]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return value, time.perf_counter() - start


def naive_reverse(cw, x0, outputs):  # type: ignore[no-untyped-def]
    """||J^l_ij||_F^2 rows ``[L+1, len(outputs), T]`` for output tokens ``outputs``: one
    vectorised backward (full d x T x d Jacobian block) per (layer, output token)."""
    L1, T = len(cw.layers) + 1, x0.shape[1]
    G = torch.zeros(L1, len(outputs), T, dtype=torch.float64)
    for layer in range(1, L1):
        for row, i in enumerate(outputs):
            f = lambda x, layer=layer, i=i: run_blocks(cw, x, stop=layer)[-1][0, i]  # noqa: E731
            J = torch.autograd.functional.jacobian(f, x0, vectorize=True)  # [d, 1, T, d]
            G[layer, row] = (J[:, 0].double() ** 2).sum(dim=(0, 2)).cpu()
    G[0] = torch.eye(T)[outputs]
    return G


def spread(T: int, k: int) -> list[int]:
    """``k`` token indices spread over ``0..T-1``."""
    return sorted({round(i * (T - 1) / max(k - 1, 1)) for i in range(k)})


def attribution_bench(lm, windows, args, device):  # type: ignore[no-untyped-def]
    cw = lm.weights()
    ids = windows.token_ids[:1, : args.tokens].to(device)
    T = ids.shape[1]
    with torch.no_grad():
        x0 = embed(cw, ids).detach()
    full = device.type == "cuda"
    inputs = spread(T, args.exact_inputs or (T if full else 6))
    outputs = spread(T, args.naive_outputs or (T if full else 2))
    squared_norms_exact(cw, x0, inputs=[0])  # warm-up (kernels, allocator)
    exact, t_exact = timed(lambda: squared_norms_exact(cw, x0, inputs=inputs), device)
    naive, t_naive = timed(lambda: naive_reverse(cw, x0, outputs), device)
    overlap = naive[1:][:, :, inputs]  # rows: naive outputs; columns: exact inputs
    reference = exact[1:][:, outputs]
    report = {
        "tokens": T,
        "blocks": len(cw.layers),
        "d_model": x0.shape[2],
        "exact_input_tokens_run": len(inputs),
        "exact_s_measured": t_exact,
        "exact_s_full_sequence": t_exact * T / len(inputs),
        "naive_output_tokens_run": len(outputs),
        "naive_s_measured": t_naive,
        "naive_s_full_sequence": t_naive * T / len(outputs),
        "scaled_to_full_sequence": len(inputs) < T or len(outputs) < T,
        "naive_over_exact": (t_naive / len(outputs)) / (t_exact / len(inputs)),
        "exact_vs_naive_max_rel_diff": float(
            ((reference - overlap).abs() / overlap.clamp_min(1e-12)).max()
        ),
    }
    truth = exact[1:].sqrt()
    for samples in (16, 64):
        (estimate, se), t = timed(
            lambda s=samples: squared_norms_estimate(cw, x0, s, seed=0, inputs=inputs), device
        )
        norm_se = se[1:] / (2 * estimate[1:].clamp_min(1e-30).sqrt())
        report[f"estimate_{samples}_s_measured"] = t
        report[f"estimate_{samples}_s_full_sequence"] = t * T / len(inputs)
        report[f"estimate_{samples}_mean_rel_error_of_norms"] = float(
            ((estimate[1:].sqrt() - truth).abs() / truth).mean()
        )
        report[f"estimate_{samples}_mean_rel_standard_error"] = float((norm_se / truth).mean())
    return report


def effective_bench(lm, windows, batch_size, device, rounds=7):  # type: ignore[no-untyped-def]
    """``rounds`` rounds, each timing the plain forward and then effective attention back to
    back (the two see nearly the same machine load): best of each, and the median of the
    per-round ratios."""
    batch = windows.token_ids[:batch_size].to(device)
    with torch.no_grad():
        plain_forward = lambda: lm.body(input_ids=batch, output_attentions=True, use_cache=False)  # noqa: E731
        plain_forward()  # warm-up
        before = min(timed(plain_forward, device)[1] for _ in range(3))
        effective_attention_batch(lm, batch[:2])  # warm-up
        plain, eff = [], []
        for _ in range(rounds):
            plain.append(timed(plain_forward, device)[1])
            eff.append(timed(lambda: effective_attention_batch(lm, batch), device)[1])
    ratios = sorted(e / p for e, p in zip(eff, plain, strict=True))
    return {
        "model": lm.source,
        "causal": bool(lm.summary.is_causal),
        "batch": int(batch.shape[0]),
        "tokens": int(batch.shape[1]),
        "rounds": rounds,
        "plain_forward_with_attentions_s": min(plain),
        "plain_forward_before_any_effective_s": before,
        "effective_attention_s": min(eff),
        "effective_over_plain_best": min(eff) / min(plain),
        "effective_over_plain_median_of_rounds": ratios[len(ratios) // 2],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--exact-inputs", type=int, default=None)
    parser.add_argument("--naive-outputs", type=int, default=None)
    parser.add_argument("--decoder", action="store_true", help="also SmolLM2 effective attention")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--skip-attribution", action="store_true")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default malloc settings (the CLI calls retain_freed_memory)",
    )
    args = parser.parse_args()
    malloc = "glibc default" if args.default_malloc or not retain_freed_memory() else "retain"
    runtime = Runtime.auto()
    device = runtime.device
    corpus = load_corpus("builtin")
    lm = load_model("minilm", device=str(device))
    windows = make_windows(corpus, lm.tokenizer, args.tokens, max_windows_per_topic=4)
    report = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "malloc": malloc,
        "effective_attention": [effective_bench(lm, windows, args.batch, device, args.rounds)],
    }
    if args.decoder:
        lm = load_model("smollm2", device=str(device))
        windows = make_windows(corpus, lm.tokenizer, args.tokens, max_windows_per_topic=4)
        report["effective_attention"].append(effective_bench(lm, windows, 4, device, args.rounds))
    if not args.skip_attribution:
        lm = load_model("minilm", device=str(device))
        windows = make_windows(corpus, lm.tokenizer, args.tokens, max_windows_per_topic=4)
        report["attribution_minilm"] = attribution_bench(lm, windows, args, device)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
