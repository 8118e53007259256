"""Behaviour scores on text: equal to a brute-force loop over the model's own attention, and
sums that add up over disjoint windows (SPEC section 7)."""

from __future__ import annotations

import math

import pytest
import torch

from tgeom.analyses.heads.behaviour import (
    TextBehaviour,
    induction_batch,
    induction_scores,
    text_behaviour,
)
from tgeom.capture import capture
from tgeom.errors import TgeomError
from tgeom.runtime import Runtime


def padded_windows(V: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """5 windows of 12 random non-special tokens, right-padded to lengths 12, 9, 12, 5, 2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (5, 12), generator=g)
    mask = torch.zeros(5, 12, dtype=torch.int64)
    for row, n in enumerate([12, 9, 12, 5, 2]):
        mask[row, :n] = 1
    return ids * mask, mask  # padding id 0


def brute_force(A: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``A [L, B, H, T, T]``: the three scores [L, H] by plain loops over windows and positions."""
    L, B, H = A.shape[:3]
    out = {k: torch.zeros(L, H, dtype=torch.float64) for k in ("prev", "first", "entropy")}
    for layer in range(L):
        for h in range(H):
            prev, first, ent = [], [], []
            for b in range(B):
                n = int(mask[b].sum())
                for t in range(n):
                    row = A[layer, b, h, t, :n].double()
                    first.append(float(row[0]))
                    ent.append(-sum(float(p) * math.log(float(p)) for p in row if p > 0))
                    if t >= 1:
                        prev.append(float(row[t - 1]))
            out["prev"][layer, h] = sum(prev) / len(prev)
            out["first"][layer, h] = sum(first) / len(first)
            out["entropy"][layer, h] = sum(ent) / len(ent)
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_text_scores_equal_a_brute_force_loop(tiny_model, family):
    lm = tiny_model(family)
    ids, mask = padded_windows(lm.summary.vocab_size)
    A = capture(lm, ids, mask, attentions=True).attentions
    assert A is not None
    want = brute_force(A, mask)
    got = text_behaviour(lm, ids, mask, Runtime(torch.device("cpu"), batch_size=2)).scores()
    for ours, theirs in (("prev_token", "prev"), ("first_token", "first"), ("entropy", "entropy")):
        assert torch.allclose(got[ours], want[theirs], atol=1e-9, rtol=0), ours


def test_sums_of_disjoint_windows_add_up(tiny_model):
    """What torchrun's all-reduce relies on: the sums of two halves are the whole's sums."""
    lm = tiny_model("llama")
    ids, mask = padded_windows(lm.summary.vocab_size, seed=1)
    whole = text_behaviour(lm, ids, mask)
    parts = [text_behaviour(lm, ids[rows], mask[rows]) for rows in (slice(0, 2), slice(2, 5))]
    assert torch.allclose(parts[0].sums + parts[1].sums, whole.sums, atol=1e-12)
    assert whole.sums.dtype == torch.float64


def test_text_behaviour_refuses_bad_input(tiny_model):
    acc = TextBehaviour.zeros(2, 4)
    A = torch.full((1, 4, 3, 3), 1 / 3)
    with pytest.raises(TgeomError, match="right padding"):
        acc.update(0, A, torch.tensor([[0, 1, 1]]))
    with pytest.raises(TgeomError, match=r"\[B, 4, T, T\]"):
        acc.update(0, torch.full((1, 3, 3, 3), 1 / 3))
    with pytest.raises(TgeomError, match="out of range"):
        acc.update(2, A)


def test_induction_batch_repeats_seeded_non_special_tokens(tiny_model):
    lm = tiny_model("gpt2")
    batch = induction_batch(lm, 10, 6, seed=3)
    ids = batch.token_ids
    assert ids.shape == (6, 20) and ids.dtype == torch.int64 and batch.start == 0
    assert torch.equal(ids[:, :10], ids[:, 10:])
    assert not set(ids.flatten().tolist()) & set(lm.special_token_ids())
    assert all(len(set(row[:10])) == 10 for row in ids.tolist())  # distinct within a copy
    assert torch.equal(induction_batch(lm, 10, 6, seed=3).token_ids, ids)
    assert not torch.equal(induction_batch(lm, 10, 6, seed=4).token_ids, ids)
    assert batch.second_copy.tolist() == list(range(10, 20))


def test_induction_equals_a_brute_force_loop(tiny_model):
    lm = tiny_model("qwen3")  # QK-norm, a windowed layer (window 4 < R: that layer scores 0)
    batch = induction_batch(lm, 7, 5, seed=0)
    A = capture(lm, batch.token_ids, attentions=True).attentions
    assert A is not None
    R = batch.length
    want = torch.zeros(A.shape[0], A.shape[2], dtype=torch.float64)
    for layer in range(A.shape[0]):
        for h in range(A.shape[2]):
            hits = [
                float(A[layer, b, h, t, t - R + 1])
                for b in range(A.shape[1])
                for t in range(batch.start + R, batch.start + 2 * R)
            ]
            want[layer, h] = sum(hits) / len(hits)
    got = induction_scores(lm, batch, Runtime(torch.device("cpu"), batch_size=2)).scores()
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    assert float(got[1].abs().max()) == 0.0  # layer 1 sees only the last 4 keys


@pytest.mark.parametrize(
    ("length", "message"),
    [
        (1, "at least 2"),
        (0, "at least 2"),
        (33, "beyond the context.*at most 32"),  # 2 x 33 > 64 positions
    ],
)
def test_induction_length_is_checked(tiny_model, length, message):
    with pytest.raises(TgeomError, match=message):
        induction_batch(tiny_model("gpt2"), length)


def test_induction_pool_must_hold_a_sequence(tiny_model):
    with pytest.raises(TgeomError, match="only 5 tokens"):
        induction_batch(tiny_model("gpt2"), 8, pool=torch.arange(10, 15))


@pytest.mark.slow
def test_induction_batch_frames_like_normal_text(minilm, smollm2):
    """BERT: [CLS] x x [SEP], as its tokenizer frames text; SmolLM2 adds nothing."""
    bert = induction_batch(minilm, 5, 2)
    cls, sep = minilm.tokenizer.cls_token_id, minilm.tokenizer.sep_token_id
    assert bert.start == 1 and bert.token_ids.shape == (2, 12)
    assert (bert.token_ids[:, 0] == cls).all() and (bert.token_ids[:, -1] == sep).all()
    assert torch.equal(bert.token_ids[:, 1:6], bert.token_ids[:, 6:11])
    smol = induction_batch(smollm2, 5, 2)
    assert smol.start == 0 and smol.token_ids.shape == (2, 10)
    with pytest.raises(TgeomError, match="at most 255"):
        induction_batch(minilm, 256)  # 512 positions, 2 of them for CLS and SEP
