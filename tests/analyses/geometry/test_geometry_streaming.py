"""Streaming statistics equal the dense float64 decomposition computed the obvious way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import tgeom.analyses.geometry.collect as collect_module
from tgeom.analyses.geometry import GeometryStats, collect_statistics
from tgeom.capture import capture
from tgeom.corpus import load_corpus, make_windows
from tgeom.errors import TgeomError
from tgeom.runtime import Runtime

SEQ_LEN = 12


def _windows(lm: Any, corpus: Path, per_topic: int = 4) -> Any:
    return make_windows(
        load_corpus(str(corpus)), lm.tokenizer, SEQ_LEN, max_windows_per_topic=per_topic
    )


def _dense_parts(lm: Any, token_ids: torch.Tensor, first: int) -> list[dict[str, Any]]:
    """mu, pos, ctx and sums of squares from the full [C, T', d] tensor, one layer at a time."""
    hidden = capture(lm, token_ids).hidden[:, :, first:].double()  # [L+1, C, T', d]
    out = []
    for h in hidden:
        mu = h.mean(dim=(0, 1))
        pos = h.mean(dim=0) - mu
        ctx = h.mean(dim=1) - mu
        resid = h - mu - pos[None] - ctx[:, None]
        out.append(
            {
                "mu": mu,
                "pos": pos,
                "ctx": ctx,
                "total": float(((h - mu) ** 2).sum()),
                "resid": float((resid**2).sum()),
                "second_moment": torch.einsum("cti,ctj->ij", h, h),
            }
        )
    return out


def _assert_matches_dense(stats: GeometryStats, dense: list[dict[str, Any]]) -> None:
    for layer, ref in enumerate(dense):
        dec = stats.decomposition(layer)
        torch.testing.assert_close(dec.mu, ref["mu"], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(dec.pos, ref["pos"], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(dec.ctx, ref["ctx"], rtol=1e-9, atol=1e-9)
        assert dec.ss_total == pytest.approx(ref["total"], rel=1e-9)
        assert dec.ss_resid == pytest.approx(ref["resid"], rel=1e-9)
        assert stats.second_moment is not None
        torch.testing.assert_close(
            stats.second_moment[layer], ref["second_moment"], rtol=1e-12, atol=1e-9
        )
        c, t = ref["ctx"].shape[0], ref["pos"].shape[0]
        anova = c * float((ref["pos"] ** 2).sum()) + t * float((ref["ctx"] ** 2).sum())
        assert ref["total"] == pytest.approx(anova + ref["resid"], rel=1e-9)
        assert sum(dec.shares()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    "family",
    [
        "gpt2",
        "llama",
        "opt_post_ln",
        "distilbert",
        "gptj",
        "phi",
        "gpt_neo",
        "qwen3",
        "olmo2",
        "phi3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "bloom",
    ],
)
@pytest.mark.parametrize("batch_size", [1, 5])
def test_streaming_equals_dense_decomposition(
    tiny_model: Any, topic_corpus: Path, family: str, batch_size: int
) -> None:
    lm = tiny_model(family)
    windows = _windows(lm, topic_corpus)
    stats = collect_statistics(
        lm, windows, Runtime(torch.device("cpu"), batch_size=batch_size), progress=False
    )
    assert stats.n_positions == SEQ_LEN - 1 and stats.n_windows == len(windows)
    _assert_matches_dense(stats, _dense_parts(lm, windows.token_ids, first=1))


def test_keep_first_keeps_position_zero(tiny_model: Any, topic_corpus: Path) -> None:
    lm = tiny_model("bert")
    windows = _windows(lm, topic_corpus, per_topic=2)
    stats = collect_statistics(
        lm, windows, Runtime(torch.device("cpu"), batch_size=4), keep_first=True, progress=False
    )
    assert stats.n_positions == SEQ_LEN
    _assert_matches_dense(stats, _dense_parts(lm, windows.token_ids, first=0))


def test_window_order_changes_nothing_but_ctx_order(tiny_model: Any, topic_corpus: Path) -> None:
    lm = tiny_model("gpt2")
    windows = _windows(lm, topic_corpus)
    runtime = Runtime(torch.device("cpu"), batch_size=3)
    base = collect_statistics(lm, windows, runtime, progress=False)
    perm = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))
    windows.token_ids, windows.topic_ids = windows.token_ids[perm], windows.topic_ids[perm]
    shuffled = collect_statistics(lm, windows, runtime, progress=False)
    for layer in range(base.n_hidden):
        a, b = base.decomposition(layer), shuffled.decomposition(layer)
        torch.testing.assert_close(a.pos, b.pos, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(a.ctx[perm], b.ctx, rtol=1e-9, atol=1e-9)
        assert a.shares() == pytest.approx(b.shares(), rel=1e-9)


class _Crash(RuntimeError):
    pass


def test_interrupted_collection_resumes_without_double_counting(
    tiny_model: Any, topic_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = tiny_model("gpt2")
    windows = _windows(lm, topic_corpus)
    runtime = Runtime(torch.device("cpu"), batch_size=2)
    full = collect_statistics(lm, windows, runtime, progress=False)
    checkpoint = tmp_path / "stats.safetensors"
    real = collect_module.stream_hidden
    calls = []

    def crashing(lm: Any, ids: Any, fold: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) < 4:
            return real(lm, ids, fold, *args, **kwargs)

        def dying(layer: int, hidden: Any) -> None:  # the 4th batch dies mid-forward,
            if layer == 2:  # after layers 0 and 1 were folded into the running sums
                raise _Crash
            fold(layer, hidden)

        return real(lm, ids, dying, *args, **kwargs)

    monkeypatch.setattr(collect_module, "stream_hidden", crashing)
    with pytest.raises(_Crash):
        collect_statistics(
            lm, windows, runtime, checkpoint_path=checkpoint, checkpoint_every=2, progress=False
        )
    partial = GeometryStats.load(checkpoint)
    assert partial.n_done == 4 and not partial.complete
    monkeypatch.setattr(collect_module, "stream_hidden", real)
    resumed = collect_statistics(
        lm,
        windows,
        Runtime(torch.device("cpu"), batch_size=3),
        checkpoint_path=checkpoint,
        progress=False,
    )
    assert resumed.n_done == len(windows)
    for name in ("sum_total", "sum_pos", "ctx_means", "sumsq", "sum_abs", "second_moment"):
        torch.testing.assert_close(
            getattr(resumed, name), getattr(full, name), rtol=1e-12, atol=1e-12
        )
    reloaded = GeometryStats.load(checkpoint)
    assert reloaded.complete and reloaded.meta == resumed.meta


def test_resume_from_another_seq_len_names_the_mismatch(
    tiny_model: Any, topic_corpus: Path, tmp_path: Path
) -> None:
    lm = tiny_model("gpt2")
    checkpoint = tmp_path / "stats.safetensors"
    collect_statistics(
        lm, _windows(lm, topic_corpus, 1), checkpoint_path=checkpoint, progress=False
    )
    other = make_windows(load_corpus(str(topic_corpus)), lm.tokenizer, 10, max_windows_per_topic=1)
    with pytest.raises(TgeomError, match="seq-len"):
        collect_statistics(lm, other, checkpoint_path=checkpoint, progress=False)


def test_incomplete_statistics_refuse_to_measure(tiny_model: Any, topic_corpus: Path) -> None:
    lm = tiny_model("gpt2")
    stats = collect_statistics(lm, _windows(lm, topic_corpus, 1), progress=False)
    stats.n_done -= 1
    with pytest.raises(TgeomError, match="collect"):
        stats.decomposition(0)


def test_statistics_without_second_moment_resume_only_without_it(
    tiny_model: Any, topic_corpus: Path, tmp_path: Path
) -> None:
    lm = tiny_model("gpt2")
    windows = _windows(lm, topic_corpus, 1)
    checkpoint = tmp_path / "stats.safetensors"
    lean = collect_statistics(
        lm, windows, checkpoint_path=checkpoint, progress=False, second_moment=False
    )
    assert lean.second_moment is None and GeometryStats.load(checkpoint).second_moment is None
    with pytest.raises(TgeomError, match="without the \\[d, d\\] second moment"):
        collect_statistics(lm, windows, checkpoint_path=checkpoint, progress=False)
    with pytest.raises(TgeomError, match="re-run `tgeom geometry collect`"):
        lean.raw_operator_norm_sq(0)
    again = collect_statistics(
        lm, windows, checkpoint_path=checkpoint, progress=False, second_moment=False
    )
    torch.testing.assert_close(again.sum_pos, lean.sum_pos, rtol=0, atol=0)


def test_folding_a_float64_batch_leaves_the_model_output_untouched() -> None:
    """A float64 model's block output is the tensor the fold reads: folding it must not change
    what the next block receives (|h| and h^2 are formed in a copy), and the sums are exact."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 4, dtype=torch.float64, generator=gen)  # [B, T, d]
    before = hidden.clone()
    acc = {
        name: torch.zeros(2, *shape, dtype=torch.float64)
        for name, shape in [
            ("sum_pos", (4, 4)),
            ("sum_total", (4,)),
            ("sum_abs", (4,)),
            ("sumsq", (4,)),
            ("second_moment", (4, 4)),
        ]
    }
    window_sums = collect_module._fold_hidden(acc, 1, hidden, first=1)
    assert torch.equal(hidden, before)
    h = before[:, 1:]
    torch.testing.assert_close(window_sums, h.sum(dim=1), rtol=0, atol=1e-12)
    torch.testing.assert_close(acc["sum_abs"][1], h.abs().sum(dim=(0, 1)), rtol=0, atol=1e-12)
    torch.testing.assert_close(acc["sumsq"][1], (h * h).sum(dim=(0, 1)), rtol=0, atol=1e-12)
    flat = h.reshape(-1, 4)
    torch.testing.assert_close(acc["second_moment"][1], flat.T @ flat, rtol=0, atol=1e-12)
