"""Gemma-3-270m: one head's exact QK and OV top pairs against a dense brute force (issue 18).

tgeom's answer (``qk_top_pairs`` / ``ov_top_pairs``: QK-norm factors, screened tiles) is compared
with the dense ``[V, V]`` matrix computed in row chunks from the Hugging Face model's own modules
(``q_proj``/``k_proj`` then its ``q_norm``/``k_norm``; ``v_proj``, ``o_proj``) over all 262,144
columns: each chunk's top ``K + MARGIN`` entries in float32, rescored in float64, merged.
By default every row is scanned (17.6 T multiply-adds per circuit; measured on a quiet 2-core
machine, block 5 head 0, k 50: pairs equal for QK and OV, dense 940 s and 914 s, tgeom 80.5 s
and 61.5 s). ``--rows N``
scans the rows of tgeom's answer plus N random others instead (the answer must then be the top
of that sub-matrix too; a missed pair in an unscanned row is not seen) and says so.
Prints one JSON line. Usage: ``python bench/bench_gemma3_topk.py [--block 5 --head 0 --k 50
--rows N --device cpu]``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

CHUNK = 512
MARGIN = 16


def hf_factors(lm, block: int, head: int, circuit: str) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """``[V, d_head]`` factors from the HF modules alone (E: the raw tied embedding)."""
    attn = lm.hf.model.layers[block].self_attn
    E = lm.hf.get_input_embeddings().weight
    H, K = lm.summary.n_heads, lm.summary.n_kv_heads
    dh = lm.summary.d_head
    kv = head // (H // K)
    with torch.no_grad():
        if circuit == "qk":
            q = torch.cat(
                [attn.q_norm((c @ attn.q_proj.weight.T).view(-1, H, dh)) for c in E.split(8192)]
            )
            k = torch.cat(
                [attn.k_norm((c @ attn.k_proj.weight.T).view(-1, K, dh)) for c in E.split(8192)]
            )
            return q[:, head].contiguous(), k[:, kv].contiguous()
        v = (E @ attn.v_proj.weight.T).view(-1, K, dh)[:, kv].contiguous()
        o = (
            E @ attn.o_proj.weight[:, head * dh : (head + 1) * dh]
        )  # rows of W_O[head] = cols of o_proj
        return v, o.contiguous()


def dense_top(
    A: torch.Tensor, B: torch.Tensor, rows: torch.Tensor, k: int
) -> list[tuple[int, int, float]]:
    """Top-k entries of ``A[rows] @ B.T``, scanning row chunks (float32 candidates, float64
    scores)."""
    V = B.shape[0]
    best: list[tuple[float, int, int]] = []
    for s in range(0, len(rows), CHUNK):
        r = rows[s : s + CHUNK]
        block = A[r] @ B.T  # [chunk, V]
        top = torch.topk(block.reshape(-1), min(k + MARGIN, block.numel())).indices
        ri, ci = r[top // V], top % V
        exact = (A[ri].double() * B[ci].double()).sum(-1)
        best += list(zip(exact.tolist(), ri.tolist(), ci.tolist(), strict=True))
        best = sorted(best, reverse=True)[: k + MARGIN]
    return [(i, j, v) for v, i, j in best[:k]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=5)  # a global layer
    parser.add_argument("--head", type=int, default=0)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--rows", type=int, default=None, help="answer rows + N random rows")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from tgeom.analyses.embedding.interaction import ov_top_pairs, qk_top_pairs
    from tgeom.models import load_model

    lm = load_model("gemma3", device=args.device)
    cw = lm.weights()
    out: dict[str, object] = {
        "model": "gemma3",
        "block": args.block,
        "head": args.head,
        "k": args.k,
    }
    for circuit, fn in (("qk", qk_top_pairs), ("ov", ov_top_pairs)):
        t0 = time.perf_counter()
        got = fn(cw, args.block, args.head, args.k)
        t_tgeom = time.perf_counter() - t0
        A, B = hf_factors(lm, args.block, args.head, circuit)
        V = A.shape[0]
        if args.rows is None:
            rows = torch.arange(V, device=A.device)
        else:
            g = torch.Generator().manual_seed(0)
            extra = torch.randperm(V, generator=g)[: args.rows].to(A.device)
            rows = torch.unique(torch.cat([got.rows.to(A.device), extra]))
        t0 = time.perf_counter()
        want = dense_top(A, B, rows, args.k)
        t_dense = time.perf_counter() - t0
        pairs = list(zip(got.rows.tolist(), got.cols.tolist(), strict=True))
        values = torch.tensor([v for _, _, v in want], dtype=torch.float64)
        out[circuit] = {
            "pairs_equal": pairs == [(i, j) for i, j, _ in want],
            "max_value_diff": float((got.values.double().cpu() - values).abs().max()),
            "rows_scanned": len(rows),
            "cols_scanned": int(B.shape[0]),
            "tgeom_s": round(t_tgeom, 1),
            "dense_s": round(t_dense, 1),
            "top3": [
                (lm.vocab_strings[i], lm.vocab_strings[j], round(v, 3)) for i, j, v in want[:3]
            ],
        }
        print(json.dumps({circuit: out[circuit]}), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
