"""Hidden token attribution [BRU] (SPEC section 5).

``c^l_ij = ||d h^l_i / d x_j||_F / sum_k ||d h^l_i / d x_k||_F`` over the real tokens of one
sequence, for every hidden state ``l`` = 0..L (0 = the embedding output), with ``x = hidden[0]``
and the plain differentiable forward of
:mod:`tgeom.models.reference`.

- Exact mode: forward-mode Jacobian-vector products along every input coordinate ``e_(j,k)``
  (T * d tangents, batched with ``vmap``); one JVP gives ``d h^l_i / d x_(j,k)`` for every hidden
  state l and every output token i at once, so ``||J^l_ij||_F^2 = sum_k ||J^l_i e_(j,k)||^2``.
- Estimate mode: Hutchinson-style random Gaussian tangents supported on one input token:
  ``E ||J^l_ij u||^2 = ||J^l_ij||_F^2``; ``samples`` tangents per input token, with the standard
  error of each squared-norm estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tgeom.errors import TgeomError
from tgeom.models.reference import embed, run_blocks
from tgeom.results import results_frame

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class AttributionResult:
    """``norms [L+1, T, T]`` (``||J^l_ij||_F``), ``contributions [L+1, T, T]`` (rows sum to 1),
    ``norm_se`` / ``contribution_se`` (estimate mode: standard errors), the tokens and the mode."""

    tokens: list[str]
    norms: Tensor
    contributions: Tensor
    mode: str
    samples: int | None = None
    norm_se: Tensor | None = None
    contribution_se: Tensor | None = None

    @property
    def own_contribution(self) -> Tensor:
        """Mean own-token contribution ``c^l_ii`` per hidden state ``[L+1]``."""
        return self.contributions.diagonal(dim1=-2, dim2=-1).mean(-1)

    @property
    def top_contributor_not_own(self) -> Tensor:
        """Share of tokens whose largest contributor is another token, per hidden state
        ``[L+1]``."""
        T = self.contributions.shape[-1]
        return (self.contributions.argmax(-1) != torch.arange(T)).double().mean(-1)

    def per_hidden(self) -> list[dict[str, Any]]:
        """Per hidden state 0..L: own contribution, not-own-top share, mean ``c_ij`` by offset
        ``j - i``."""
        c = self.contributions
        T = c.shape[-1]
        own = c.diagonal(dim1=-2, dim2=-1)  # [L+1, T]
        top_other = (c.argmax(-1) != torch.arange(T)).double().mean(-1)
        offsets = torch.arange(T)[None, :] - torch.arange(T)[:, None]  # j - i
        rows = []
        for hidden in range(c.shape[0]):
            by_distance = [
                {"offset": int(o), "mean_contribution": float(c[hidden][offsets == o].mean())}
                for o in range(-(T - 1), T)
            ]
            rows.append(
                {
                    "hidden": hidden,
                    "own_contribution": float(own[hidden].mean()),
                    "top_contributor_not_own": float(top_other[hidden]),
                    "by_relative_position": by_distance,
                }
            )
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "samples": self.samples,
            "tokens": self.tokens,
            "n_blocks": int(self.contributions.shape[0]) - 1,
            "n_hidden": int(self.contributions.shape[0]),
            "by_hidden": self.per_hidden(),
            "contributions": self.contributions,
            "norm_standard_errors": self.norm_se,
            "contribution_standard_errors": self.contribution_se,
        }

    def to_frame(self, table: str = "by_hidden") -> pd.DataFrame:
        """``by_hidden`` (one row per hidden state) or ``by_hidden.by_relative_position`` (one row
        per hidden state and offset ``j - i``, led by its own fields) as a DataFrame."""
        tables = ("by_hidden", "by_hidden.by_relative_position")
        return results_frame(self.to_json(), table, tables)


def _forward(cw: Any, mask: Tensor | None) -> Any:
    def f(x: Tensor) -> Tensor:
        return torch.stack(run_blocks(cw, x, mask))[:, 0]  # [L+1, T, d]

    return f


def _auto_chunk(x0: Tensor, n_outputs: int) -> int:
    """Tangents per vmap call: about 256 MB (CPU) or 4 GB (GPU) of tangent outputs."""
    per_tangent = n_outputs * x0.shape[1] * x0.shape[2] * 4 * 8  # x8: intermediate activations
    budget = (4 << 30) if x0.device.type == "cuda" else (256 << 20)
    return max(1, min(4096, budget // per_tangent))


def squared_norms_exact(
    cw: Any, x0: Tensor, chunk: int | None = None, inputs: list[int] | None = None
) -> Tensor:
    """``||J^l_ij||_F^2 [L+1, T, T]`` from T*d forward-mode JVPs (``x0 [1, T, d]``): the tangent
    ``e_(j,k)`` gives column k of ``d h^l_i / d x_j`` for every hidden state l and token i at once.
    ``inputs``: only these input tokens j (``len(inputs) * d`` JVPs), result ``[L+1, T, k]``."""
    _, T, d = x0.shape
    L1 = len(cw.layers) + 1
    chunk = chunk or _auto_chunk(x0, L1)
    f = _forward(cw, None)
    batched = torch.func.vmap(lambda tangent: torch.func.jvp(f, (x0,), (tangent,))[1])
    columns = list(range(T)) if inputs is None else list(inputs)
    G = torch.zeros(L1, T, len(columns), dtype=torch.float64, device=x0.device)
    token = torch.tensor(columns, device=x0.device).repeat_interleave(d)  # direction -> token j
    column = torch.arange(len(columns), device=x0.device).repeat_interleave(d)
    coordinate = torch.arange(d, device=x0.device).repeat(len(columns))
    for start in range(0, len(token), chunk):
        part = slice(start, start + chunk)
        m = len(token[part])
        tangents = torch.zeros(m, 1, T, d, dtype=x0.dtype, device=x0.device)
        tangents[torch.arange(m, device=x0.device), 0, token[part], coordinate[part]] = 1.0
        sq = (batched(tangents).double() ** 2).sum(-1)  # [m, L+1, T]  (output token i)
        G.index_add_(2, column[part], sq.permute(1, 2, 0))  # add to column j of each direction
    return G.cpu()


def squared_norms_estimate(
    cw: Any,
    x0: Tensor,
    samples: int,
    seed: int,
    chunk: int | None = None,
    inputs: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Hutchinson estimates of ``||J^l_ij||_F^2`` and their standard errors ``[L+1, T, T]``:
    ``samples`` Gaussian tangents supported on input token j, ``E ||J^l_ij u||^2 = ||J^l_ij||_F^2``
    (draws for different j are independent). ``inputs``: only these input tokens j (the same
    draws as the full run), results ``[L+1, T, k]``."""
    _, T, d = x0.shape
    L1 = len(cw.layers) + 1
    chunk = chunk or _auto_chunk(x0, L1)
    f = _forward(cw, None)
    batched = torch.func.vmap(lambda t: torch.func.jvp(f, (x0,), (t,))[1])
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(T * samples, d, generator=g, dtype=torch.float64).to(x0.device, x0.dtype)
    columns = torch.tensor(list(range(T)) if inputs is None else list(inputs), device=x0.device)
    token = columns.repeat_interleave(samples)  # pair p -> input token j
    column = torch.arange(len(columns), device=x0.device).repeat_interleave(samples)
    draw = torch.arange(samples, device=x0.device).repeat(len(columns))
    draws = torch.zeros(samples, L1, T, len(columns), dtype=torch.float64, device=x0.device)
    for start in range(0, len(token), chunk):
        p = torch.arange(start, min(start + chunk, len(token)), device=x0.device)
        tangents = torch.zeros(len(p), 1, T, d, dtype=x0.dtype, device=x0.device)
        tangents[torch.arange(len(p), device=x0.device), 0, token[p]] = u[
            token[p] * samples + draw[p]
        ]
        sq = (batched(tangents).double() ** 2).sum(-1)  # [m, L+1, T(i)]
        draws[draw[p], :, :, column[p]] = sq
    mean = draws.mean(0)
    se = draws.std(0) / samples**0.5 if samples > 1 else torch.full_like(mean, float("nan"))
    return mean.cpu(), se.cpu()


