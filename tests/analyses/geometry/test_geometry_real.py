"""Real offline models on the built-in corpus: per-layer numbers (printed) and basic identities.

The claims of [SZ] (pos low-rank, ctx clusters by topic, pos nearly orthogonal to ctx) are
printed for the record, not asserted: only the identities that must hold are checked.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tgeom.analyses.geometry import collect_statistics, measure
from tgeom.corpus import load_corpus, make_windows
from tgeom.runtime import Runtime

KEYS = [
    "var_share_pos",
    "var_share_ctx",
    "var_share_resid",
    "pos_stable_rank",
    "pos_rank_gavish_donoho",
    "pos_rank_screenot",
    "pos_explained_sq_top2",
    "pos_explained_sv_screenot",
    "pos_relative_norm_fro",
    "pos_relative_norm_op",
    "ctx_within_cos_excl_self",
    "ctx_within_cos_incl_self",
    "ctx_between_cos",
    "ctx_ari",
    "incoherence_max",
    "incoherence_mean",
    "random_baseline_mean",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_real_model_geometry_numbers(name: str, request: pytest.FixtureRequest) -> None:
    lm: Any = request.getfixturevalue(name)
    windows = make_windows(
        load_corpus("builtin"),
        lm.tokenizer,
        64,
        max_windows_per_topic=6,
        max_context=lm.summary.n_ctx,
    )
    stats = collect_statistics(
        lm, windows, Runtime(torch.device("cpu"), batch_size=8), progress=False
    )
    result = measure(stats)
    print(f"\n{name}: {len(windows)} windows, topics {windows.counts_by_topic()}")
    print("hidden " + " ".join(f"{k[:14]:>14}" for k in KEYS))
    for row in result.by_hidden:
        print(f"{row['hidden']:6d} " + " ".join(f"{float(row[k]):14.4f}" for k in KEYS))
        total = row["var_share_pos"] + row["var_share_ctx"] + row["var_share_resid"]
        assert total == pytest.approx(1.0, abs=1e-9)
        rank = row["pos_rank_gavish_donoho"]
        assert 1.0 <= row["pos_stable_rank"] <= rank + 1e-9 or rank == 0
    print("massive:", [(m["hidden"], m["channels"][:3]) for m in result.massive_channels])
    dropped = measure(stats, drop_channels=2)
    print("with each hidden state's top-2 |h| channels removed:")
    for row in dropped.by_hidden:
        print(f"{row['hidden']:6d} " + " ".join(f"{float(row[k]):14.4f}" for k in KEYS))
