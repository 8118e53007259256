"""``--conventions paper``: tgeom's streamed numbers equal the [SZ] code's formulas (its
``metrics.py``) evaluated the slow, obvious way on the raw hidden states ``H`` formed in full.

The reference functions below restate the code's definitions in numpy float64: the code's
``cvec`` is ``h - pos - mu`` per token, its "full" positional matrix is ``P`` repeated for every
window, the relative norm is the ratio of the two matrices' operator norms (``mu`` included in
``H``), the rank is the ``screenot`` package's ``adaptiveHardThresholding(P, k, strategy='i')``,
the explained ratio is ``sum(s[:r]) / sum(s)``, and the within/between-topic ``|cos|`` use the
code's block mask ``kron(eye(n_topics), ones(b, b))`` (windows sorted by topic, b per topic), so
within-topic pairs include each window with itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.linalg
import torch
from screenot.ScreeNOT import adaptiveHardThresholding

from tgeom.analyses.geometry import collect_statistics, measure
from tgeom.capture import capture
from tgeom.corpus import load_corpus, make_windows
from tgeom.runtime import Runtime

TOL = 1e-10


def official_metrics(h: np.ndarray, per_topic: int, k: int) -> dict[str, float]:
    """The [SZ] code's per-layer metrics of ``h [C, T', d]`` (windows sorted by topic,
    ``per_topic`` each), plus tgeom's Frobenius ratio and squared-value shares, formed densely."""
    c, t, d = h.shape
    mu = h.reshape(c * t, d).mean(axis=0)
    pos = h.mean(axis=0) - mu  # [T', d]
    ctx = h.mean(axis=1) - mu  # [C, d]
    cvec = (h - pos[None] - mu).reshape(c * t, d)  # the code's per-token "cvec"
    p_full = np.concatenate([pos for _ in range(c)])
    m = p_full + cvec + mu  # = H, the raw hidden states, mean included
    svals = scipy.linalg.svd(pos)[1]
    rank = adaptiveHardThresholding(pos, k=k, strategy="i")[-1]
    unit = ctx / np.sqrt(np.sum(ctx**2, axis=1, keepdims=True))
    mask = np.kron(np.eye(c // per_topic), np.ones((per_topic, per_topic)))
    cos = np.abs(unit @ unit.T)
    same_distinct = (mask == 1) & ~np.eye(c, dtype=bool)
    return {
        "pos_rank_screenot": int(rank),
        "pos_stable_rank": float((svals**2 / svals[0] ** 2).sum()),
        "pos_explained_sv_screenot": float(svals[: int(rank)].sum() / svals.sum()),
        "pos_relative_norm_op": float(
            scipy.linalg.norm(p_full, ord=2) / scipy.linalg.norm(m, ord=2)
        ),
        "ctx_within_cos_incl_self": float(np.sum(np.where(mask == 1, cos, 0)) / np.sum(mask)),
        "ctx_between_cos": float(np.sum(np.where(mask == 0, cos, 0)) / np.sum(mask == 0)),
        # tgeom's own definitions, from the same H
        "pos_relative_norm_fro": float(np.linalg.norm(p_full) / np.linalg.norm(m)),
        "pos_explained_sq_top2": float((svals[:2] ** 2).sum() / (svals**2).sum()),
        "pos_explained_sq_top10": float((svals[:10] ** 2).sum() / (svals**2).sum()),
        "ctx_within_cos_excl_self": float(cos[same_distinct].mean()),
    }


def _topic_sorted_windows(lm: Any, corpus: str, seq_len: int, per_topic: int) -> Any:
    windows = make_windows(
        load_corpus(corpus),
        lm.tokenizer,
        seq_len,
        max_windows_per_topic=per_topic,
        max_context=lm.summary.n_ctx,
    )
    order = torch.argsort(windows.topic_ids, stable=True)
    windows.token_ids, windows.topic_ids = windows.token_ids[order], windows.topic_ids[order]
    counts = torch.bincount(windows.topic_ids)
    assert bool((counts == per_topic).all()), "the code's block mask needs equal topics"
    return windows


def _assert_paper_metrics_match(lm: Any, windows: Any, per_topic: int, k: int) -> None:
    stats = collect_statistics(
        lm, windows, Runtime(torch.device("cpu"), batch_size=3), progress=False
    )
    result = measure(stats, conventions="paper", screenot_k=k)
    hidden = capture(lm, windows.token_ids).hidden[:, :, 1:].double().numpy()  # [L+1, C, T', d]
    assert result.options["conventions"] == "paper"
    assert result.to_json()["headline"]["relative_norm"] == "pos_relative_norm_op"
    for index, h in enumerate(hidden):  # hidden state 0..L
        ref = official_metrics(h, per_topic, k)
        row = result.by_hidden[index]
        assert row["pos_rank_screenot"] == ref["pos_rank_screenot"], index
        for name, value in ref.items():
            assert row[name] == pytest.approx(value, rel=TOL, abs=TOL), (index, name)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_paper_conventions_equal_official_formulas_on_tiny_models(
    tiny_model: Any, topic_corpus: Path, family: str
) -> None:
    lm = tiny_model(family)
    windows = _topic_sorted_windows(lm, str(topic_corpus), 24, per_topic=3)
    _assert_paper_metrics_match(lm, windows, per_topic=3, k=5)  # 2k+1 < min(23, 32)


@pytest.mark.slow
def test_paper_conventions_equal_official_formulas_on_minilm(minilm: Any) -> None:
    """The code's own k = 20 on a real model and the built-in corpus."""
    windows = _topic_sorted_windows(minilm, "builtin", 64, per_topic=3)
    _assert_paper_metrics_match(minilm, windows, per_topic=3, k=20)


def test_tgeom_and_paper_conventions_differ_only_in_the_headline(
    tiny_model: Any, topic_corpus: Path
) -> None:
    lm = tiny_model("gpt2")
    windows = _topic_sorted_windows(lm, str(topic_corpus), 24, per_topic=2)
    stats = collect_statistics(lm, windows, progress=False)
    ours, paper = measure(stats, screenot_k=5), measure(stats, conventions="paper", screenot_k=5)
    assert ours.to_json()["headline"]["estimated_rank"] == "pos_rank_gavish_donoho"
    assert paper.to_json()["headline"]["estimated_rank"] == "pos_rank_screenot"
    for a, b in zip(ours.by_hidden, paper.by_hidden, strict=True):
        assert a == b
