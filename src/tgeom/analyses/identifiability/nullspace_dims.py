"""Left null-space dimension of every attention head per sequence [BRU] (SPEC section 5):
``dim = d_s - rank(V W_O[h])`` over the real tokens (value bias included), float64, relative
tolerance; generic heads give ``max(0, d_s - d_head)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tgeom.analyses.identifiability.effective import effective_attention_batch
from tgeom.analyses.identifiability.sequences import null_space_warnings
from tgeom.results import results_frame
from tgeom.runtime import Runtime

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class NullSpaceResult:
    """``null_dim, rank [S, L, H]`` (int64) and the sequence lengths ``d_s`` ``[S]``."""

    null_dim: Tensor
    rank: Tensor
    lengths: list[int]
    d_head: int

    @classmethod
    def from_sequences(cls, sequences: list[Any], d_head: int) -> NullSpaceResult:
        """From :class:`~tgeom.analyses.identifiability.effective.SequenceAttention` objects."""
        return cls(
            torch.stack([s.null_dim for s in sequences]),
            torch.stack([s.rank for s in sequences]),
            [len(s.token_ids) for s in sequences],
            d_head,
        )

    @property
    def warnings(self) -> list[str]:
        """One line when no sequence is longer than ``d_head`` (no null space possible)."""
        return null_space_warnings(self.lengths, self.d_head)

    def by_length(self) -> list[dict[str, Any]]:
        """Per distinct length: mean null dimension ``[L][H]`` over its sequences."""
        rows = []
        for n in sorted(set(self.lengths)):
            idx = [s for s, m in enumerate(self.lengths) if m == n]
            mean = self.null_dim[idx].double().mean(0)
            rows.append(
                {
                    "length": n,
                    "n_sequences": len(idx),
                    "expected_generic": max(0, n - self.d_head),
                    "mean_null_dim": mean.tolist(),
                }
            )
        return rows

    def to_json(self) -> dict[str, Any]:
        _, L, H = self.null_dim.shape
        lengths = torch.tensor(self.lengths)
        return {
            "d_head": self.d_head,
            "lengths": self.lengths,
            "heads": [
                {
                    "layer": layer,
                    "head": h,
                    "null_dim": self.null_dim[:, layer, h].tolist(),
                    "mean_null_dim": float(self.null_dim[:, layer, h].double().mean()),
                    "share_generic": float(
                        (self.null_dim[:, layer, h] == (lengths - self.d_head).clamp_min(0))
                        .double()
                        .mean()
                    ),
                }
                for layer in range(L)
                for h in range(H)
            ],
            "by_length": self.by_length(),
            "expected_generic": "max(0, length - d_head)",
        }

    def to_frame(self, table: str = "heads") -> pd.DataFrame:
        """``heads`` (one row per layer and head; ``null_dim`` per sequence as a list cell) or
        ``by_length`` (one row per sequence length) as a DataFrame."""
        return results_frame(self.to_json(), table, ("heads", "by_length"))


def null_space_dims(
    lm: Any,
    token_ids: Tensor,
    attention_mask: Tensor | None = None,
    runtime: Runtime | None = None,
) -> NullSpaceResult:
    """Null-space dimension of every head for every sequence of ``token_ids [N, T]`` (right
    padding marked by ``attention_mask``; no attention matrices are formed)."""
    runtime = runtime or Runtime.auto()
    sequences = []
    for start in range(0, token_ids.shape[0], runtime.batch_size):
        stop = start + runtime.batch_size
        mask = attention_mask[start:stop] if attention_mask is not None else None
        sequences += effective_attention_batch(
            lm, token_ids[start:stop], mask, need_attention=False
        )
    return NullSpaceResult.from_sequences(sequences, lm.summary.d_head)
