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
    SequenceAttention,
    effective_attention_batch,
    effective_result,
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
    survey = SurveyAccumulator(lm, token_ids, attention_mask)
    for rows in survey.batches(runtime.batch_size, shard):
        survey.add(rows, effective_attention_batch(lm, token_ids[rows], survey.mask[rows]))
    return survey.result(shard)


class SurveyAccumulator:
    """The survey's per-sequence tables and token-type sums, filled batch by batch from each
    batch's :class:`SequenceAttention` (:func:`effective_attention_batch`, or the hooks of
    :func:`~tgeom.analyses.identifiability.effective.effective_attention_hooks` on a forward
    pass shared with other analyses); :meth:`result` all-reduces them over a job's ranks.

    ``token_ids [S, T]``, ``attention_mask [S, T]`` (right padding; default all real)."""

    def __init__(self, lm: Any, token_ids: Tensor, attention_mask: Tensor | None = None) -> None:
        S = int(token_ids.shape[0])
        if S < 1:
            raise TgeomError(
                "no sequence to analyse; pass a larger corpus or --max-windows-per-topic."
            )
        self.lm = lm
        L, H = int(lm.summary.n_layers), int(lm.summary.n_heads)
        self.mask = attention_mask if attention_mask is not None else torch.ones_like(token_ids)
        self.lengths = [int(n) for n in self.mask.sum(1).tolist()]
        self.tables = {
            name: torch.zeros(S, L, H, dtype=torch.float64)
            for name in ("null_dim", "rank", "pearson")
        }
        self.sums = {
            name: torch.zeros(L, H, len(TOKEN_TYPES), dtype=torch.float64) for name in TYPE_SUMS
        }
        self.counts = {
            name: torch.zeros(size, dtype=torch.float64)
            for name, size in (("n_queries", 1), ("covered", S))
        }

    def batches(self, batch_size: int, shard: Shard) -> list[slice]:
        """The rows of this rank's batches: whole batches of ``batch_size``, the very batches
        one process would form, spread over the ranks."""
        S = len(self.lengths)
        return [
            slice(index * batch_size, min(S, (index + 1) * batch_size))
            for index in shard.indices(math.ceil(S / batch_size)).tolist()
        ]

    def add(self, rows: slice, sequences: list[SequenceAttention]) -> None:
        """Summarise the sequences of ``rows`` (their attention is not kept)."""
        lm = self.lm
        summary = effective_result(lm, sequences).summary
        part_nulls = NullSpaceResult.from_sequences(
            sequences, int(lm.summary.d_head), lm.summary.attention_windows
        )
        self.tables["pearson"][rows] = summary.pearson.values
        self.tables["null_dim"][rows] = part_nulls.null_dim.double()
        self.tables["rank"][rows] = part_nulls.rank.double()
        for name in TYPE_SUMS:
            self.sums[name] += summary.type_sums[name]
        self.counts["n_queries"] += summary.n_queries
        self.counts["covered"][rows] += 1

    def result(self, shard: Shard) -> tuple[NullSpaceResult, EffectiveSummary]:
        """All-reduce over ``shard``'s job (float64; rows of other ranks are zero) and return
        the whole survey; refused unless every sequence was added exactly once."""
        tables, sums, counts, lm = self.tables, self.sums, self.counts, self.lm
        shard.all_reduce_sum({**tables, **{f"sum_{k}": v for k, v in sums.items()}, **counts})
        if not bool((counts["covered"] == 1).all()):  # every sequence exactly once, or no result
            raise TgeomError("the sharded survey did not cover every sequence exactly once.")
        nulls = NullSpaceResult(
            tables["null_dim"].long(),
            tables["rank"].long(),
            self.lengths,
            int(lm.summary.d_head),
            lm.summary.attention_windows,
        )
        summary = EffectiveSummary(
            PearsonTable(tables["pearson"], self.lengths),
            sums,
            int(counts["n_queries"].item()),
            int(lm.summary.d_head),
            bool(lm.summary.is_causal),
            lm.summary.attention_windows,
        )
        return nulls, summary
