"""Degenerate identifiability results say so (issue 21): no null space is possible when no
sequence is longer than d_head; token identifiability measured on a handful of test sequences.
Each warning appears on the degenerate input and not on an adequate one."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from test_ident_tokens_synthetic import orthogonal_layers_hidden

import tgeom.analyses.identifiability.identify as identify
from tgeom.analyses.identifiability import effective_attention, null_space_dims
from tgeom.analyses.identifiability.identify import MIN_TEST_SEQUENCES, token_identifiability
from tgeom.runtime import Runtime


def _ids(n: int, length: int, seed: int = 0) -> torch.Tensor:
    """``[n, length]`` ids without a repeat within a row (a rotary model's value vectors of a
    repeated token coincide: a null space below d_head, the exception the warning names)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([4 + torch.randperm(92, generator=gen)[:length] for _ in range(n)])


def test_effective_attention_warns_when_no_sequence_is_longer_than_d_head(tiny_model):
    lm = tiny_model("bert")  # d_head 8
    d_head = lm.summary.d_head
    short = effective_attention(lm, _ids(1, d_head))
    assert torch.equal(short.sequences[0].raw.double(), short.sequences[0].effective)
    assert short.pearson.values.min() > 1 - 1e-9  # what the warning says: Pearson is 1
    (line,) = short.warnings
    assert f"has {d_head} tokens" in line and f"d_head = {d_head}" in line
    assert "no null space" in line
    long = effective_attention(lm, _ids(1, d_head + 1))
    assert (long.sequences[0].null_dim == 1).all() and long.warnings == []


def test_null_space_survey_warns_only_when_every_sequence_is_short(tiny_model):
    lm = tiny_model("llama")
    d_head = lm.summary.d_head
    mask = torch.ones(3, d_head + 4, dtype=torch.long)
    mask[:, d_head:] = 0  # three sequences of d_head tokens, right padded
    short = null_space_dims(lm, _ids(3, d_head + 4, 1), mask)
    assert int(short.null_dim.max()) == 0
    (line,) = short.warnings
    assert f"every sequence has at most {d_head} tokens" in line
    mask[0, :] = 1  # one sequence longer than d_head: the survey can see a null space
    mixed = null_space_dims(lm, _ids(3, d_head + 4, 1), mask)
    assert int(mixed.null_dim[0].min()) == 4 and mixed.warnings == []


def _identify(n_sequences: int, monkeypatch) -> identify.IdentifiabilityResult:
    ids = _ids(n_sequences, 12, 2)
    hidden = orthogonal_layers_hidden(ids, d=8, n_layers=1)
    monkeypatch.setattr(
        identify, "iter_captures", lambda *a: iter([(0, SimpleNamespace(hidden=hidden))])
    )
    return token_identifiability(SimpleNamespace(), ids, g=("linear",), runtime=Runtime.auto())


def test_identifiability_warns_on_a_test_split_of_a_handful_of_sequences(monkeypatch):
    few = _identify(33, monkeypatch)  # 23 / 4 / 6
    assert few.options["n_sequences"]["test"] == 6 < MIN_TEST_SEQUENCES
    (line,) = few.warnings
    assert "test split of 6 sequences" in line and "at least 57 sequences" in line
    enough = _identify(57, monkeypatch)  # 39 / 8 / 10
    assert enough.options["n_sequences"]["test"] == 10 == MIN_TEST_SEQUENCES
    assert enough.warnings == []
