"""Throughput and memory of ``geometry collect`` (streaming float64 sums) on a real model.

Throughput, in one process, on the same windows (built-in corpus, T=64) and batch size, in
``--rounds`` rounds that each run, back to back:

- ``plain``: batched forward passes of the Hugging Face model's body (``lm.body``: no output
  head, as collection runs it), nothing kept;
- ``collect``: :func:`tgeom.analyses.geometry.collect_statistics` (hooks + float64 sums).

Shared machines are noisy, so both are reported as best-of-rounds tokens/s, their ratio, and the
median of the per-round ratios (each round's two runs see nearly the same load). Target >= 0.9.

Peak memory: subprocesses (started with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed blocks leave
the resident set) collect C and 4C windows while a thread samples the resident set every
millisecond; reported is the peak above the resident set just before the collection (on CUDA,
the peak allocation), beside the size of the statistics themselves (only the per-window means
``[C, L+1, d]`` grow with C: ``8 (L+1) d`` bytes a window) and what holding the ``[C, L+1, T, d]``
float32 hidden states would take. Usage:
``python bench/bench_geometry.py [--model minilm] [--seq-len 64] [--device cuda] [--rounds 7]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import torch


def _windows(lm: Any, per_topic: int, seq_len: int) -> Any:
    from tgeom.corpus import load_corpus, make_windows

    return make_windows(
        load_corpus("builtin"),
        lm.tokenizer,
        seq_len,
        max_windows_per_topic=per_topic,
        max_context=lm.summary.n_ctx,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def _plain(lm: Any, token_ids: torch.Tensor, batch: int, device: torch.device) -> None:
    for start in range(0, token_ids.shape[0], batch):
        lm.body(input_ids=token_ids[start : start + batch].to(device), use_cache=False)
    _sync(device)


def throughput(
    model: str, per_topic: int, seq_len: int, batch: int, rounds: int, device: str
) -> dict:
    from tgeom.analyses.geometry import collect_statistics
    from tgeom.models import load_model
    from tgeom.runtime import Runtime

    dev = torch.device(device)
    lm = load_model(model, device=device)
    windows = _windows(lm, per_topic, seq_len)
    runtime = Runtime(dev, batch_size=batch)
    tokens = windows.token_ids.numel()
    _plain(lm, windows.token_ids[: 2 * batch], batch, dev)  # warm-up
    collect_statistics(lm, windows, runtime, progress=False)
    times: dict[str, list[float]] = {"plain": [], "collect": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        _plain(lm, windows.token_ids, batch, dev)
        times["plain"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        collect_statistics(lm, windows, runtime, progress=False)
        _sync(dev)
        times["collect"].append(time.perf_counter() - t0)
    plain, collect = tokens / min(times["plain"]), tokens / min(times["collect"])
    per_round = [p / c for p, c in zip(times["plain"], times["collect"], strict=True)]
    return {
        "model": model,
        "device": device,
        "threads": torch.get_num_threads(),
        "windows": len(windows),
        "seq_len": seq_len,
        "batch_size": batch,
        "rounds": rounds,
        "plain_tokens_per_s": plain,
        "collect_tokens_per_s": collect,
        "ratio_of_best": collect / plain,
        "ratio_median_of_rounds": statistics.median(per_round),
        "ratio_per_round": per_round,
    }


class _RssSampler:
    """Peak resident set (MiB) of this process, sampled every millisecond in a thread."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") / 2**20
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> float:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.001)

    def __enter__(self) -> _RssSampler:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def memory_child(model: str, per_topic: int, seq_len: int, batch: int, device: str) -> None:
    from tgeom.analyses.geometry import collect_statistics
    from tgeom.models import load_model
    from tgeom.runtime import Runtime

    lm = load_model(model, device=device)
    windows = _windows(lm, per_topic, seq_len)
    runtime = Runtime(torch.device(device), batch_size=batch)
    _plain(lm, windows.token_ids[:batch], batch, torch.device(device))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with _RssSampler() as sampler:
        base = sampler.now()
        stats = collect_statistics(lm, windows, runtime, progress=False)
    summary = lm.summary
    n_windows, layers, d = len(windows), int(summary.n_layers) + 1, int(summary.d_model)
    extra = sampler.peak - base if device != "cuda" else torch.cuda.max_memory_allocated() / 2**20
    stat_bytes = sum(
        t.numel() * t.element_size()
        for t in (stats.sum_total, stats.sum_pos, stats.ctx_means, stats.sumsq, stats.sum_abs)
    )
    print(
        json.dumps(
            {
                "windows": n_windows,
                "extra_peak_mib": extra,
                "statistics_mib": stat_bytes / 2**20,
                "dense_hidden_f32_mib": n_windows * layers * seq_len * d * 4 / 2**20,
            }
        )
    )


def memory(model: str, per_topic: int, seq_len: int, batch: int, device: str) -> list[dict]:
    rows = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for n in (per_topic, 4 * per_topic):
        command = [sys.executable, __file__, "--child", str(n), "--model", model]
        command += ["--seq-len", str(seq_len), "--batch-size", str(batch), "--device", device]
        out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--per-topic", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        memory_child(args.model, args.child, args.seq_len, args.batch_size, args.device)
        return
    report = throughput(
        args.model, args.per_topic, args.seq_len, args.batch_size, args.rounds, args.device
    )
    if not args.skip_memory:
        report["memory"] = memory(
            args.model, args.per_topic, args.seq_len, args.batch_size, args.device
        )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
