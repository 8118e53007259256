"""Corpus-wide null spaces and effective-attention summaries [BRU] (SPEC section 5), sharded
across the ranks of a ``torchrun`` job.

What ``tgeom attention nullspace`` reports is per-sequence tables (null dimension, rank and
Pearson(raw, effective) per block and head) and sums over sequences (token-type attention): once
a batch is summarised its attention matrices are dropped, so memory stays flat in the corpus
size. Under ``torchrun`` each rank takes whole batches, the very batches one process would form,
so every per-sequence number is bit-identical to the single-process run; one float64 all-reduce
assembles the tables (rows of other ranks are zero) and adds the sums. A rank that dies makes
the collective fail on the others: no partial result.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tgeom.analyses.identifiability.effective import (
    TOKEN_TYPES,
    TYPE_SUMS,
    EffectiveSummary,
    PearsonTable,
    effective_attention,
)
from tgeom.analyses.identifiability.nullspace_dims import NullSpaceResult
from tgeom.capture.distributed import Shard, shard_from_env
from tgeom.errors import TgeomError
from tgeom.runtime import Runtime


def attention_survey(
    lm: Any,
    token_ids: Tensor,
    attention_mask: Tensor | None = None,
    runtime: Runtime | None = None,
    shard: Shard | None = None,
) -> tuple[NullSpaceResult, EffectiveSummary]:
    """Null spaces and effective-attention summaries of every sequence of ``token_ids [S, T]``
    (right padding marked by ``attention_mask``), batch by batch; ``shard`` (default: from the
    ``torchrun`` environment) picks this rank's batches. Every rank returns the whole result."""
    runtime = runtime or Runtime.auto()
    shard = shard if shard is not None else shard_from_env()
    S = int(token_ids.shape[0])
    if S < 1:
        raise TgeomError("no sequence to analyse; pass a larger corpus or --max-windows-per-topic.")
    L, H = int(lm.summary.n_layers), int(lm.summary.n_heads)
    mask = attention_mask if attention_mask is not None else torch.ones_like(token_ids)
    lengths = [int(n) for n in mask.sum(1).tolist()]
    tables = {
        name: torch.zeros(S, L, H, dtype=torch.float64) for name in ("null_dim", "rank", "pearson")
    }
    sums = {name: torch.zeros(L, H, len(TOKEN_TYPES), dtype=torch.float64) for name in TYPE_SUMS}
    counts = {
        name: torch.zeros(size, dtype=torch.float64)
        for name, size in (("n_queries", 1), ("covered", S))
    }
    batch = runtime.batch_size
    for index in shard.indices(math.ceil(S / batch)).tolist():
        rows = slice(index * batch, min(S, (index + 1) * batch))
        part = effective_attention(lm, token_ids[rows], mask[rows], runtime)
        summary = part.summary
        part_nulls = NullSpaceResult.from_sequences(
            part.sequences, int(lm.summary.d_head), lm.summary.attention_windows
        )
        tables["pearson"][rows] = summary.pearson.values
        tables["null_dim"][rows] = part_nulls.null_dim.double()
        tables["rank"][rows] = part_nulls.rank.double()
        for name in TYPE_SUMS:
            sums[name] += summary.type_sums[name]
        counts["n_queries"] += summary.n_queries
        counts["covered"][rows] += 1
        del part, summary, part_nulls
    shard.all_reduce_sum({**tables, **{f"sum_{k}": v for k, v in sums.items()}, **counts})
    if not bool((counts["covered"] == 1).all()):  # every sequence exactly once, or no result
        raise TgeomError("the sharded survey did not cover every sequence exactly once.")
    nulls = NullSpaceResult(
        tables["null_dim"].long(),
        tables["rank"].long(),
        lengths,
        int(lm.summary.d_head),
        lm.summary.attention_windows,
    )
    summary = EffectiveSummary(
        PearsonTable(tables["pearson"], lengths),
        sums,
        int(counts["n_queries"].item()),
        int(lm.summary.d_head),
        bool(lm.summary.is_causal),
        lm.summary.attention_windows,
    )
    return nulls, summary
