"""Behaviour scores of every head on text (SPEC section 7, "Behaviour on text"): the standard
attention-pattern scores, accumulated in float64 batch by batch from the model's own attention
probabilities ``A [B, H, T, T]`` (row = query position ``t``, column = key position ``s``).

- ``prev_token``: mean of ``A[t, t-1]`` over windows and real positions ``t >= 1``;
- ``first_token``: mean of ``A[t, 0]`` over windows and real positions ``t >= 0`` (a causal
  model's row 0 is 1 there: it sees only itself);
- ``entropy``: mean of the row entropy ``-sum_s A[t, s] log A[t, s]`` (nats) over real query
  positions;
- ``induction``: on sequences ``[prefix] x_1..x_R x_1..x_R [suffix]`` of ``R`` seeded random
  non-special tokens repeated twice (``prefix``/``suffix``: the special tokens the tokenizer
  puts around normal text, e.g. BOS, or CLS and SEP), mean of ``A[t, t-R+1]`` over the second
  copy: the token after the previous occurrence of the current token. Encoders report the same
  on their bidirectional attention.

The accumulators (:class:`TextBehaviour`, :class:`InductionScores`) keep raw sums in one
float64 tensor (``sums``) that ``torchrun`` ranks all-reduce before reading the scores
(:meth:`tgeom.capture.distributed.Shard.all_reduce_sum`); :func:`text_behaviour` and
:func:`induction_scores` run the forward passes themselves for callers that have no pass to
share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tgeom.capture.capture import stream_hidden
from tgeom.errors import TgeomError, check_index
from tgeom.runtime import Runtime

TEXT_SCORES = ("prev_token", "first_token", "entropy")
# columns of TextBehaviour.sums: each score's sum, then the count it is divided by
TEXT_SUMS = ("prev_token", "n_prev_token", "first_token", "n_first_token", "entropy", "n_rows")
INDUCTION_LENGTH = 32  # R: default random tokens per copy
INDUCTION_SEQUENCES = 16  # default number of repeated sequences
INDUCTION_SEED = 0


def _check_mask(attention_mask: Tensor | None, B: int, T: int, device: torch.device) -> Tensor:
    """``[B, T]`` float64 mask of real tokens (all ones when None); refuses left padding."""
    if attention_mask is None:
        return torch.ones(B, T, dtype=torch.float64, device=device)
    if attention_mask.shape != (B, T):
        raise TgeomError(f"the attention mask must be [B, T] = [{B}, {T}].")
    mask = attention_mask.to(device=device, dtype=torch.float64)
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise TgeomError("the attention mask must mark real tokens first (right padding).")
    return mask


@dataclass
class TextBehaviour:
    """Running float64 sums of ``prev_token``, ``first_token`` and ``entropy`` for every block and
    head: ``sums [L, H, 6]`` with the columns :data:`TEXT_SUMS` (each score's sum over windows
    and positions, then its count). Sums of disjoint sets of windows add up, so ranks all-reduce
    ``sums`` and read :meth:`scores` after."""

    sums: Tensor

    @classmethod
    def zeros(cls, n_blocks: int, n_heads: int) -> TextBehaviour:
        return cls(torch.zeros(n_blocks, n_heads, len(TEXT_SUMS), dtype=torch.float64))

    def update(self, block: int, attentions: Tensor, attention_mask: Tensor | None = None) -> None:
        """Add one batch of block ``block``'s attention probabilities ``attentions [B, H, T, T]``
        (rows sum to 1 over the keys a query sees); ``attention_mask [B, T]``: 1 for real tokens
        (right padding), None when every token is real."""
        check_index("block", block, self.sums.shape[0])
        B, H, T, T2 = attentions.shape
        n_heads = self.sums.shape[1]
        if T != T2 or n_heads != H:
            raise TgeomError(f"attention probabilities must be [B, {n_heads}, T, T].")
        A = attentions.detach()
        real = _check_mask(attention_mask, B, T, A.device)  # [B, T]
        pairs = real[:, 1:] * real[:, :-1]  # query t >= 1 and key t - 1 both real
        diagonal = A.diagonal(offset=-1, dim1=-2, dim2=-1).double()  # [B, H, T - 1]
        prev = (diagonal * pairs[:, None]).sum((0, 2))  # [H]
        first = (A[..., 0].double() * real[:, None] * real[:, :1, None]).sum((0, 2))
        entropy = torch.stack([self._entropy(A[:, h].double(), real) for h in range(H)])
        n_pairs, n_rows = pairs.sum(), (real * real[:, :1]).sum()
        counts = torch.stack([n_pairs, n_rows, real.sum()]).expand(H, 3)
        part = torch.stack([prev, counts[:, 0], first, counts[:, 1], entropy, counts[:, 2]], -1)
        self.sums[block] += part.to(self.sums.device)

    @staticmethod
    def _entropy(A: Tensor, real: Tensor) -> Tensor:
        """Sum of the row entropies of one head's ``A [B, T, T]`` (float64) over the real query
        rows ``real [B, T]``; one head at a time, so the float64 copy is ``B T^2``, not
        ``B H T^2``."""
        return -(torch.special.xlogy(A, A).sum(-1) * real).sum()

    def scores(self) -> dict[str, Tensor]:
        """``{"prev_token", "first_token", "entropy"}``, each ``[L, H]`` float64 (NaN where no
        position was seen)."""
        s = self.sums
        return {name: s[..., 2 * i] / s[..., 2 * i + 1] for i, name in enumerate(TEXT_SCORES)}


@dataclass(frozen=True)
class InductionBatch:
    """Sequences ``token_ids [N, T]`` int64 of ``length`` (R) random tokens repeated twice, the
    first copy starting at position ``start`` (after the tokenizer's prefix, e.g. BOS), drawn
    with ``seed`` from ``pool_size`` non-special tokens (distinct within a sequence)."""

    token_ids: Tensor
    start: int
    length: int
    seed: int
    pool_size: int

    @property
    def second_copy(self) -> Tensor:
        """The query positions ``t`` of the second copy, ``[R]`` int64."""
        first = self.start + self.length
        return torch.arange(first, first + self.length)

    def to_json(self) -> dict[str, Any]:
        return {
            "induction_length": self.length,
            "n_sequences": int(self.token_ids.shape[0]),
            "seq_len": int(self.token_ids.shape[1]),
            "first_copy_start": self.start,
            "seed": self.seed,
            "pool_size": self.pool_size,
        }


def induction_batch(
    lm: Any,
    length: int = INDUCTION_LENGTH,
    n_sequences: int = INDUCTION_SEQUENCES,
    seed: int = INDUCTION_SEED,
    pool: Tensor | None = None,
) -> InductionBatch:
    """``n_sequences`` sequences ``[prefix] x_1..x_R x_1..x_R [suffix]`` of ``R = length`` tokens
    drawn (seeded, distinct within a sequence) from ``pool`` (int64 ids; default: every
    non-special token the tokenizer knows); ``prefix``/``suffix`` are the special tokens the
    tokenizer adds around normal text (SmolLM2: none; Gemma: BOS; BERT: CLS and SEP).
    Refuses ``length < 2``, a sequence longer than the model's context, and a pool smaller
    than ``length``, one line each."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise TgeomError(f"--induction-length must be an integer of at least 2, got {length!r}.")
    if isinstance(n_sequences, bool) or not isinstance(n_sequences, int) or n_sequences < 1:
        raise TgeomError(f"the number of induction sequences must be >= 1, got {n_sequences!r}.")
    prefix, suffix = _special_frame(lm.tokenizer)
    total = len(prefix) + 2 * length + len(suffix)
    n_ctx = int(lm.summary.n_ctx)
    if total > n_ctx:
        most = (n_ctx - len(prefix) - len(suffix)) // 2
        raise TgeomError(
            f"--induction-length {length} is beyond the context: 2 x {length} tokens"
            f"{' plus special tokens' if prefix or suffix else ''} exceed the model's {n_ctx} "
            f"positions; pass at most {most}."
        )
    if pool is None:
        known = min(int(lm.summary.vocab_size), len(lm.tokenizer))
        keep = torch.ones(known, dtype=torch.bool)
        keep[[i for i in lm.special_token_ids() if i < known]] = False
        pool = keep.nonzero()[:, 0]
    pool = torch.as_tensor(pool, dtype=torch.int64).reshape(-1)
    if len(pool) < length:
        raise TgeomError(
            f"only {len(pool)} tokens to draw from, fewer than --induction-length {length}."
        )
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_sequences):
        draw = pool[torch.randperm(len(pool), generator=generator)[:length]].tolist()
        rows.append(prefix + draw + draw + suffix)
    return InductionBatch(
        torch.tensor(rows, dtype=torch.int64), len(prefix), length, seed, len(pool)
    )


