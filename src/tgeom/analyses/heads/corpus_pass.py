"""One forward pass per batch over a corpus' windows, feeding every per-head corpus score at once
(SPEC section 7): the identifiability survey [BRU] (null dimension, Pearson(raw, effective),
attention to the first token, raw and effective), the behaviour scores (attention probabilities
``[B, H, T, T]`` of each block) and the [SZ] key-side variance split (each block's input hidden
states ``[B, T, d]``, read against the geometry statistics collected before).

Under ``torchrun`` each rank takes whole batches (those one process would form, as the survey
does) and the float64 sums are all-reduced, so every rank holds the whole result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from tgeom.analyses.geometry.keyside import KeySideSplit
from tgeom.analyses.geometry.stats import GeometryStats
from tgeom.analyses.heads.behaviour import TextBehaviour
from tgeom.analyses.identifiability.effective import EffectiveSummary, effective_attention_hooks
from tgeom.analyses.identifiability.nullspace_dims import NullSpaceResult
from tgeom.analyses.identifiability.survey import SurveyAccumulator
from tgeom.capture import stream_hidden
from tgeom.capture.distributed import Shard
from tgeom.runtime import Runtime

SPLIT_PARTS = ("positional", "content", "scale", "cross")


class BlockAccumulator(Protocol):
    """A streaming per-head statistic fed block by block during the shared forward pass."""

    def update(self, block: int, tensor: Tensor) -> None:
        """Fold block ``block``'s tensor of one batch (attention ``[B, H, T, T]`` or input
        hidden states ``[B, T, d]``)."""

    def running_sums(self) -> dict[str, Tensor]:
        """Its float64 sums over windows, by name (all-reduced in place by a sharded job)."""
        ...

    def scores(self) -> dict[str, Tensor]:
        """Its per-head columns, by heads.csv name, each ``[L, H]`` float64."""
        ...


@dataclass
class CorpusHeadScores:
    """What the shared pass gives, for every block and head: ``columns`` by heads.csv name,
    each ``[L, H]`` float64 (NaN where a score was not computed), and the survey's own results
    (``nulls``, ``effective``) for the per-sequence detail."""

    columns: dict[str, Tensor]
    nulls: NullSpaceResult
    effective: EffectiveSummary
    n_windows: int
    seq_len: int
    warnings: list[str] = field(default_factory=list)


class _Behaviour:
    """:class:`~tgeom.analyses.heads.behaviour.TextBehaviour` as a :class:`BlockAccumulator`
    (windows have no padding)."""

    def __init__(self, lm: Any) -> None:
        self.acc = TextBehaviour.zeros(int(lm.summary.n_layers), int(lm.summary.n_heads))

    def update(self, block: int, tensor: Tensor) -> None:
        self.acc.update(block, tensor)

    def running_sums(self) -> dict[str, Tensor]:
        return {"sums": self.acc.sums}

    def scores(self) -> dict[str, Tensor]:
        return self.acc.scores()


def behaviour_accumulator(lm: Any) -> BlockAccumulator:
    """``prev_token``, ``first_token`` and ``entropy`` (analyses/heads/behaviour.py), fed with
    each block's attention probabilities."""
    return _Behaviour(lm)


class _KeySide:
    """:class:`~tgeom.analyses.geometry.keyside.KeySideSplit` as a :class:`BlockAccumulator`
    (windows have no padding)."""

    def __init__(self, split: KeySideSplit) -> None:
        self.split = split

    def update(self, block: int, tensor: Tensor) -> None:
        self.split.update(block, tensor)

    def running_sums(self) -> dict[str, Tensor]:
        return {"sums": self.split.sums}

    def scores(self) -> dict[str, Tensor]:
        shares = self.split.shares()
        blocks = sorted(shares)
        return {part: torch.stack([shares[b][part] for b in blocks]) for part in self.split.parts}


def key_split_accumulator(lm: Any, stats: GeometryStats) -> BlockAccumulator:
    """The key-side variance split (``positional``, ``content``, ``scale``, ``cross``, and
    ``alibi`` for ALiBi models) of every block, fed with each block's input hidden states and
    read against ``stats`` (:class:`~tgeom.analyses.geometry.keyside.KeySideSplit`)."""
    cw = lm.weights()
    return _KeySide(KeySideSplit(cw, stats, list(range(len(cw.layers)))))


@torch.no_grad()
def corpus_pass(
    lm: Any,
    token_ids: Tensor,
    stats: GeometryStats | None,
    runtime: Runtime,
    shard: Shard,
) -> CorpusHeadScores:
    """Run ``lm`` once over ``token_ids [S, T]`` (full windows, no padding) in batches of
    ``runtime.batch_size``, feeding the survey, the behaviour accumulator and the key-side
    split (the latter needs ``stats``, the geometry statistics of the same corpus)."""
    L, H = int(lm.summary.n_layers), int(lm.summary.n_heads)
    survey = SurveyAccumulator(lm, token_ids)
    behaviour = behaviour_accumulator(lm)
    split = key_split_accumulator(lm, stats) if stats is not None else None
    first = {name: torch.zeros(L, H, dtype=torch.float64) for name in ("raw", "effective")}
    n_queries = torch.zeros(1, dtype=torch.float64)
    for rows in survey.batches(runtime.batch_size, shard):
        ids = token_ids[rows]
        hooks = effective_attention_hooks(lm, ids)

        def attention(block: int, A: Tensor, hooks: Any = hooks) -> None:
            hooks.attention(block, A)
            if behaviour is not None:
                behaviour.update(block, A)

        def fold(index: int, hidden: Tensor) -> None:
            if split is not None and index < L:  # hidden state b is block b's input
                split.update(index, hidden)

        stream_hidden(
            lm,
            ids,
            fold,
            attentions=True,
            values=hooks.values,
            attention_weights=attention,
        )
        sequences = hooks.finish()
        for seq in sequences:  # attention every query gives to the window's first token
            first["raw"] += seq.raw[..., 0].double().sum(-1)
            first["effective"] += seq.effective[..., 0].sum(-1)
            n_queries += seq.raw.shape[-1]
        survey.add(rows, sequences)
    sums = {f"first_{k}": v for k, v in first.items()} | {"first_n_queries": n_queries}
    for name, acc in (("behaviour", behaviour), ("split", split)):
        if acc is not None:
            sums |= {f"{name}.{k}": v for k, v in acc.running_sums().items()}
    shard.all_reduce_sum(sums)
    nulls, effective = survey.result(shard)
    columns = {
        "null_dim": nulls.null_dim.double().mean(0),
        "pearson_raw_effective": effective.pearson.values.nanmean(0),
        "first_token_raw": first["raw"] / n_queries,
        "first_token_effective": first["effective"] / n_queries,
    }
    warnings = list(nulls.warnings)
    columns |= behaviour.scores()
    if split is None:  # no statistics given
        columns |= {name: torch.full((L, H), float("nan")) for name in SPLIT_PARTS}
    else:
        columns |= split.scores()
        cancel = (columns["cross"] < -1).nonzero().tolist()
        if cancel:
            heads = ", ".join(f"{b}:{h}" for b, h in cancel)
            warnings.append(
                f"heads (layer:head) {heads} have cross < -1: their key-side parts vary more "
                "than the logit and cancel, so their shares exceed 1 and do not partition the "
                "logit's variance"
            )
    return CorpusHeadScores(
        columns, nulls, effective, int(token_ids.shape[0]), int(token_ids.shape[1]), warnings
    )
