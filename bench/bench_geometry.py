"""Throughput and memory of ``geometry collect`` (streaming float64 sums) on a real model.

In one process, on the same windows (built-in corpus, T=64) and batch size, alternating:

- ``plain``: batched forward passes of the Hugging Face model, nothing kept;
- ``collect``: :func:`tgeom.analyses.geometry.collect_statistics` (hooks + float64 running sums).

Reports tokens/s of each (best of ``--repeats``) and their ratio (target >= 0.9). Peak memory:
two subprocesses (started with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed blocks leave the
resident set) collect C and 4C windows; their max RSS above the post-load baseline should stay
flat (only the per-window means ``[C, L+1, d]`` grow: 8 (L+1) d bytes a window). On CUDA, the
peak allocation instead. Usage: ``python bench/bench_geometry.py [--model minilm] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import torch

SEQ_LEN = 64


def _windows(lm: Any, per_topic: int) -> Any:
    from tgeom.corpus import load_corpus, make_windows

    return make_windows(
        load_corpus("builtin"),
        lm.tokenizer,
        SEQ_LEN,
        max_windows_per_topic=per_topic,
        max_context=lm.summary.n_ctx,
    )


@torch.no_grad()
def _plain(lm: Any, token_ids: torch.Tensor, batch: int, device: torch.device) -> None:
    for start in range(0, token_ids.shape[0], batch):
        lm.hf(input_ids=token_ids[start : start + batch].to(device), use_cache=False)
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(model: str, per_topic: int, batch: int, repeats: int, device: str) -> dict:
    from tgeom.analyses.geometry import collect_statistics
    from tgeom.models import load_model
    from tgeom.runtime import Runtime

    dev = torch.device(device)
    lm = load_model(model, device=device)
    windows = _windows(lm, per_topic)
    runtime = Runtime(dev, batch_size=batch)
    tokens = windows.token_ids.numel()
    _plain(lm, windows.token_ids[:batch], batch, dev)  # warm-up
    best = {"plain": float("inf"), "collect": float("inf")}
    for _ in range(repeats):
        t0 = time.perf_counter()
        _plain(lm, windows.token_ids, batch, dev)
        best["plain"] = min(best["plain"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        collect_statistics(lm, windows, runtime, progress=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best["collect"] = min(best["collect"], time.perf_counter() - t0)
    plain, collect = tokens / best["plain"], tokens / best["collect"]
    return {
        "model": model,
        "device": device,
        "windows": len(windows),
        "seq_len": SEQ_LEN,
        "batch_size": batch,
        "plain_tokens_per_s": plain,
        "collect_tokens_per_s": collect,
        "ratio": collect / plain,
    }


def memory_child(model: str, per_topic: int, batch: int, device: str) -> None:
    from tgeom.analyses.geometry import collect_statistics
    from tgeom.models import load_model
    from tgeom.runtime import Runtime

    lm = load_model(model, device=device)
    windows = _windows(lm, per_topic)
    _plain(lm, windows.token_ids[:batch], batch, torch.device(device))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    collect_statistics(lm, windows, Runtime(torch.device(device), batch_size=batch), progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    extra = (peak - base) / 1024 if device != "cuda" else torch.cuda.max_memory_allocated() / 2**20
    print(
        json.dumps({"windows": len(windows), "extra_peak_mib": extra, "peak_rss_mib": peak / 1024})
    )


def memory(model: str, per_topic: int, batch: int, device: str) -> list[dict]:
    rows = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for n in (per_topic, 4 * per_topic):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(n),
                "--model",
                model,
                "--batch-size",
                str(batch),
                "--device",
                device,
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--per-topic", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        memory_child(args.model, args.child, args.batch_size, args.device)
        return
    report = throughput(args.model, args.per_topic, args.batch_size, args.repeats, args.device)
    report["memory"] = memory(args.model, args.per_topic, args.batch_size, args.device)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
