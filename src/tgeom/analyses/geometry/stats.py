"""Running float64 statistics of hidden states for the position/context decomposition [SZ].

SPEC section 4. For each hidden state ``l`` (0 = embedding output, ``l`` = output of block
``l - 1``) and its vectors ``h[c, t]`` (C windows x T' positions,
position 0 dropped unless ``keep_first``):

- ``mu = mean_{c,t} h``, ``pos_t = mean_c h[c, t] - mu``, ``ctx_c = mean_t h[c, t] - mu``,
  ``resid[c, t] = h[c, t] - mu - pos_t - ctx_c``.

:class:`GeometryStats` holds only running sums, never the ``[C, T, d]`` tensor: the total sum
``[L+1, d]``, per-position sums ``[L+1, T', d]``, per-window means ``[C, L+1, d]``, per-channel
sums of squares and of absolute values ``[L+1, d]`` and (unless collected without it) the
second moment ``sum_{c,t} h h^T`` ``[L+1, d, d]``, from which the operator norm of the raw
hidden-state matrix ``H [C T', d]`` follows (``||H||_2^2 = lambda_max(H^T H)``; the [SZ] code's
relative norm needs it). Memory is ``O(L d (T' + C + d))``.

Residual statistics come *exactly from this first pass*: in a balanced design (every window has
all T' positions) the two-way ANOVA identity
``sum ||h - mu||^2 = C sum_t ||pos_t||^2 + T' sum_c ||ctx_c||^2 + sum ||resid||^2``
holds, so the residual sum of squares is the total minus the other two (no second pass and no
held-out sample are needed); it is also exact per channel.

Saved as one safetensors file whose metadata holds the identity (model, seq_len, corpus, topics,
options, windows done) plus a human-readable JSON sidecar; written atomically (temp + rename), so
a checkpoint is either the old or the new one, and ``n_done`` says how many windows it holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tgeom.errors import TgeomError
from tgeom.results import atomic_replace, atomic_write_text

STATS_FILE = "geometry_stats.safetensors"
FORMAT = "tgeom.geometry_stats/1"


@dataclass
class GeometryStats:
    """Running sums of one model's hidden states over C windows (float64, on the CPU)."""

    sum_total: Tensor  # [L+1, d]
    sum_pos: Tensor  # [L+1, T', d]   sum over windows of h[c, t]
    ctx_means: Tensor  # [C, L+1, d]   mean over positions of h[c, t] (rows >= n_done unset)
    sumsq: Tensor  # [L+1, d]        sum over (c, t) of h^2, per channel
    sum_abs: Tensor  # [L+1, d]      sum over (c, t) of |h|, per channel
    n_done: int  # windows accumulated so far
    meta: dict[str, Any] = field(default_factory=dict)
    second_moment: Tensor | None = None  # [L+1, d, d]  sum over (c, t) of h h^T (or None)

    SUMS = ("sum_total", "sum_pos", "sumsq", "sum_abs", "second_moment")  # added over windows

    # -- shapes and identity -------------------------------------------------------------
    @property
    def n_windows(self) -> int:
        return int(self.ctx_means.shape[0])

    @property
    def n_positions(self) -> int:
        return int(self.sum_pos.shape[1])

    @property
    def n_hidden(self) -> int:
        """Hidden states per window: the embedding output and each block's output (L + 1)."""
        return int(self.sum_total.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.sum_total.shape[1])

    @property
    def complete(self) -> bool:
        return self.n_done == self.n_windows

    @property
    def topic_ids(self) -> Tensor:
        return torch.tensor(self.meta.get("topic_ids", []), dtype=torch.int64)

    @property
    def topics(self) -> list[str]:
        return list(self.meta.get("topics", []))

    def running_sums(self) -> dict[str, Tensor]:
        """The tensors that are sums over windows (what a sharded job all-reduces), by name."""
        sums = {name: getattr(self, name) for name in self.SUMS}
        return {name: value for name, value in sums.items() if value is not None}

    def raw_operator_norm_sq(self, hidden: int, channels: Tensor | None = None) -> float:
        """``||H||_2^2`` of the raw vectors ``H [C T', d]`` of hidden state ``hidden`` (0..L, mean
        included), restricted to ``channels``: the largest eigenvalue of the second moment."""
        if self.second_moment is None:
            raise TgeomError(
                "these statistics hold no [d, d] second moment (collected by an older tgeom or "
                "with --no-second-moment), so the raw operator norm is unknown; re-run "
                "`tgeom geometry collect` into a fresh --out."
            )
        from scipy.linalg import eigh

        m = self.second_moment[hidden]
        if channels is not None:
            m = m[channels][:, channels]
        top = m.shape[0] - 1  # only the largest eigenvalue is computed
        return float(eigh(m.numpy(), eigvals_only=True, subset_by_index=[top, top])[0])

    @classmethod
    def empty(
        cls,
        n_hidden: int,
        n_positions: int,
        n_windows: int,
        d: int,
        meta: dict[str, Any],
        second_moment: bool = True,
    ) -> GeometryStats:
        f64 = torch.float64
        return cls(
            sum_total=torch.zeros(n_hidden, d, dtype=f64),
            sum_pos=torch.zeros(n_hidden, n_positions, d, dtype=f64),
            ctx_means=torch.zeros(n_windows, n_hidden, d, dtype=f64),
            sumsq=torch.zeros(n_hidden, d, dtype=f64),
            sum_abs=torch.zeros(n_hidden, d, dtype=f64),
            n_done=0,
            meta=dict(meta),
            second_moment=torch.zeros(n_hidden, d, d, dtype=f64) if second_moment else None,
        )

    @classmethod
    def from_hidden(
        cls,
        hidden: Tensor,
        topic_ids: Tensor,
        topics: list[str],
        meta: dict[str, Any] | None = None,
    ) -> GeometryStats:
        """Statistics of hidden states already in memory, ``hidden [L+1, C, T', d]`` (positions
        already chosen), e.g. synthetic ones; ``topic_ids [C]`` index ``topics``."""
        h = hidden.double()
        stats = cls(
            sum_total=h.sum(dim=(1, 2)),
            sum_pos=h.sum(dim=1),
            ctx_means=h.mean(dim=2).transpose(0, 1).contiguous(),
            sumsq=(h * h).sum(dim=(1, 2)),
            sum_abs=h.abs().sum(dim=(1, 2)),
            second_moment=torch.einsum("lcti,lctj->lij", h, h),
            n_done=int(h.shape[1]),
            meta={
                **(meta or {}),
                "topics": list(topics),
                "topic_ids": topic_ids.tolist(),
                "seq_len": int(h.shape[2]),
                "options": {"keep_first": True},
            },
        )
        return stats

    # -- the decomposition ----------------------------------------------------------------
    def decomposition(self, hidden: int, channels: Tensor | None = None) -> Decomposition:
        """mu, pos, ctx and the sums of squares of hidden state ``hidden`` (0..L), restricted to
        ``channels``."""
        if not self.complete:
            raise TgeomError(
                f"the statistics hold {self.n_done} of {self.n_windows} windows; run "
                "`tgeom geometry collect` again with the same arguments to finish them."
            )
        keep = slice(None) if channels is None else channels
        c, t = self.n_windows, self.n_positions
        n = c * t
        mu = self.sum_total[hidden, keep] / n
        pos = self.sum_pos[hidden][:, keep] / c - mu
        ctx = self.ctx_means[:, hidden, keep] - mu
        total = float(self.sumsq[hidden, keep].sum()) - n * float(mu @ mu)
        ss_pos = c * float((pos**2).sum())
        ss_ctx = t * float((ctx**2).sum())
        return Decomposition(mu, pos, ctx, total, ss_pos, ss_ctx, total - ss_pos - ss_ctx)

    # -- save / load ----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the statistics atomically to ``path`` (a ``.safetensors`` file or a folder),
        plus a JSON sidecar next to it (``.json``; informative, the safetensors metadata rules)."""
        from safetensors.torch import save_file

        target = _stats_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        header = {**self.meta, "format": FORMAT, "n_done": self.n_done}
        tensors = {
            "sum_total": self.sum_total,
            "sum_pos": self.sum_pos,
            "ctx_means": self.ctx_means,
            "sumsq": self.sumsq,
            "sum_abs": self.sum_abs,
        }
        if self.second_moment is not None:
            tensors["second_moment"] = self.second_moment
        with atomic_replace(target) as tmp:
            save_file(
                {k: v.contiguous() for k, v in tensors.items()},
                str(tmp),
                metadata={"tgeom": json.dumps(header)},
            )
        atomic_write_text(target.with_suffix(".json"), json.dumps(header, indent=1) + "\n")
        return target

    @classmethod
    def load(cls, path: str | Path) -> GeometryStats:
        """Read statistics written by :meth:`save` (``path``: the file or its folder)."""
        from safetensors import safe_open

        target = _stats_path(path)
        if not target.is_file():
            raise TgeomError(
                f"no geometry statistics at {target}; run `tgeom geometry collect` first."
            )
        try:
            with safe_open(str(target), framework="pt") as handle:
                header = json.loads((handle.metadata() or {}).get("tgeom", "{}"))
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        except Exception as exc:  # a truncated or foreign file
            raise TgeomError(
                f"{target} is not a readable geometry statistics file: {exc}"
            ) from None
        if header.get("format") != FORMAT:
            raise TgeomError(f"{target} is not a tgeom geometry statistics file.")
        n_done = int(header.pop("n_done"))
        header.pop("format")
        return cls(n_done=n_done, meta=header, **tensors)


@dataclass
class Decomposition:
    """One hidden state's parts: ``mu [d]``, ``pos [T', d]``, ``ctx [C, d]`` and the sums of squares
    ``ss_total = ss_pos + ss_ctx + ss_resid`` (balanced two-way ANOVA)."""

    mu: Tensor
    pos: Tensor
    ctx: Tensor
    ss_total: float
    ss_pos: float
    ss_ctx: float
    ss_resid: float

    def shares(self) -> tuple[float, float, float]:
        """Variance shares (pos, ctx, resid); they sum to 1."""
        if self.ss_total <= 0:
            return float("nan"), float("nan"), float("nan")
        return (
            self.ss_pos / self.ss_total,
            self.ss_ctx / self.ss_total,
            self.ss_resid / self.ss_total,
        )


def _stats_path(path: str | Path) -> Path:
    path = Path(path)
    return path / STATS_FILE if path.is_dir() or path.suffix != ".safetensors" else path
