"""Exact top-k of a factored [V, V] product: tgeom's factored_topk against two baselines.

Methods, each run in its own subprocess, in the same run and on the same inputs (saved once):

- ``factored``: ``tgeom.linalg.topk.factored_topk`` (screened tiles, exact);
- ``factored-old``: the same function as of commit ``--old`` (default: before the balanced
  screening basis and spectrum-chosen width), loaded from git, for an old/new ratio;
- ``chunked``: dense brute force in row chunks of 1024 with a running torch.topk (baseline a;
  by default timed on the first 4096 rows and scaled linearly to all rows, ``--full`` runs all);
- ``bare``: the same row-chunk matrix products with no selection at all (baseline b);
- ``dense``: materialise the whole matrix, then one torch.topk (synthetic V=10000 only).

Time is measured in one process; peak extra memory in a second one started with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed blocks leave the resident set (otherwise glibc's
arenas make max RSS a measure of fragmentation); on CUDA, the peak allocation.
Inputs: synthetic factors (V=32768, r=64, row norms log-normal like real embeddings), a
Gemma-3-shaped QK-norm case (V=32768, r=256, every row of norm 1 on the query side and 4 on the
key side, each side's Gram spectrum and eigenvectors taken from ``gemma3`` block 5 head 0 when
that offline model is installed, else a power law; new against old only, interleaved, best
of 3) and, when installed,
one head of each offline model (``minilm`` OV, ``smollm2`` QK). ``--full`` adds the
other circuit of each head, runs the chunked baseline on all rows and times the whole atlas
(top-100 of every head and circuit) of both models (many minutes on 2 CPU cores).
Usage: ``python bench/bench_topk.py [--full] [--only-gemma3-like] [--device cuda]``.
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
OLD = "11a4c38"  # factored_topk with the orthonormal eigenbasis, p = max(24, r/2)
GEMMA3_LIKE_V = 32768  # 1.1e9 entries: ~1 min a run on 2 loaded cores
REPEATS = 3  # old/new runs, interleaved: on a shared machine the load drifts between runs


def synthetic(V: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(V, r, generator=g) * torch.exp(0.3 * torch.randn(V, 1, generator=g))
    B = torch.randn(V, r, generator=g) * torch.exp(0.3 * torch.randn(V, 1, generator=g))
    return A, B


def gemma3_like(V: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[V, 256]`` factors shaped like Gemma-3-270m's QK-norm ones: Gaussian rows with each
    side's Gram matrix taken from block 5 head 0 (a power law when gemma3 is not installed),
    then normalised (norm 1 queries, norm 4 keys)."""
    g = torch.Generator().manual_seed(seed)
    try:
        grams = [F.double().T @ F.double() / len(F) for F in model_factors("gemma3", 5, 0, "qk")]
    except Exception:  # gemma3 not installed
        spectrum = torch.arange(1, 257, dtype=torch.float64) ** -1.5
        Q = torch.linalg.qr(torch.randn(256, 256, generator=g, dtype=torch.float64)).Q
        grams = [torch.diag(spectrum), Q @ torch.diag(spectrum) @ Q.T]
    sides = []
    for gram, norm in zip(grams, (1.0, 4.0), strict=True):
        w, Q = torch.linalg.eigh(gram)
        F = torch.randn(V, 256, generator=g, dtype=torch.float64) * w.clamp_min(0).sqrt() @ Q.T
        sides.append((norm * F / F.norm(dim=1, keepdim=True)).float())
    return sides[0], sides[1]


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

    if spec["method"] == "factored-old":
        factored_topk = old_factored_topk(spec["old"])
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
    if spec["method"] in ("factored", "factored-old"):
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


def old_factored_topk(rev: str):  # type: ignore[no-untyped-def]
    """``factored_topk`` as of git revision ``rev`` (its module loaded from ``git show``)."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{rev}:src/tgeom/linalg/topk.py"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="bench-topk-old-")) / "topk_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("topk_old", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["topk_old"] = module
    spec.loader.exec_module(module)
    return module.factored_topk


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


def measure(
    spec: dict,  # type: ignore[type-arg]
    n_rows: int,
    full: bool,
    memory: bool = True,
) -> dict:  # type: ignore[type-arg]
    """Seconds (normal run) and peak MB (memory run, unless ``memory`` is false); the chunked
    baseline may be scaled."""
    scale = 1.0
    if spec["method"] == "chunked" and not full and n_rows > 4 * CHUNK:
        spec = {**spec, "rows": 4 * CHUNK}
        scale = n_rows / (4 * CHUNK)
    timed = run(spec)
    if "error" in timed:
        return timed
    peak = run(spec, memory=True) if memory else {}
    return {
        "seconds": timed["seconds"] * scale,
        "peak_mb": peak.get("peak_mb", float("nan")),
        "kth": timed["kth"] if scale == 1.0 else float("nan"),
        "scaled": scale != 1.0,
    }


def compare(label: str, spec: dict, methods: tuple[str, ...], full: bool) -> None:  # type: ignore[type-arg]
    n_rows = int(torch.load(spec["factors"])[0].shape[0])
    results: dict = {}  # type: ignore[type-arg]
    old_new = "factored-old" in methods  # time only, interleaved, best of REPEATS each
    for _ in range(REPEATS if old_new else 1):
        for m in methods:
            r = measure({**spec, "method": m}, n_rows, full, memory=not old_new)
            if m not in results or r.get("seconds", 0) < results[m].get("seconds", 0):
                results[m] = r
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
        if m in ("dense", "factored-old") and abs(r["kth"] - mine["kth"]) > 1e-4 * abs(mine["kth"]):
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
    parser.add_argument("--old", default=OLD, help="git revision of the old factored_topk.")
    parser.add_argument("--only-gemma3-like", action="store_true", help="Just the old/new case.")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    print(f"device {args.device}, k={K}, torch threads {torch.get_num_threads()}; ratios are")
    print("baseline time / factored time; * = chunked baseline timed on 4096 rows and scaled")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; old = {args.old}")
    folder = Path(tempfile.mkdtemp(prefix="bench-topk-"))
    inputs: list[tuple[str, Path, tuple[str, ...]]] = []
    path = folder / "gemma3-like.pt"
    torch.save(gemma3_like(GEMMA3_LIKE_V, seed=0), path)
    label = f"gemma3-like V={GEMMA3_LIKE_V} r=256 QK-norm"
    inputs.append((label, path, ("factored", "factored-old")))
    for V, methods in [] if args.only_gemma3_like else [(10000, ("dense",)), (32768, ())]:
        path = folder / f"synthetic-{V}.pt"
        torch.save(synthetic(V, 64, seed=0), path)
        inputs.append((f"synthetic V={V} r=64", path, ("factored", "bare", "chunked", *methods)))
    heads = [] if args.only_gemma3_like else [("minilm", 3, 5, "ov"), ("smollm2", 15, 3, "qk")]
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
        spec = {"device": args.device, "factors": str(path), "old": args.old}
        compare(label, spec, methods, args.full)
    if args.full:
        for alias in ("minilm", "smollm2"):
            atlas_times(alias)


if __name__ == "__main__":
    main()
