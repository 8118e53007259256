"""SmolLM2 in bfloat16 against float32: geometry variance shares within 0.01 of float32's and
one head's top-50 OV pairs overlapping float32's in at least 45.

Measured (builtin corpus, 2 windows of 32 tokens per topic): the shares of every hidden state
differ by at most 0.00049; the top-50 OV pairs of (block, head) (0, 0), (5, 2), (10, 4),
(20, 4), (29, 8) are float32's 50 and of (15, 1) 49 of 50 (the bfloat16 weights are float32's
rounded to 8 bits: a pair near the 50th value, 19.03 of 21.88 at the top, moves past it).
"""

from __future__ import annotations

import pytest
import torch

from tgeom.analyses.embedding.interaction import head_top_pairs
from tgeom.analyses.geometry import collect_statistics
from tgeom.corpus import load_corpus, make_windows
from tgeom.models import load_model
from tgeom.runtime import Runtime


@pytest.fixture(scope="module")
def smollm2_bf16():
    return load_model("smollm2", dtype="bfloat16", device="cpu")


def test_geometry_shares_in_bfloat16_are_within_001_of_float32(smollm2, smollm2_bf16):
    windows = make_windows(load_corpus("builtin"), smollm2.tokenizer, 32, max_windows_per_topic=1)
    runtime = Runtime(torch.device("cpu"), batch_size=8)
    full = collect_statistics(smollm2, windows, runtime, progress=False)
    low = collect_statistics(smollm2_bf16, windows, runtime, progress=False)
    assert low.meta["dtype"] == "bfloat16" and full.meta["dtype"] == "float32"
    worst = 0.0
    for hidden in range(full.n_hidden):
        a, b = full.decomposition(hidden).shares(), low.decomposition(hidden).shares()
        worst = max(worst, *(abs(x - y) for x, y in zip(a, b, strict=True)))
    assert 0 < worst < 0.01  # > 0: the bfloat16 forward did run


def test_top50_ov_pairs_in_bfloat16_overlap_float32_in_45(smollm2, smollm2_bf16):
    full = head_top_pairs(smollm2.weights(), 0, 0, "ov", 50)
    low = head_top_pairs(smollm2_bf16.weights(), 0, 0, "ov", 50)
    assert smollm2_bf16.weights().layers[0].W_V.dtype == torch.bfloat16
    pairs = [set(zip(p.rows.tolist(), p.cols.tolist(), strict=True)) for p in (full, low)]
    assert len(pairs[0] & pairs[1]) >= 45
    # the values are those of the rounded weights: close to float32's, not equal
    assert 0 < abs(float(full.values[-1]) - float(low.values[-1])) < 0.01 * float(full.values[0])