def contribution_standard_errors(norms: Tensor, norm_se: Tensor) -> Tensor:
    """Delta-method standard errors of ``c_ij = n_ij / S_i`` (``S_i = sum_k n_ik``) from
    independent norm estimates: ``var c_ij = ((S - n_ij)^2 se_ij^2 + n_ij^2 sum_{k!=j} se_ik^2)
    / S^4``."""
    S = norms.sum(-1, keepdim=True).clamp_min(1e-30)
    var = norm_se**2
    others = var.sum(-1, keepdim=True) - var
    return (((S - norms) ** 2 * var + norms**2 * others) / S**4).sqrt()


def token_attribution(
    lm: Any, token_ids: Tensor, *, mode: str = "exact", samples: int = 64, seed: int = 0
) -> AttributionResult:
    """Attribution of every hidden token to every input token, every hidden state, for one sequence
    ``token_ids [T]`` or ``[1, T]`` (all real tokens)."""
    ids = token_ids.reshape(1, -1).cpu()
    T = ids.shape[1]
    if T < 2:
        raise TgeomError("the text gives fewer than 2 tokens; pass a longer --text.")
    if lm.summary.n_ctx < T:
        raise TgeomError(
            f"the sequence has {T} tokens, more than the model context ({lm.summary.n_ctx}); "
            "pass a shorter text."
        )
    if mode not in ("exact", "estimate"):
        raise TgeomError(f"mode must be exact or estimate, got {mode!r}.")
    if mode == "estimate" and samples < 2:
        raise TgeomError("estimate mode needs --samples >= 2 (for standard errors).")
    cw = lm.weights()
    with torch.no_grad():
        x0 = embed(cw, ids.to(cw.W_E.device)).detach()
    se = c_se = None
    if mode == "exact":
        G = squared_norms_exact(cw, x0)
    else:
        G, G_se = squared_norms_estimate(cw, x0, samples, seed)
        se = G_se / (2 * G.clamp_min(1e-30).sqrt())  # delta method for the norm
    norms = G.clamp_min(0).sqrt().double()
    contributions = norms / norms.sum(-1, keepdim=True).clamp_min(1e-30)
    if se is not None:
        c_se = contribution_standard_errors(norms, se)
    return AttributionResult(
        lm.token_strings(ids[0].tolist()),
        norms,
        contributions,
        mode,
        samples if mode == "estimate" else None,
        se,
        c_se,
    )
