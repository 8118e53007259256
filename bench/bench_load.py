"""Loading a GGUF model: the first load (conversion to the cached float32 safetensors folder)
against a later one (the cached folder read back), on the same file in the same process.

Each of ``--rounds`` rounds converts SmolLM2's GGUF into a fresh temporary ``$TGEOM_CACHE``,
then loads it again from there. Shared machines are noisy, so reported are the best-of-rounds
seconds of each and the median of the per-round ratios ``cached / first`` (each round's two loads
see nearly the same load). Target: the cached load at most a fifth of the conversion. Usage:
``python bench/bench_load.py [--model smollm2 | PATH.gguf] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def _timed_load(source: str) -> float:
    from tgeom.models import load_model

    start = time.perf_counter()
    load_model(source, device="cpu")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="an alias or a .gguf file")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    first, cached = [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="tgeom-bench-cache-") as cache:
            os.environ["TGEOM_CACHE"] = cache
            first.append(_timed_load(args.model))
            cached.append(_timed_load(args.model))
    ratios = [c / f for f, c in zip(first, cached, strict=True)]
    print(
        f"{args.model}: first load (converts) best {min(first):.2f} s, cached load best "
        f"{min(cached):.2f} s; cached/first median {statistics.median(ratios):.3f} "
        f"(rounds: {', '.join(f'{r:.3f}' for r in ratios)}; target <= 0.2)"
    )


if __name__ == "__main__":
    main()
