"""Context-part and incoherence metrics of one hidden state [SZ] (SPEC section 4).

- :func:`context_metrics`: within/between-topic mean ``|cos|`` of ``ctx_c`` (within-topic both
  over pairs of distinct windows and, as the [SZ] code's block mask counts them, with each window
  also paired with itself), k-means ARI and
  silhouette (cosine metric) against the topic labels, and a 2-D map: PCA of the centred ctx
  (default) or t-SNE (``map_method="tsne"``: sklearn, PCA initialisation, seeded, perplexity
  ``min(30, (C - 1) / 3)``; slower, and distances between clusters are not meaningful).
- :func:`incoherence`: ``|cos(pos_t, ctx_c)|`` over all pairs (max, mean), principal angles
  between the top-k positional and context subspaces, and random baselines for the same d:
  the mean ``|cos|`` of two independent uniform directions, ``~ sqrt(2 / (pi d))``, and the
  principal angles and max ``|cos|`` of Gaussian matrices of the same shapes (seeded).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tgeom.errors import TgeomError
from tgeom.linalg.subspace import principal_angles, top_subspace


def unit_rows(x: Tensor) -> Tensor:
    """Rows scaled to unit norm (zero rows stay zero)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)


def check_context_design(n_windows: int, topic_ids: Tensor) -> int:
    """Return the number of topics, or raise when there are < 2 windows or < 2 topics."""
    n_topics = int(torch.unique(topic_ids).numel())
    if n_windows < 2 or n_topics < 2:
        raise TgeomError(
            f"context metrics need at least 2 windows and 2 topics; found {n_windows} "
            f"window(s) in {n_topics} topic(s): use a corpus with sub-folders per topic, "
            "more text or a smaller --seq-len."
        )
    return n_topics


MIN_WINDOWS_PER_TOPIC = 5
"""Fewer windows in a topic than this and ARI/silhouette come with a warning: k-means on a few
points per topic matches the labels by chance (2 topics x 2 windows: 1 of the 3 ways to split 4
points in two pairs is perfect; one window per topic is always perfect)."""


def clustering_warnings(topic_ids: Tensor) -> list[str]:
    """``[one line]`` when the smallest topic has fewer than :data:`MIN_WINDOWS_PER_TOPIC`
    windows (the clustering scores cannot mean what they say), else ``[]``."""
    counts = torch.unique(topic_ids, return_counts=True)[1]
    fewest = int(counts.min()) if counts.numel() else 0
    if fewest >= MIN_WINDOWS_PER_TOPIC:
        return []
    return [
        f"ctx_ari, ctx_silhouette: the smallest topic has {fewest} window(s), fewer than "
        f"{MIN_WINDOWS_PER_TOPIC}: k-means on so few points matches the topics by chance "
        f"(ARI 1.0 from a handful of windows); pass at least {MIN_WINDOWS_PER_TOPIC} windows "
        "per topic"
    ]


MAP_METHODS = ("pca", "tsne")


def context_metrics(
    ctx: Tensor, topic_ids: Tensor, seed: int = 0, map_method: str = "pca"
) -> dict[str, Any]:
    """``ctx [C, d]`` float64, ``topic_ids [C]``: cosine, clustering and map of the context part."""
    if map_method not in MAP_METHODS:
        raise TgeomError(f"--ctx-map must be one of {', '.join(MAP_METHODS)}, got {map_method!r}.")
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    n_topics = check_context_design(ctx.shape[0], topic_ids)
    cos = (unit_rows(ctx) @ unit_rows(ctx).T).abs()
    same = topic_ids[:, None] == topic_ids[None, :]
    off = ~torch.eye(ctx.shape[0], dtype=torch.bool)
    within = cos[same & off]
    within_incl_self = cos[same]
    between = cos[~same]
    x = ctx.numpy()
    labels = topic_ids.numpy()
    km = KMeans(n_clusters=n_topics, n_init=10, random_state=seed).fit(x)
    ari = float(adjusted_rand_score(labels, km.labels_))
    silhouette = (
        float(silhouette_score(x, labels, metric="cosine"))
        if n_topics < ctx.shape[0]
        else float("nan")
    )
    coords = _tsne_map(x, seed) if map_method == "tsne" else _pca_map(ctx)
    return {
        "ctx_within_cos_excl_self": float(within.mean()) if within.numel() else float("nan"),
        "ctx_within_cos_incl_self": float(within_incl_self.mean()),
        "ctx_between_cos": float(between.mean()),
        "ctx_ari": ari,
        "ctx_silhouette": silhouette,
        "ctx_map_2d": coords,
    }


def _pca_map(ctx: Tensor) -> np.ndarray:
    """Top-2 principal coordinates ``[C, 2]`` of the centred rows."""
    centred = ctx - ctx.mean(dim=0)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    coords = (u[:, :2] * s[:2]).numpy()
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    return coords


def _tsne_map(x: np.ndarray, seed: int) -> np.ndarray:
    """2-D t-SNE embedding ``[C, 2]`` of the rows of ``x`` (seeded, PCA initialisation)."""
    from sklearn.manifold import TSNE

    perplexity = min(30.0, max((x.shape[0] - 1) / 3, 0.5))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return np.asarray(tsne.fit_transform(x), dtype=np.float64)


def random_mean_abs_cos(d: int) -> float:
    """Exact ``E|cos|`` of two independent uniform directions in ``R^d`` (``~ sqrt(2/(pi d))``)."""
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)


def incoherence(pos: Tensor, ctx: Tensor, k: int, seed: int = 0) -> dict[str, Any]:
    """``pos [T', d]``, ``ctx [C, d]`` float64: how orthogonal the two parts are, beside chance."""
    d = pos.shape[1]
    cos = unit_rows(pos) @ unit_rows(ctx).T  # [T', C]
    k_eff = max(1, min(k, pos.shape[0], ctx.shape[0], d))
    angles = principal_angles(top_subspace(pos, k_eff), top_subspace(ctx, k_eff))
    gen = torch.Generator().manual_seed(seed)
    rand_pos = torch.randn(pos.shape, generator=gen, dtype=torch.float64)
    rand_ctx = torch.randn(ctx.shape, generator=gen, dtype=torch.float64)
    rand_cos = (unit_rows(rand_pos) @ unit_rows(rand_ctx).T).abs()
    rand_angles = principal_angles(
        torch.randn(d, k_eff, generator=gen, dtype=torch.float64),
        torch.randn(d, k_eff, generator=gen, dtype=torch.float64),
    )
    return {
        "incoherence_max": float(cos.abs().max()),
        "incoherence_mean": float(cos.abs().mean()),
        "random_baseline_mean": random_mean_abs_cos(d),
        "random_baseline_max": float(rand_cos.max()),
        "principal_angles_deg": torch.rad2deg(angles).tolist(),
        "random_principal_angles_deg": torch.rad2deg(rand_angles).tolist(),
        "pos_ctx_cos": cos.float().numpy(),
    }