def _special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after normal text, found by encoding
    a word with and without special tokens."""
    text = "the"
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer(text)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i]), list(full[i + len(plain) :])
    return [], []


@dataclass
class InductionScores:
    """Running float64 sums of ``A[t, t-R+1]`` over the second copy of an
    :class:`InductionBatch`: ``sums [L, H, 2]`` (the sum, then the number of queries)."""

    sums: Tensor
    start: int
    length: int

    @classmethod
    def zeros(cls, n_blocks: int, n_heads: int, batch: InductionBatch) -> InductionScores:
        sums = torch.zeros(n_blocks, n_heads, 2, dtype=torch.float64)
        return cls(sums, batch.start, batch.length)

    def update(self, block: int, attentions: Tensor) -> None:
        """Add block ``block``'s attention probabilities ``[B, H, T, T]`` on a batch of rows of
        the induction sequences."""
        check_index("block", block, self.sums.shape[0])
        R, first = self.length, self.start + self.length
        queries = torch.arange(first, first + R, device=attentions.device)
        hits = attentions[:, :, queries, queries - R + 1].double()  # [B, H, R]
        B = attentions.shape[0]
        part = torch.stack([hits.sum((0, 2)), hits.new_full((hits.shape[1],), float(B * R))], -1)
        self.sums[block] += part.to(self.sums.device)

    def scores(self) -> Tensor:
        """``induction [L, H]`` float64."""
        return self.sums[..., 0] / self.sums[..., 1]


def _attention_passes(
    lm: Any,
    token_ids: Tensor,
    attention_mask: Tensor | None,
    runtime: Runtime | None,
    sink: Any,
) -> None:
    """Forward ``token_ids [N, T]`` batch by batch, handing ``sink(block, A, mask)`` each block's
    attention probabilities ``A [B, H, T, T]`` and the batch's mask (or None)."""
    batch = (runtime or Runtime.auto()).batch_size
    for start in range(0, token_ids.shape[0], batch):
        rows = slice(start, start + batch)
        mask = None if attention_mask is None else attention_mask[rows]

        def hand(block: int, A: Tensor, mask: Tensor | None = mask) -> None:
            sink(block, A, mask)

        stream_hidden(
            lm, token_ids[rows], lambda *_: None, mask, attentions=True, attention_weights=hand
        )


def text_behaviour(
    lm: Any,
    token_ids: Tensor,
    attention_mask: Tensor | None = None,
    runtime: Runtime | None = None,
) -> TextBehaviour:
    """``prev_token``, ``first_token`` and ``entropy`` sums of every head over the windows
    ``token_ids [N, T]`` (one forward pass per batch of ``runtime.batch_size``)."""
    acc = TextBehaviour.zeros(int(lm.summary.n_blocks), int(lm.summary.n_heads))
    _attention_passes(lm, token_ids, attention_mask, runtime, acc.update)
    return acc


def induction_scores(
    lm: Any, batch: InductionBatch, runtime: Runtime | None = None
) -> InductionScores:
    """``induction`` sums of every head on ``batch`` (:func:`induction_batch`)."""
    acc = InductionScores.zeros(int(lm.summary.n_blocks), int(lm.summary.n_heads), batch)
    _attention_passes(lm, batch.token_ids, None, runtime, lambda b, A, _m: acc.update(b, A))
    return acc
