"""Left null-space dimension of every attention head per sequence [BRU] (SPEC section 5):
``dim = d_s - rank(V W_O[h])`` over the real tokens (value bias included), float64, relative
tolerance; generic heads give ``max(0, d_s - d_head)``.

Sliding-window layers (SPEC section 1): query ``i`` sees only the ``m_i = min(i + 1, w)`` keys of
its window, so it has a null dimension of its own, ``m_i - rank(T[i-m_i+1:i+1])``. A windowed
head's ``null_dim`` on a sequence is the largest over its queries (``rank``: the rank of the last
query window attaining it), so generic heads give ``max(0, min(d_s, w) - d_head)``; for every
other head the same rule gives ``d_s - rank(T)`` (a prefix's null dimension never falls as keys
are added). ``expected_generic`` is therefore per layer."""

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
    """``null_dim, rank [S, L, H]`` (int64), the sequence lengths ``d_s`` ``[S]`` and the
    layers' sliding windows (``summary.attention_windows``: keys per query, 0 = global; ``()``:
    none)."""

    null_dim: Tensor
    rank: Tensor
    lengths: list[int]
    d_head: int
    windows: tuple[int, ...] = ()

    @classmethod
    def from_sequences(
        cls, sequences: list[Any], d_head: int, windows: tuple[int, ...] = ()
    ) -> NullSpaceResult:
        """From :class:`~tgeom.analyses.identifiability.effective.SequenceAttention` objects."""
        return cls(
            torch.stack([s.null_dim for s in sequences]),
            torch.stack([s.rank for s in sequences]),
            [len(s.token_ids) for s in sequences],
            d_head,
            windows,
        )

    @property
    def warnings(self) -> list[str]:
        """One line when no sequence (or no window of some layers) is longer than ``d_head``
        (no null space possible there)."""
        return null_space_warnings(self.lengths, self.d_head, self.windows)

    def expected_generic(self, lengths: Tensor) -> Tensor:
        """``[len(lengths), L]``: a generic head's null dimension, ``max(0, min(d_s, w) -
        d_head)`` (``w = d_s`` for global layers)."""
        L = self.null_dim.shape[1]
        windows = torch.tensor(self.windows or (0,) * L)
        seen = lengths[:, None].clone().expand(-1, L)
        seen = torch.where(windows > 0, torch.minimum(seen, windows), seen)
        return (seen - self.d_head).clamp_min(0)

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
                    "expected_generic": self.expected_generic(torch.tensor([n]))[0].tolist(),
                    "mean_null_dim": mean.tolist(),
                }
            )
        return rows

    def to_json(self) -> dict[str, Any]:
        _, L, H = self.null_dim.shape
        generic = self.expected_generic(torch.tensor(self.lengths))  # [S, L]
        return {
            "n_blocks": int(L),
            "d_head": self.d_head,
            "lengths": self.lengths,
            "attention_windows": list(self.windows or (0,) * L),
            "heads": [
                {
                    "block": block,
                    "head": h,
                    "null_dim": self.null_dim[:, block, h].tolist(),
                    "mean_null_dim": float(self.null_dim[:, block, h].double().mean()),
                    "share_generic": float(
                        (self.null_dim[:, block, h] == generic[:, block]).double().mean()
                    ),
                }
                for block in range(L)
                for h in range(H)
            ],
            "by_length": self.by_length(),
            "expected_generic": "max(0, min(length, window) - d_head) per block (window = "
            "length for global blocks)",
            "null_dim_definition": "length - rank(V W_O[h]); sliding-window blocks: the largest "
            "over queries of (keys in the query's window - rank of T on those keys), with the "
            "rank of the last query attaining it",
        }

    def to_frame(self, table: str = "heads") -> pd.DataFrame:
        """``heads`` (one row per block and head; ``null_dim`` per sequence as a list cell) or
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
    return NullSpaceResult.from_sequences(
        sequences, lm.summary.d_head, lm.summary.attention_windows
    )
