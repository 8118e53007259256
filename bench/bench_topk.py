"""Exact top-k of a factored [V, V] product: tgeom's factored_topk against two baselines.

Methods, each run in its own subprocess, in the same run and on the same inputs (saved once):

- ``factored``: ``tgeom.linalg.topk.factored_topk`` (screened tiles, exact);
- ``chunked``: dense brute force in row chunks of 1024 with a running torch.topk (baseline a;
  by default timed on the first 4096 rows and scaled linearly to all rows, ``--full`` runs all);
- ``bare``: the same row-chunk matrix products with no selection at all (baseline b);
- ``dense``: materialise the whole matrix, then one torch.topk (synthetic V=10000 only).

Time is measured in one process; peak extra memory in a second one started with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed blocks leave the resident set (otherwise glibc's
arenas make max RSS a measure of fragmentation); on CUDA, the peak allocation.
Inputs: synthetic factors (V=32768, r=64, row norms log-normal like real embeddings) and, when
installed, one head of each offline model (``minilm`` OV, ``smollm2`` QK). ``--full`` adds the
other circuit of each head, runs the chunked baseline on all rows and times the whole atlas
(top-100 of every head and circuit) of both models (many minutes on 2 CPU cores).
Usage: ``python bench/bench_topk.py [--full] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

K = 100
CHUNK = 1024


def synthetic(V: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(V, r, generator=g) * torch.exp(0.3 * torch.randn(V, 1, generator=g))
    B = torch.randn(V, r, generator=g) * torch.exp(0.3 * torch.randn(V, 1, generator=g))
    return A, B


def model_factors(alias: str, layer: int, head: int, circuit: str) -> tuple:  # type: ignore[type-arg]
    from tgeom.analyses.embedding.interaction import circuit_factors
    from tgeom.models import load_model

    cw = load_model(alias, device="cpu").weights()
    return circuit_factors(cw, layer, head, circuit, cw.W_U)


def chunked_topk(A: torch.Tensor, B: torch.Tensor, k: int) -> torch.Tensor:
    values = torch.empty(0, device=A.device)
    for s in range(0, A.shape[0], CHUNK):
        chunk = torch.topk((A[s : s + CHUNK] @ B.T).reshape(-1), k).values
        values = torch.topk(torch.cat([values, chunk]), k).values
    return values


def bare(A: torch.Tensor, B: torch.Tensor) -> float:
    total = 0.0
    for s in range(0, A.shape[0], CHUNK):
        total += float((A[s : s + CHUNK] @ B.T)[0, 0])
    return total


class PeakRSS:
    """Samples the resident set (``/proc/self/statm``) every millisecond while active."""

    def __init__(self) -> None:
        self.page = resource.getpagesize()
        self.start = self.peak = self.current()
        self.running = True
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def current(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def loop(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.current())
            time.sleep(0.001)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return (max(self.peak, self.current()) - self.start) / 2**20


def worker(spec: dict) -> dict:  # type: ignore[type-arg]
    """Run one method on one input; report seconds and peak extra memory in MB."""
    from tgeom.linalg.topk import factored_topk

    device = torch.device(spec["device"])
    A, B = torch.load(spec["factors"])
    if spec.get("rows"):
        A = A[: spec["rows"]]
    A, B = A.to(device), B.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sampler = PeakRSS()
    sync()
    start = time.perf_counter()
    kth = float("nan")
    if spec["method"] == "factored":
        kth = float(factored_topk(A, B, K).values[-1])
    elif spec["method"] == "chunked":
        kth = float(chunked_topk(A, B, K)[-1])
    elif spec["method"] == "bare":
        bare(A, B)
    elif spec["method"] == "dense":
        kth = float(torch.topk((A @ B.T).reshape(-1), K).values[-1])
    sync()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        sampler.stop()
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = sampler.stop()
    return {"seconds": seconds, "peak_mb": peak, "kth": kth}


def run(spec: dict, memory: bool = False) -> dict:  # type: ignore[type-arg]
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if memory else {})}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(spec: dict, n_rows: int, full: bool) -> dict:  # type: ignore[type-arg]
    """Seconds (normal run) and peak MB (memory run); the chunked baseline may be scaled."""
    scale = 1.0
    if spec["method"] == "chunked" and not full and n_rows > 4 * CHUNK:
        spec = {**spec, "rows": 4 * CHUNK}
        scale = n_rows / (4 * CHUNK)
    timed = run(spec)
    if "error" in timed:
        return timed
    peak = run(spec, memory=True)
    return {
        "seconds": timed["seconds"] * scale,
        "peak_mb": peak.get("peak_mb", float("nan")),
        "kth": timed["kth"] if scale == 1.0 else float("nan"),
        "scaled": scale != 1.0,
    }


def compare(label: str, spec: dict, methods: tuple[str, ...], full: bool) -> None:  # type: ignore[type-arg]
    n_rows = int(torch.load(spec["factors"])[0].shape[0])
    results = {m: measure({**spec, "method": m}, n_rows, full) for m in methods}
    if any("error" in r for r in results.values()):
        print(f"{label:<34} skipped: {next(r['error'] for r in results.values() if 'error' in r)}")
        return
    mine = results["factored"]
    parts = [f"factored {mine['seconds']:6.2f}s {mine['peak_mb']:5.0f}MB"]
    for m in methods[1:]:
        r = results[m]
        ratio = r["seconds"] / mine["seconds"]
        star = "*" if r.get("scaled") else ""
        parts.append(f"{m} {r['seconds']:6.2f}s{star} {r['peak_mb']:5.0f}MB ({ratio:5.1f}x)")
        if m == "dense" and abs(r["kth"] - mine["kth"]) > 1e-4 * abs(mine["kth"]):
            parts.append(f"MISMATCH kth {mine['kth']} vs {r['kth']}")
    print(f"{label:<34} " + " | ".join(parts), flush=True)


def atlas_times(alias: str) -> None:
    from tgeom.analyses.embedding.atlas import head_atlas
    from tgeom.models import load_model

    cw = load_model(alias, device="cpu").weights()
    start = time.perf_counter()
    atlas = head_atlas(cw, K, quiet=True)
    seconds = time.perf_counter() - start
    n = len(atlas.blocks) * cw.summary.n_heads * 2
    print(f"atlas {alias}: {n} head-circuits, top-{K}, {seconds:.1f}s ({seconds / n:.3f}s each)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="More heads, unscaled, atlas.")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    print(f"device {args.device}, k={K}, torch threads {torch.get_num_threads()}; ratios are")
    print("baseline time / factored time; * = chunked baseline timed on 4096 rows and scaled")
    folder = Path(tempfile.mkdtemp(prefix="bench-topk-"))
    inputs: list[tuple[str, Path, tuple[str, ...]]] = []
    for V, methods in [(10000, ("dense",)), (32768, ())]:
        path = folder / f"synthetic-{V}.pt"
        torch.save(synthetic(V, 64, seed=0), path)
        inputs.append((f"synthetic V={V} r=64", path, ("factored", "bare", "chunked", *methods)))
    heads = [("minilm", 3, 5, "ov"), ("smollm2", 15, 3, "qk")]
    if args.full:
        heads += [("minilm", 3, 5, "qk"), ("smollm2", 15, 3, "ov")]
    for alias, layer, head, circuit in heads:
        path = folder / f"{alias}-{layer}-{head}-{circuit}.pt"
        try:
            torch.save(model_factors(alias, layer, head, circuit), path)
        except Exception as exc:  # the offline model is not installed
            print(f"{alias}: skipped ({exc})")
            continue
        inputs.append(
            (f"{alias} L{layer} H{head} {circuit}", path, ("factored", "bare", "chunked"))
        )
    for label, path, methods in inputs:
        compare(label, {"device": args.device, "factors": str(path)}, methods, args.full)
    if args.full:
        for alias in ("minilm", "smollm2"):
            atlas_times(alias)


if __name__ == "__main__":
    main()
