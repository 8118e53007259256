"""Hidden token attribution [BRU] (SPEC section 5).

``c^l_ij = ||d h^l_i / d x_j||_F / sum_k ||d h^l_i / d x_k||_F`` over the real tokens of one
sequence, with ``x = hidden[0]`` and the plain differentiable forward of
:mod:`tgeom.models.reference`.

- Exact mode: forward-mode Jacobian-vector products along every input coordinate ``e_(j,k)``
  (T * d tangents, batched with ``vmap``); one JVP gives ``d h^l_i / d x_(j,k)`` for every layer l
  and every output token i at once, so ``||J^l_ij||_F^2 = sum_k ||J^l_i e_(j,k)||^2``.
- Estimate mode: Hutchinson-style random Gaussian tangents supported on one input token:
  ``E ||J^l_ij u||^2 = ||J^l_ij||_F^2``; ``samples`` tangents per input token, with the standard
  error of each squared-norm estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tgeom.errors import TgeomError
from tgeom.models.reference import embed, run_blocks


@dataclass
class AttributionResult:
    """``norms [L+1, T, T]`` (``||J^l_ij||_F``), ``contributions [L+1, T, T]`` (rows sum to 1),
    ``norm_se`` (estimate mode: standard error of the norms), the tokens and the mode."""

    tokens: list[str]
    norms: Tensor
    contributions: Tensor
    mode: str
    samples: int | None = None
    norm_se: Tensor | None = None

    def per_layer(self) -> list[dict[str, Any]]:
        c = self.contributions
        T = c.shape[-1]
        own = c.diagonal(dim1=-2, dim2=-1)  # [L+1, T]
        top_other = (c.argmax(-1) != torch.arange(T)).double().mean(-1)
        offsets = torch.arange(T)[None, :] - torch.arange(T)[:, None]  # j - i
        rows = []
        for layer in range(c.shape[0]):
            by_distance = [
                {"offset": int(o), "mean_contribution": float(c[layer][offsets == o].mean())}
                for o in range(-(T - 1), T)
            ]
            rows.append(
                {
                    "layer": layer,
                    "own_contribution": float(own[layer].mean()),
                    "top_contributor_not_own": float(top_other[layer]),
                    "by_relative_position": by_distance,
                }
            )
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "samples": self.samples,
            "tokens": self.tokens,
            "layers": self.per_layer(),
            "contributions": self.contributions,
            "norm_standard_errors": self.norm_se,
        }


def _forward(cw: Any, mask: Tensor | None) -> Any:
    def f(x: Tensor) -> Tensor:
        return torch.stack(run_blocks(cw, x, mask))[:, 0]  # [L+1, T, d]

    return f


def squared_norms_exact(cw: Any, x0: Tensor, chunk: int = 64) -> Tensor:
    """``||J^l_ij||_F^2 [L+1, T, T]`` from T*d forward-mode JVPs (``x0 [1, T, d]``)."""
    _, T, d = x0.shape
    f = _forward(cw, None)
    jvp_one = lambda tangent: torch.func.jvp(f, (x0,), (tangent,))[1]  # noqa: E731
    batched = torch.func.vmap(jvp_one)
    G = torch.zeros(len(cw.layers) + 1, T, T, dtype=x0.dtype)
    directions = torch.arange(T * d)
    for start in range(0, T * d, chunk):
        idx = directions[start : start + chunk]
        tangents = torch.zeros(len(idx), 1, T, d, dtype=x0.dtype)
        tangents[torch.arange(len(idx)), 0, idx // d, idx % d] = 1.0
        out = batched(tangents)  # [m, L+1, T, d]
        sq = (out**2).sum(-1)  # [m, L+1, T]  (output token i)
        G.index_add_(2, idx // d, sq.permute(1, 2, 0))  # add to column j of each direction
    return G


def squared_norms_estimate(
    cw: Any, x0: Tensor, samples: int, seed: int, chunk: int = 64
) -> tuple[Tensor, Tensor]:
    """Hutchinson estimates of ``||J^l_ij||_F^2`` and their standard errors ``[L+1, T, T]``."""
    _, T, d = x0.shape
    f = _forward(cw, None)
    batched = torch.func.vmap(lambda t: torch.func.jvp(f, (x0,), (t,))[1])
    g = torch.Generator().manual_seed(seed)
    draws = torch.zeros(samples, len(cw.layers) + 1, T, T, dtype=x0.dtype)
    pairs = [(j, s) for j in range(T) for s in range(samples)]
    for start in range(0, len(pairs), chunk):
        block = pairs[start : start + chunk]
        tangents = torch.zeros(len(block), 1, T, d, dtype=x0.dtype)
        for row, (j, _) in enumerate(block):
            tangents[row, 0, j] = torch.randn(d, generator=g, dtype=x0.dtype)
        sq = (batched(tangents) ** 2).sum(-1)  # [m, L+1, T]
        for row, (j, s) in enumerate(block):
            draws[s, :, :, j] = sq[row]
    mean = draws.mean(0)
    se = draws.std(0) / samples**0.5 if samples > 1 else torch.full_like(mean, float("nan"))
    return mean, se


def token_attribution(
    lm: Any, token_ids: Tensor, *, mode: str = "exact", samples: int = 64, seed: int = 0
) -> AttributionResult:
    """Attribution of every hidden token to every input token, every layer, one sequence."""
    ids = token_ids.reshape(1, -1).cpu()
    T = ids.shape[1]
    if T < 2:
        raise TgeomError("the text gives fewer than 2 tokens; pass a longer --text.")
    if lm.summary.n_ctx < T:
        raise TgeomError(
            f"the sequence has {T} tokens, more than the model context ({lm.summary.n_ctx})."
        )
    cw = lm.weights()
    with torch.no_grad():
        x0 = embed(cw, ids.to(cw.W_E.device)).detach()
    if mode == "exact":
        G = squared_norms_exact(cw, x0)
        se = None
    elif mode == "estimate":
        if samples < 2:
            raise TgeomError("estimate mode needs --samples >= 2 (for standard errors).")
        G, G_se = squared_norms_estimate(cw, x0, samples, seed)
        se = G_se / (2 * G.clamp_min(1e-30).sqrt())  # delta method for the norm
    else:
        raise TgeomError(f"mode must be exact or estimate, got {mode!r}.")
    norms = G.clamp_min(0).sqrt().double()
    contributions = norms / norms.sum(-1, keepdim=True).clamp_min(1e-30)
    return AttributionResult(
        lm.token_strings(ids[0]),
        norms,
        contributions,
        mode,
        samples if mode == "estimate" else None,
        se.double() if se is not None else None,
    )
