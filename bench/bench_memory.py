"""Peak memory of the model-taking commands against the model's weight bytes (SPEC section 1,
"Precision, placement, size": at most 1.3x the weights in the chosen dtype plus the analysis'
own stated working set).

Builds once a random model of TinyLlama's shape (Llama, d 2048, 22 blocks, 32 query / 4 KV
heads, d_mlp 5632, vocab 32,000: ~1.1B parameters), saved in bfloat16 as safetensors with
all-MiniLM-L6-v2's WordPiece tokenizer (30,522 ids, all below the 32,000 rows) in a cache folder
(``--cache``, reused when present). Then runs, each in a fresh process, ``tgeom info``,
``weights topk`` (one head), ``geometry collect`` (16 windows of 128 tokens) and ``attention
effective`` (one 128-token text), once with ``--dtype bfloat16`` and once with ``float32``, and
prints per dtype the peak resident memory of the process (``ru_maxrss`` from ``wait4``) against
the weights' bytes in that dtype. Target: <= 1.3x for every command with bfloat16.
Also printed: the peak of a process that only imports what the commands import (torch,
transformers, matplotlib, tgeom: 0.32 GiB, a fixed cost that a 1B model feels and a 7B one does
not), each command's ratio without it, and its ratio without its own stated working set
(:func:`working_sets`; SPEC: the 1.3x is on top of it).
``geometry collect`` runs with ``--no-second-moment``: the second moment is that command's own
stated working set (``8 (L+1) d^2`` bytes, 0.72 GiB here), outside the 1.3x.

Last measured (2 shared cores, bfloat16; peak GiB, ratio, without imports, without own working
set): info 2.49 1.21x 1.06x 1.21x; weights topk 2.66 1.30x 1.14x 1.30x; geometry collect 2.69
1.31x 1.16x 1.29x; attention effective 2.72 1.33x 1.17x 1.27x. What is left above the weights
(attention effective, from a VmRSS sampler): 0.34 GiB anonymous memory once the model is loaded
(imports 0.27, the loaded model's modules and tokenizer 0.07), 0.13 GiB of shared
libraries mapped, its result 0.13 GiB, and ~0.06 GiB of forward pass and output factors.
Usage: ``nice python bench/bench_memory.py [--cache DIR] [--dtypes bfloat16,float32]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPE: dict[str, Any] = {
    "hidden_size": 2048,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "intermediate_size": 5632,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}
TARGET = 1.3
TOKENS = 128
WINDOWS = 16


def build_model(folder: Path) -> None:
    """Random bf16 weights of :data:`SHAPE` (std 0.02, unit norm gains) and MiniLM's tokenizer."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from tgeom.models.offline import offline_model_path

    config = transformers.LlamaConfig(**SHAPE, tie_word_embeddings=False)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(partial)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(offline_model_path("minilm")))
    tokenizer.save_pretrained(partial)
    partial.rename(folder)


