"""Measurements recover planted structure; save/load round trip; bad designs are refused."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tgeom.analyses.geometry import GeometryStats, measure
from tgeom.analyses.geometry.context import random_mean_abs_cos
from tgeom.errors import TgeomError

REQUIRED = [
    "hidden",
    "var_share_pos",
    "var_share_ctx",
    "var_share_resid",
    "pos_stable_rank",
    "pos_rank_gavish_donoho",
    "pos_rank_screenot",
    "pos_explained_sq_top2",
    "pos_explained_sq_top3",
    "pos_explained_sq_top10",
    "pos_explained_sv_screenot",
    "pos_relative_norm_fro",
    "pos_relative_norm_op",
    "pos_lowfreq_share",
    "ctx_within_cos_excl_self",
    "ctx_within_cos_incl_self",
    "ctx_between_cos",
    "ctx_ari",
    "ctx_silhouette",
    "incoherence_max",
    "incoherence_mean",
    "random_baseline_mean",
    "principal_angles_deg",
]


def planted(
    c_per_topic: int = 6,
    n_topics: int = 3,
    t: int = 32,
    d: int = 256,
    noise: float = 0.3,
    aligned: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``hidden [2, C, T, d]``: a helix over t (in 2 random directions) + topic centres + noise.
    Layer 1 is layer 0 with a massive channel (constant offset 1000 on channel 7) added."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, 2, generator=gen, dtype=torch.float64)).Q
    angle = 2 * math.pi * torch.arange(t, dtype=torch.float64) / t
    pos = 4.0 * torch.stack([angle.cos(), angle.sin()], dim=1) @ basis.T  # [T, d]
    centres = 3.0 * torch.randn(n_topics, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    if aligned:  # topic centres inside the positional plane: no incoherence
        centres = 3.0 * torch.randn(n_topics, 2, generator=gen, dtype=torch.float64) @ basis.T
    topic_ids = torch.arange(n_topics).repeat_interleave(c_per_topic)
    c = topic_ids.numel()
    h = 5.0 + pos[None] + centres[topic_ids][:, None]
    h = h + noise * torch.randn(c, t, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    massive = h.clone()
    massive[..., 7] += 1000.0 * (1 + 0.01 * torch.randn(c, t, generator=gen, dtype=torch.float64))
    return torch.stack([h, massive]), topic_ids


def _stats(**kwargs: object) -> GeometryStats:
    hidden, topic_ids = planted(**kwargs)  # type: ignore[arg-type]
    return GeometryStats.from_hidden(hidden, topic_ids, ["a", "b", "c"])


def test_planted_helix_clusters_and_orthogonality_are_recovered() -> None:
    row = measure(_stats()).by_hidden[0]
    assert row["pos_explained_sq_top2"] > 0.95
    assert row["pos_stable_rank"] < 2.2
    assert row["pos_rank_gavish_donoho"] == 2
    assert row["ctx_ari"] == 1.0
    within = row["ctx_within_cos_excl_self"]
    assert within > 0.95 > row["ctx_between_cos"] + 0.3  # 3 centred centres: ~0.5
    baseline = row["random_baseline_mean"]
    assert baseline == pytest.approx(math.sqrt(2 / (math.pi * 256)), rel=0.01)
    assert row["incoherence_mean"] < 1.5 * baseline
    assert min(row["principal_angles_deg"]) > 60


def test_planted_aligned_context_is_not_incoherent() -> None:
    row = measure(_stats(aligned=True)).by_hidden[0]
    assert row["incoherence_mean"] > 5 * row["random_baseline_mean"]
    assert min(row["principal_angles_deg"]) < 10


def test_shares_sum_to_one_and_match_dense_anova() -> None:
    hidden, topic_ids = planted()
    result = measure(GeometryStats.from_hidden(hidden, topic_ids, ["a", "b", "c"]))
    for layer, h in enumerate(hidden):
        mu = h.mean(dim=(0, 1))
        pos, ctx = h.mean(dim=0) - mu, h.mean(dim=1) - mu
        resid = h - mu - pos[None] - ctx[:, None]
        total = float(((h - mu) ** 2).sum())
        row = result.by_hidden[layer]
        assert row["var_share_pos"] == pytest.approx(
            h.shape[0] * float((pos**2).sum()) / total, rel=1e-9
        )
        assert row["var_share_ctx"] == pytest.approx(
            h.shape[1] * float((ctx**2).sum()) / total, rel=1e-9
        )
        assert row["var_share_resid"] == pytest.approx(float((resid**2).sum()) / total, rel=1e-9)
        shares = row["var_share_pos"] + row["var_share_ctx"] + row["var_share_resid"]
        assert shares == pytest.approx(1.0, abs=1e-12)


def test_massive_channel_is_reported_and_can_be_dropped() -> None:
    result = measure(_stats(), drop_channels=0)
    assert result.massive_channels[1]["channels"][0] == 7
    assert result.massive_channels[1]["ratio_to_median"][0] > 100
    dropped = measure(_stats(), drop_channels=1)
    plain = measure(_stats())
    # Without channel 7 layer 1 is layer 0 minus one ordinary channel: the helix is back.
    assert dropped.by_hidden[1]["pos_explained_sq_top2"] > 0.95
    assert dropped.by_hidden[1]["ctx_ari"] == plain.by_hidden[0]["ctx_ari"] == 1.0


def test_lowfreq_share_is_high_for_a_smooth_gram() -> None:
    row = measure(_stats(), low_freq=4).by_hidden[0]
    assert row["pos_lowfreq_share"] > 0.9


def test_random_mean_abs_cos_matches_monte_carlo() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(20000, 16, generator=gen), dim=1)
    b = torch.nn.functional.normalize(torch.randn(20000, 16, generator=gen), dim=1)
    empirical = float((a * b).sum(1).abs().mean())
    assert random_mean_abs_cos(16) == pytest.approx(empirical, rel=0.02)


def test_result_json_has_required_keys() -> None:
    payload = measure(_stats()).to_json()
    assert len(payload["by_hidden"]) == 2
    for row in payload["by_hidden"]:
        assert set(REQUIRED) <= set(row)
    assert np.asarray(payload["gram"]).shape == (32, 32)


def test_save_load_round_trip(tmp_path: Path) -> None:
    stats = _stats()
    stats.meta["model"] = "planted"
    stats.save(tmp_path / "s.safetensors")
    back = GeometryStats.load(tmp_path / "s.safetensors")
    assert back.meta == stats.meta and back.n_done == stats.n_done
    torch.testing.assert_close(back.sum_pos, stats.sum_pos, rtol=0, atol=0)
    assert stats.second_moment is not None
    torch.testing.assert_close(back.second_moment, stats.second_moment, rtol=0, atol=0)
    assert (tmp_path / "s.json").is_file()


@pytest.mark.parametrize(("n_topics", "per_topic"), [(1, 5), (3, 1)])
def test_context_metrics_need_two_windows_and_topics(n_topics: int, per_topic: int) -> None:
    hidden = torch.randn(1, n_topics * per_topic, 4, 8)
    ids = torch.arange(n_topics).repeat_interleave(per_topic)
    stats = GeometryStats.from_hidden(
        hidden[:, :1] if n_topics == 3 else hidden,
        ids[:1] if n_topics == 3 else ids,
        ["x", "y", "z"][:n_topics],
    )
    with pytest.raises(TgeomError, match=r"found 1 window|in 1 topic"):
        measure(stats)


def test_tsne_map_separates_planted_topics() -> None:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    stats = _stats()
    result = measure(stats, ctx_map="tsne")
    assert result.options["ctx_map"] == "tsne"
    coords = result.ctx_map[0]
    assert coords.shape == (stats.n_windows, 2)
    labels = KMeans(n_clusters=3, n_init=10, random_state=0).fit(coords).labels_
    assert adjusted_rand_score(stats.topic_ids.numpy(), labels) == 1.0


def test_unknown_map_or_rank_method_is_a_one_line_error() -> None:
    with pytest.raises(TgeomError, match="--ctx-map"):
        measure(_stats(), ctx_map="umap")
    with pytest.raises(TgeomError, match="--rank-threshold"):
        measure(_stats(), rank_method="quartic")


def test_design_warnings_name_too_few_windows_per_topic_and_per_position() -> None:
    """2 windows per topic: k-means on 6 points finds the planted topics, ARI 1.0, which says
    nothing at that size; 6 windows for 16 positions: the positional means carry the windows.
    Each warning appears there and not with 12 windows per topic (36 windows)."""
    few = measure(_stats(c_per_topic=2, t=16))
    assert few.by_hidden[0]["ctx_ari"] == 1.0
    clustering, positional = few.warnings
    assert clustering.startswith("ctx_ari") and "smallest topic has 2 window(s)" in clustering
    assert positional.startswith("pos_rank_*") and "6 windows for 16 positions" in positional
    assert measure(_stats(c_per_topic=12, t=16)).warnings == []
    only_positions = measure(_stats(c_per_topic=5, t=32)).warnings  # 15 windows, 32 positions
    assert len(only_positions) == 1 and "15 windows for 32 positions" in only_positions[0]
