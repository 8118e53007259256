"""Per-hidden-state measurements of the position/context decomposition [SZ] (SPEC section 4).

Hidden state ``h`` is indexed 0..L: 0 the embedding output, ``h`` the output of block ``h - 1``.

Everything here is computed from :class:`GeometryStats` alone (no model): variance shares, the
positional part's spectrum (stable rank, Gavish-Donoho rank, explained variance, principal
coordinates: the spiral), its smoothness (cosine Gram ``G = P~ P~^T`` of the row-normalised
``P``, ``D G D^T`` with D the orthonormal DCT-II, and the share of the non-DC energy at
frequencies ``<= low_freq`` in both axes), context clustering, incoherence beside random
baselines, and the massive-activation channels (largest mean ``|h|``), optionally removed
(``drop_channels = m``: each hidden state's own top-m channels are dropped before every metric).

Where tgeom and the [SZ] code (its ``metrics.py``) define a quantity differently, both are
reported, each named for what it is (``conventions`` only picks the headline, see
:data:`HEADLINES`):

- estimated rank: ``pos_rank_gavish_donoho`` (tgeom) / ``pos_rank_screenot`` (the code:
  ScreeNOT, ``k = 20``, imputation; ``None`` when ``2 k + 1 >= min(T', d)``);
- explained ratio: ``pos_explained_sq_top{2,3,10}`` (tgeom: share of ``sum s^2`` in the top k)
  / ``pos_explained_sv_screenot`` (the code: ``sum_{i < r} s_i / sum s_i``, r the ScreeNOT rank);
- relative norm: ``pos_relative_norm_fro = ||P_C||_F / ||H||_F`` (tgeom, = RMS ``pos_t`` over
  RMS ``h[c, t]``) / ``pos_relative_norm_op = ||P_C||_2 / ||H||_2`` (the code), with ``P_C [C T',
  d]`` the positional matrix repeated for every window (``||P_C|| = sqrt(C) ||P||``) and ``H``
  the raw hidden states, mean included (``||H||_2`` from the collected second moment; ``None``
  when the statistics hold none);
- within-topic mean ``|cos|`` of ``ctx_c``: ``ctx_within_cos_excl_self`` (tgeom: pairs of
  distinct windows) / ``ctx_within_cos_incl_self`` (the code: each window also paired with
  itself, as its block mask does).

The stable rank and the between-topic ``|cos|`` are the same in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tgeom.analyses.geometry.context import (
    MAP_METHODS,
    check_context_design,
    clustering_warnings,
    context_metrics,
    incoherence,
    unit_rows,
)
from tgeom.analyses.geometry.stats import GeometryStats
from tgeom.errors import TgeomError, check_index
from tgeom.linalg.spectral import (
    RANK_METHODS,
    dct_matrix,
    optimal_rank,
    screenot_fits,
    screenot_rank,
    stable_rank,
)
from tgeom.results import results_frame

if TYPE_CHECKING:
    import pandas as pd

N_MASSIVE = 5  # channels listed per hidden state in the massive-activation report
CONVENTIONS = ("tgeom", "paper")
SCREENOT_K = 20  # the [SZ] code's upper bound on the signal rank
# Which named quantity is the headline estimated rank, explained ratio, relative norm and
# within-topic |cos| under each convention (results.json records the chosen map).
HEADLINES: dict[str, dict[str, str]] = {
    "tgeom": {
        "estimated_rank": "pos_rank_gavish_donoho",
        "explained_ratio": "pos_explained_sq_top2",
        "relative_norm": "pos_relative_norm_fro",
        "within_topic_cos": "ctx_within_cos_excl_self",
    },
    "paper": {
        "estimated_rank": "pos_rank_screenot",
        "explained_ratio": "pos_explained_sv_screenot",
        "relative_norm": "pos_relative_norm_op",
        "within_topic_cos": "ctx_within_cos_incl_self",
    },
}


@dataclass
class GeometryResult:
    """Measurements per hidden state (``by_hidden``: JSON-ready dicts, index 0..L) and arrays for
    the figures.

    Arrays per hidden state ``l``: ``pos_singular_values[l] [min(T', d)]``, ``pos_coords[l]
    [T', 3]`` (top-3 principal coordinates over t), ``ctx_map[l] [C, 2]`` (PCA of ctx),
    ``pos_ctx_cos[l] [T', C]``, ``gram[l]`` and ``gram_dct[l] [T', T']``. ``warnings``: one
    line per measurement the corpus' design cannot support (:func:`design_warnings`).
    """

    by_hidden: list[dict[str, Any]]
    massive_channels: list[dict[str, Any]]
    topics: list[str]
    topic_ids: list[int]
    positions: list[int]
    meta: dict[str, Any]
    options: dict[str, Any]
    pos_singular_values: list[np.ndarray] = field(repr=False)
    pos_coords: list[np.ndarray] = field(repr=False)
    ctx_map: list[np.ndarray] = field(repr=False)
    pos_ctx_cos: list[np.ndarray] = field(repr=False)
    gram: list[np.ndarray] = field(repr=False)
    gram_dct: list[np.ndarray] = field(repr=False)
    warnings: list[str] = field(default_factory=list)

    @property
    def n_hidden(self) -> int:
        """Hidden states measured: the embedding output and each block's output (L + 1)."""
        return len(self.by_hidden)

    @property
    def headline(self) -> dict[str, str]:
        """The named quantity shown as each headline metric under these results' conventions."""
        return HEADLINES[self.options.get("conventions", "tgeom")]

    def check_hidden(self, hidden: int) -> int:
        return check_index("hidden state", hidden, self.n_hidden)

    def to_json(self, gram_hidden: int | None = None) -> dict[str, Any]:
        """Plain JSON payload: identity, ``n_blocks`` and ``n_hidden`` (= n_blocks + 1), options,
        ``by_hidden`` (scalars + per-hidden-state arrays, one row per hidden state 0..L) and the
        Gram and its DCT for hidden state ``gram_hidden`` (default: the last one)."""
        g = self.n_hidden - 1 if gram_hidden is None else self.check_hidden(gram_hidden)
        rows = []
        for i, row in enumerate(self.by_hidden):
            rows.append(
                {
                    **row,
                    "pos_singular_values": self.pos_singular_values[i].tolist(),
                    "pos_coords_top3": self.pos_coords[i].tolist(),
                    "ctx_map_2d": self.ctx_map[i].tolist(),
                }
            )
        return {
            **{k: v for k, v in self.meta.items() if k not in ("topic_ids", "topics")},
            "n_blocks": self.n_hidden - 1,
            "n_hidden": self.n_hidden,
            "options": self.options,
            "conventions": self.options.get("conventions", "tgeom"),
            "headline": self.headline,
            "topics": self.topics,
            "topic_ids": self.topic_ids,
            "positions": self.positions,
            "massive_channels": self.massive_channels,
            "by_hidden": rows,
            "gram_hidden": g,
            "gram": self.gram[g].tolist(),
            "gram_dct": self.gram_dct[g].tolist(),
        }

    def to_frame(self, table: str = "by_hidden") -> pd.DataFrame:
        """``by_hidden`` (one row per hidden state 0..L: every measurement, arrays as list cells)
        or ``massive_channels`` (one row per hidden state) as a DataFrame."""
        return results_frame(self.to_json(), table, ("by_hidden", "massive_channels"))


def design_warnings(n_windows: int, n_positions: int, topic_ids: torch.Tensor) -> list[str]:
    """What a corpus of ``n_windows`` windows of ``n_positions`` measured positions cannot
    support: the context clustering with too few windows per topic
    (:func:`~tgeom.analyses.geometry.context.clustering_warnings`), and the positional part with
    fewer windows than positions: each ``pos_t`` averages ``C`` windows, so with ``C < T'`` the
    ``T'`` positional means still carry the windows' own tokens, and the estimated rank, stable
    rank and spiral read them (minilm, T' = 15: stable rank 5.5-7.4 from 4 windows against
    2.0-3.5 from 360)."""
    warnings = clustering_warnings(topic_ids)
    if n_windows < n_positions:
        warnings.append(
            f"pos_rank_*, pos_stable_rank: {n_windows} windows for {n_positions} positions: each "
            "positional mean averages fewer windows than there are positions, so the positional "
            "part still carries the windows' own tokens and its rank counts them; collect at "
            f"least {n_positions} windows"
        )
    return warnings


def check_measure_options(ctx_map: str, rank_method: str, conventions: str = "tgeom") -> None:
    """One-line error for an unknown ``--ctx-map``, ``--rank-threshold`` or ``--conventions``."""
    if conventions not in CONVENTIONS:
        raise TgeomError(
            f"--conventions must be one of {', '.join(CONVENTIONS)}, got {conventions!r}."
        )
    if ctx_map not in MAP_METHODS:
        raise TgeomError(f"--ctx-map must be one of {', '.join(MAP_METHODS)}, got {ctx_map!r}.")
    if rank_method not in RANK_METHODS:
        raise TgeomError(
            f"--rank-threshold must be one of {', '.join(RANK_METHODS)}, got {rank_method!r}."
        )


def measure(
    stats: GeometryStats,
    *,
    k_subspace: int = 10,
    low_freq: int = 10,
    drop_channels: int = 0,
    seed: int = 0,
    ctx_map: str = "pca",
    rank_method: str = "cubic",
    conventions: str = "tgeom",
    screenot_k: int = SCREENOT_K,
) -> GeometryResult:
    """Measure every hidden state of ``stats`` (see the module docstring for each quantity).

    ``ctx_map``: "pca" or "tsne" (the 2-D context map); ``rank_method``: how the Gavish-Donoho
    coefficient omega(beta) is computed for ``pos_rank_gavish_donoho`` ("cubic" or "exact", see
    :func:`tgeom.linalg.spectral.optimal_rank`); ``conventions``: "tgeom" or "paper", which
    definitions are the headline (:data:`HEADLINES`); ``screenot_k``: ScreeNOT's bound on the
    signal rank (20 in the [SZ] code). Under "paper" every headline quantity must exist:
    statistics without the second moment, or ``min(T', d) <= 2 k + 1`` (ScreeNOT), are refused
    with a one-line error."""
    check_measure_options(ctx_map, rank_method, conventions)
    topic_ids = stats.topic_ids
    check_context_design(stats.n_windows, topic_ids)
    d = stats.d_model
    if not 0 <= drop_channels < d - 1:
        raise TgeomError(f"--drop-channels must be between 0 and {d - 2}, got {drop_channels}.")
    if low_freq < 1:
        raise TgeomError(f"--low-freq must be at least 1, got {low_freq}.")
    if screenot_k < 0:
        raise TgeomError(f"--screenot-k must be at least 0, got {screenot_k}.")
    if conventions == "paper":
        _check_paper_conventions(stats, drop_channels, screenot_k)
    n = stats.n_windows * stats.n_positions
    mean_abs = stats.sum_abs / n  # [L+1, d]
    result = GeometryResult(
        by_hidden=[],
        massive_channels=[],
        topics=stats.topics,
        topic_ids=topic_ids.tolist(),
        positions=_positions(stats),
        meta=dict(stats.meta),
        options={
            "k_subspace": k_subspace,
            "low_freq": low_freq,
            "drop_channels": drop_channels,
            "seed": seed,
            "ctx_map": ctx_map,
            "rank_method": rank_method,
            "conventions": conventions,
            "screenot_k": screenot_k,
            **stats.meta.get("options", {}),
        },
        pos_singular_values=[],
        pos_coords=[],
        ctx_map=[],
        pos_ctx_cos=[],
        gram=[],
        gram_dct=[],
        warnings=design_warnings(stats.n_windows, stats.n_positions, topic_ids),
    )
    dct = dct_matrix(stats.n_positions)
    for hidden in range(stats.n_hidden):
        order = torch.argsort(mean_abs[hidden], descending=True)
        result.massive_channels.append(_massive(hidden, mean_abs[hidden], order))
        keep = torch.sort(order[drop_channels:]).values if drop_channels else None
        _measure_hidden(result, stats, hidden, keep, dct, k_subspace, low_freq, seed)
    return result


def _check_paper_conventions(stats: GeometryStats, drop_channels: int, k: int) -> None:
    """One-line errors for statistics the [SZ] code's definitions cannot be computed from."""
    if stats.second_moment is None:
        stats.raw_operator_norm_sq(0)  # raises the one-line "re-run geometry collect" error
    shape = (stats.n_positions, stats.d_model - drop_channels)
    if not screenot_fits(shape, k):
        raise TgeomError(
            f"--conventions paper estimates the rank by ScreeNOT with k={k}, which needs more "
            f"than {2 * k + 1} positions and channels (here {shape[0]} x {shape[1]}); collect "
            "with a longer --seq-len or pass a smaller --screenot-k."
        )


def _positions(stats: GeometryStats) -> list[int]:
    first = 0 if stats.meta.get("options", {}).get("keep_first") else 1
    return list(range(first, first + stats.n_positions))


def _massive(hidden: int, mean_abs: torch.Tensor, order: torch.Tensor) -> dict[str, Any]:
    top = order[:N_MASSIVE]
    median = float(mean_abs.median())
    return {
        "hidden": hidden,
        "channels": top.tolist(),
        "mean_abs": mean_abs[top].tolist(),
        "ratio_to_median": [float(v) / median if median > 0 else math.inf for v in mean_abs[top]],
    }


def _measure_hidden(
    result: GeometryResult,
    stats: GeometryStats,
    hidden: int,
    keep: torch.Tensor | None,
    dct: torch.Tensor,
    k_subspace: int,
    low_freq: int,
    seed: int,
) -> None:
    ctx_map, rank_method = result.options["ctx_map"], result.options["rank_method"]
    dec = stats.decomposition(hidden, keep)
    share_pos, share_ctx, share_resid = dec.shares()
    pos, ctx = dec.pos, dec.ctx
    u, s, _ = torch.linalg.svd(pos, full_matrices=False)
    unit = unit_rows(pos)
    gram = unit @ unit.T
    gram_dct = dct @ gram @ dct.T
    freq = torch.arange(gram.shape[0])
    low = (freq[:, None] <= low_freq) & (freq[None, :] <= low_freq)
    low[0, 0] = False
    non_dc = (gram_dct**2).sum() - gram_dct[0, 0] ** 2
    lowfreq_share = float((gram_dct[low] ** 2).sum() / non_dc) if non_dc > 0 else float("nan")
    coords = (u[:, :3] * s[:3]).numpy()
    if coords.shape[1] < 3:
        coords = np.pad(coords, ((0, 0), (0, 3 - coords.shape[1])))

    ctx_part = context_metrics(ctx, stats.topic_ids, seed, ctx_map)
    inc = incoherence(pos, ctx, k_subspace, seed)
    result.by_hidden.append(
        {
            "hidden": hidden,
            "var_share_pos": share_pos,
            "var_share_ctx": share_ctx,
            "var_share_resid": share_resid,
            "ss_total": dec.ss_total,
            "pos_stable_rank": stable_rank(s),
            "pos_rank_gavish_donoho": optimal_rank(s, tuple(pos.shape), rank_method),
            **_paper_and_tgeom_pos_metrics(
                stats, hidden, keep, pos, s, result.options["screenot_k"]
            ),
            "pos_lowfreq_share": lowfreq_share,
            **{k: v for k, v in ctx_part.items() if k != "ctx_map_2d"},
            **{k: v for k, v in inc.items() if k != "pos_ctx_cos"},
        }
    )
    result.pos_singular_values.append(s.numpy())
    result.pos_coords.append(coords)
    result.ctx_map.append(ctx_part["ctx_map_2d"])
    result.pos_ctx_cos.append(inc["pos_ctx_cos"])
    result.gram.append(gram.float().numpy())
    result.gram_dct.append(gram_dct.float().numpy())


def _paper_and_tgeom_pos_metrics(
    stats: GeometryStats,
    hidden: int,
    keep: torch.Tensor | None,
    pos: torch.Tensor,
    s: torch.Tensor,
    screenot_k: int,
) -> dict[str, Any]:
    """ScreeNOT rank, explained ratios and relative norms of ``pos [T', d]`` (singular values
    ``s``, descending), each in both definitions (module docstring); ``None`` where the
    statistics cannot give one."""
    energy, total = float((s**2).sum()), float(s.sum())
    out: dict[str, Any] = {}
    fits = screenot_fits(pos.shape, screenot_k)
    rank = screenot_rank(pos, screenot_k) if fits else None
    out["pos_rank_screenot"] = rank
    for k in (2, 3, 10):
        out[f"pos_explained_sq_top{k}"] = (
            float((s[:k] ** 2).sum()) / energy if energy > 0 else float("nan")
        )
    out["pos_explained_sv_screenot"] = (
        None if rank is None else (float(s[:rank].sum()) / total if total > 0 else float("nan"))
    )
    c = stats.n_windows
    sumsq = stats.sumsq[hidden] if keep is None else stats.sumsq[hidden, keep]
    h_fro_sq = float(sumsq.sum())  # ||H||_F^2; ||P_C||_F^2 = C ||P||_F^2 = C sum s^2
    out["pos_relative_norm_fro"] = math.sqrt(c * energy / h_fro_sq) if h_fro_sq > 0 else math.nan
    if stats.second_moment is None:
        out["pos_relative_norm_op"] = None
    else:
        h_op_sq = stats.raw_operator_norm_sq(hidden, keep)
        top = float(s[0]) if s.numel() else 0.0
        out["pos_relative_norm_op"] = (
            math.sqrt(c) * top / math.sqrt(h_op_sq) if h_op_sq > 0 else math.nan
        )
    return out