def weight_bytes(folder: Path, itemsize: int) -> int:
    """The weights' bytes at ``itemsize`` bytes per entry, from the safetensors header."""
    path = folder / "model.safetensors"
    with path.open("rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    numel = 0
    for name, info in header.items():
        if name != "__metadata__":
            count = 1
            for size in info["shape"]:
                count *= size
            numel += count
    return numel * itemsize


def inputs(folder: Path, work: Path) -> tuple[Path, str]:
    """A text-file corpus with well over 16 windows of 128 tokens (CPython's ``inspect.py``,
    real text) and one text of 128 tokens with the tokenizer's [CLS] and [SEP]."""
    import inspect

    import transformers

    source = Path(inspect.__file__).read_text(encoding="utf-8")
    corpus = work / "corpus.txt"
    corpus.write_text(source, encoding="utf-8")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer(source[:20_000], add_special_tokens=False)["input_ids"]
    text = str(tokenizer.decode(ids[: TOKENS - 2]))
    return corpus, text


def peak_rss(argv: list[str]) -> tuple[int, float]:
    """``(peak resident bytes, seconds)`` of ``argv`` run in a fresh process."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.stderr is not None
    _, status, usage = os.wait4(process.pid, 0)
    error = process.stderr.read().decode(errors="replace").strip()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv[2:5])} failed ({process.returncode}): {error[-2000:]}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start


IMPORTS = (
    "import torch, transformers, matplotlib.pyplot, tgeom.cli, tgeom.models, "
    "tgeom.analyses.geometry, tgeom.analyses.identifiability"
)


def working_sets() -> list[int]:
    """Per command (in :func:`commands`' order), the bytes of its own stated working set, what
    it holds by design beside the model (SPEC section 1: allowed on top of the 1.3x): none for
    ``info`` and ``weights topk`` (tiles of a fixed size); ``geometry collect``'s float64 sums
    ``8 (L+1) (T' + W + 3) d`` (per-position sums over ``T' = 127`` positions, ``W`` window
    means, three per-coordinate sums: 53 MB here); ``attention effective``'s result, every
    block's raw (float32) and effective (float64) attention, ``12 L H n^2`` (0.13 GiB here)."""
    L, d, H = SHAPE["num_hidden_layers"], SHAPE["hidden_size"], SHAPE["num_attention_heads"]
    collect = 8 * (L + 1) * ((TOKENS - 1) + WINDOWS + 3) * d
    return [0, 0, collect, 12 * L * H * TOKENS**2]


def commands(model: Path, corpus: Path, text: str, out: Path, dtype: str) -> dict[str, list[str]]:
    tgeom = [sys.executable, "-m", "tgeom"]
    common = [str(model), "--dtype", dtype]
    return {
        "info": [*tgeom, "info", *common],
        "weights topk (1 head)": [
            *tgeom, "weights", "topk", *common, "--block", "0", "--head", "0",
            "--out", str(out / "topk"),
        ],
        f"geometry collect ({WINDOWS} x {TOKENS})": [
            *tgeom, "geometry", "collect", *common, str(corpus), "--seq-len", str(TOKENS),
            "--max-windows-per-topic", str(WINDOWS), "--batch-size", str(WINDOWS),
            "--no-second-moment", "--out", str(out / "collect"),
        ],
        f"attention effective ({TOKENS} tokens)": [
            *tgeom, "attention", "effective", *common, "--text", text,
            "--out", str(out / "effective"),
        ],
    }  # fmt: skip


def prepare(model: Path, work: Path) -> None:
    """Build the model if needed and write the inputs (``corpus.txt``, ``text.txt``) to
    ``work``: run in a child process (``--prepare``), so that this process stays small. A child
    started by ``subprocess`` (vfork, then exec) inherits its parent's peak in ``ru_maxrss``:
    a parent that had built the model or imported transformers set a floor under every
    measurement."""
    if not (model / "model.safetensors").is_file():
        print(f"building the random 1.1B model in {model} (once) ...", flush=True)
        build_model(model)
    _, text = inputs(model, work)
    (work / "text.txt").write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_cache = Path(os.environ.get("TGEOM_CACHE", Path.home() / ".cache" / "tgeom"))
    parser.add_argument("--cache", type=Path, default=default_cache / "bench-tinyllama-shape")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)  # the child's work dir
    args = parser.parse_args()
    model = args.cache
    if args.prepare is not None:
        prepare(model, args.prepare)
        return
    with tempfile.TemporaryDirectory(prefix="tgeom-bench-memory-") as tmp:
        work = Path(tmp)
        argv = [sys.executable, __file__, "--cache", str(model), "--prepare", str(work)]
        subprocess.run(argv, check=True)
        corpus, text = work / "corpus.txt", (work / "text.txt").read_text(encoding="utf-8")
        imports, _ = peak_rss([sys.executable, "-c", IMPORTS])
        print(f"imports alone: {imports / 2**30:.2f} GiB")
        for dtype in args.dtypes.split(","):
            itemsize = 2 if dtype in ("bfloat16", "float16") else 4
            weights = weight_bytes(model, itemsize)
            print(
                f"\n{dtype}: weights {weights / 2**30:.2f} GiB; peak RSS / weights (target <= "
                f"{TARGET}x), (peak - imports) / weights, (peak - own working set) / weights"
            )
            runs = commands(model, corpus, text, work / dtype, dtype)
            for (name, argv), own in zip(runs.items(), working_sets(), strict=True):
                rss, seconds = peak_rss(argv)
                ratio = rss / weights
                mark = "ok" if ratio <= TARGET else "OVER"
                print(
                    f"  {name:32s} {rss / 2**30:6.2f} GiB  {ratio:5.2f}x  {mark:4s} "
                    f"{(rss - imports) / weights:5.2f}x  {(rss - own) / weights:5.2f}x "
                    f"({own / 2**30:.2f} GiB)  ({seconds:.0f} s)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
