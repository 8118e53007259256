"""The report's default sizes give results that mean what their names say (no warnings of
their own making), on the CPU and on the GPU, and the sizes the rule derives from a model's
architecture are the ones the rule states (README, 'The report')."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from tgeom.analyses.geometry.measure import design_warnings
from tgeom.analyses.identifiability.identify import MIN_TEST_SEQUENCES, min_sequences, split_sizes
from tgeom.analyses.identifiability.sequences import null_space_warnings
from tgeom.report.build import AUTO, CPU_ATLAS_WORK, ReportOptions

# The offline real models' architectures as SPEC section 1 states them (the rule reads these).
REAL = {
    "minilm": SimpleNamespace(
        n_blocks=6, n_heads=12, d_head=32, vocab_size=30522, n_ctx=512, attention_windows=()
    ),
    "smollm2": SimpleNamespace(
        n_blocks=30, n_heads=9, d_head=64, vocab_size=49152, n_ctx=8192, attention_windows=()
    ),
    "gemma3": SimpleNamespace(
        n_blocks=18,
        n_heads=4,
        d_head=256,
        vocab_size=262144,
        n_ctx=32768,
        attention_windows=(512,) * 5 + (0,) + (512,) * 5 + (0,) + (512,) * 5 + (0,),
    ),
}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_default_identification_split_has_enough_test_sequences(device: str) -> None:
    options = ReportOptions.for_device(device)
    assert options.identify_sequences >= min_sequences((0.7, 0.15, 0.15), MIN_TEST_SEQUENCES)


def largest_atlas_vocab_by_search(summary: SimpleNamespace) -> int:
    """The stated rule by brute force: the largest multiple of 128 whose atlas work fits."""
    work = summary.n_blocks * summary.n_heads * summary.d_head
    n = 0
    while (n + 128) ** 2 * work <= CPU_ATLAS_WORK:
        n += 128
    return min(4096, summary.vocab_size, max(1024, n))


@pytest.mark.parametrize("model", sorted(REAL))
def test_cpu_sizes_follow_the_stated_rule(model: str) -> None:
    summary = REAL[model]
    base = ReportOptions.for_device("cpu")
    assert AUTO in (base.atlas_vocab, base.null_seq_len, base.null_sequences)
    sized = base.sized_for(summary)
    assert sized.atlas_vocab == largest_atlas_vocab_by_search(summary)
    assert sized.null_seq_len == min(summary.n_ctx, max(base.seq_len, 2 * summary.d_head))
    ratio = (base.seq_len / sized.null_seq_len) ** 2
    assert sized.null_sequences == max(16, int(base.identify_sequences * ratio))
    # fixed options are left alone, explicit sizes win over the rule
    assert replace(sized, atlas_vocab=base.atlas_vocab, null_seq_len=AUTO) != sized
    chosen = replace(base, atlas_vocab=100, null_seq_len=40, null_sequences=9).sized_for(summary)
    assert (chosen.atlas_vocab, chosen.null_seq_len, chosen.null_sequences) == (100, 40, 9)


def test_gemma3_sizes():
    """Gemma 3 (d_head 256): a 3,840-token atlas (its work 18 x 4 x 256 x N^2 within
    SmolLM2's at 4,096) and 16 null-space sequences reaching 512 tokens, twice d_head."""
    sized = ReportOptions.for_device("cpu").sized_for(REAL["gemma3"])
    assert (sized.atlas_vocab, sized.null_seq_len, sized.null_sequences) == (3840, 512, 16)
    smollm2 = ReportOptions.for_device("cpu").sized_for(REAL["smollm2"])
    assert smollm2.atlas_vocab == 4096  # the reference work itself


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("model", sorted(REAL))
def test_sized_defaults_meet_the_statistical_minimums(model: str, device: str) -> None:
    """No warning of the defaults' own making, for each real model: a test split of at least
    10 sequences, null-space sequences longer than d_head (also in the windowed layers), at
    least 5 windows per topic of the built-in corpus' 12 and as many windows as positions."""
    summary = REAL[model]
    sized = ReportOptions.for_device(device).sized_for(summary)
    assert split_sizes(sized.identify_sequences, (0.7, 0.15, 0.15))[2] >= MIN_TEST_SEQUENCES
    n = int(sized.null_sequences)
    lengths = torch.linspace(8, int(sized.null_seq_len), steps=n).round().long().tolist()
    assert null_space_warnings(lengths, summary.d_head, summary.attention_windows) == []
    assert sum(length > summary.d_head for length in lengths) >= n // 3
    topic_ids = torch.arange(12).repeat_interleave(sized.windows_per_topic)
    assert design_warnings(len(topic_ids), sized.seq_len - 1, topic_ids) == []
    if device == "cpu":
        assert sized.atlas_vocab is not None and 1024 <= int(sized.atlas_vocab) <= 4096
