"""Aligning two models that share a vocabulary, through their embedding spaces [DAR] section 5.1.

Each parameter vector ``x [d_A]`` of model A is read as vocabulary scores ``x @ E_A.T [V]`` and
each ``y [d_B]`` of model B as ``y @ E_B.T``; two vectors are compared by the Pearson correlation
of these scores across the V tokens (SPEC section 3). It is computed in closed form, never
forming a V-vector: with ``mu = E.sum(0) / V`` and centred covariances
``C_AB = (E_A - mu_A).T (E_B - mu_B) / V  [d_A, d_B]`` (``C_AA``, ``C_BB`` alike),

    rho(x, y) = x C_AB y.T / sqrt(x C_AA x.T * y C_BB y.T),

in float64. Per parameter group (FFN keys and values, W_Q/W_K/W_V columns, W_O rows) the mean
``|rho|`` over all pairs of vectors of (block a of A, block b of B) fills a similarity matrix;
blocks are matched with the Hungarian algorithm, then heads within matched blocks. The baseline
is the same Pearson on raw d-coordinates (only defined when ``d_A == d_B``): it is invariant to
nothing, whereas the vocabulary-space one is invariant to any rotation of a model's residual
basis applied to its embedding and weights together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from tgeom.errors import TgeomError
from tgeom.models.load import LoadedModel
from tgeom.models.weights import CanonicalWeights, LayerWeights
from tgeom.results import per_block_frame

if TYPE_CHECKING:
    import pandas as pd

ParameterGroup = Literal["ffn_key", "ffn_value", "W_Q", "W_K", "W_V", "W_O"]
PARAMETER_GROUPS: tuple[ParameterGroup, ...] = (
    "ffn_key",
    "ffn_value",
    "W_Q",
    "W_K",
    "W_V",
    "W_O",
)
HEAD_GROUPS: tuple[ParameterGroup, ...] = ("W_Q", "W_K", "W_V", "W_O")
Embedding = Literal["out", "in"]


def group_vectors(layer: LayerWeights, group: str) -> Tensor:
    """The d-vectors of one parameter group of a block, one per row ``[n, d]``.

    ``ffn_key``: columns of ``W_in`` (row i = neuron i); ``ffn_value``: rows of ``W_out``;
    ``W_Q``/``W_K``/``W_V``: columns of each head's matrix, head-major (row ``h * d_head + j`` =
    ``W[h][:, j]``); ``W_O``: rows of each head's matrix (row ``h * d_head + j`` = ``W_O[h][j]``),
    so that row r of ``W_V`` and row r of ``W_O`` are the two halves of one subhead.
    """
    if group == "ffn_key":
        return layer.W_in.T
    if group == "ffn_value":
        return layer.W_out
    if group in ("W_Q", "W_K", "W_V"):
        weight = getattr(layer, group)  # [H, d, dh]
        return weight.transpose(1, 2).reshape(-1, weight.shape[1])
    if group == "W_O":
        return layer.W_O.reshape(-1, layer.W_O.shape[-1])
    raise TgeomError(
        f"unknown parameter group '{group}'; choose from {', '.join(PARAMETER_GROUPS)}."
    )


def vocabulary_matrix(cw: CanonicalWeights, embedding: Embedding = "out") -> Tensor:
    """``E [V, d]``: the unembedding ``W_U`` ('out', default; ``W_E`` when tied or headless)
    or the input embedding ``W_E`` ('in')."""
    return cw.W_U if embedding == "out" else cw.W_E


@dataclass(frozen=True)
class VocabularyMoments:
    """Centred second moments of two embeddings over the shared vocabulary (float64)."""

    mean_A: Tensor  # [d_A]
    mean_B: Tensor  # [d_B]
    C_AB: Tensor  # [d_A, d_B]
    C_AA: Tensor  # [d_A, d_A]
    C_BB: Tensor  # [d_B, d_B]


def vocabulary_moments(E_A: Tensor, E_B: Tensor, chunk_size: int = 8192) -> VocabularyMoments:
    """Means and centred covariances of ``E_A [V, d_A]``, ``E_B [V, d_B]`` across V (float64).

    Rows are streamed in chunks of ``chunk_size``; memory is O(d^2), never O(V) beyond the inputs.
    """
    if E_A.shape[0] != E_B.shape[0]:
        raise TgeomError(
            f"the two embeddings have {E_A.shape[0]} and {E_B.shape[0]} rows: vocabulary-space "
            "comparison needs models that share a vocabulary."
        )
    V = E_A.shape[0]
    device = E_A.device
    mean_A = E_A.double().sum(0) / V
    mean_B = E_B.to(device).double().sum(0) / V
    d_A, d_B = E_A.shape[1], E_B.shape[1]
    C_AB = torch.zeros(d_A, d_B, dtype=torch.float64, device=device)
    C_AA = torch.zeros(d_A, d_A, dtype=torch.float64, device=device)
    C_BB = torch.zeros(d_B, d_B, dtype=torch.float64, device=device)
    for start in range(0, V, chunk_size):
        a = E_A[start : start + chunk_size].double() - mean_A
        b = E_B[start : start + chunk_size].to(device).double() - mean_B
        C_AB += a.T @ b
        C_AA += a.T @ a
        C_BB += b.T @ b
    return VocabularyMoments(mean_A, mean_B, C_AB / V, C_AA / V, C_BB / V)


def vocabulary_pearson(X: Tensor, Y: Tensor, moments: VocabularyMoments) -> Tensor:
    """``rho [n, m]``: Pearson correlation across V between ``X[i] @ E_A.T`` and ``Y[j] @ E_B.T``.

    ``X [n, d_A]``, ``Y [m, d_B]``. Closed form (module docstring), float64; NaN where a
    vector's scores are constant over the vocabulary (e.g. the zero vector).
    """
    x = X.to(moments.C_AB.device).double()
    y = Y.to(moments.C_AB.device).double()
    cov = x @ moments.C_AB @ y.T
    var_x = ((x @ moments.C_AA) * x).sum(-1).clamp(min=0.0)
    var_y = ((y @ moments.C_BB) * y).sum(-1).clamp(min=0.0)
    return _normalise(cov, var_x, var_y)


def raw_pearson(X: Tensor, Y: Tensor) -> Tensor:
    """``rho [n, m]``: Pearson correlation across the d raw coordinates of ``X[i]`` and ``Y[j]``."""
    x = X.double()
    y = Y.to(x.device).double()
    x = x - x.mean(-1, keepdim=True)
    y = y - y.mean(-1, keepdim=True)
    return _normalise(x @ y.T, (x * x).sum(-1), (y * y).sum(-1))


def _normalise(cov: Tensor, var_x: Tensor, var_y: Tensor) -> Tensor:
    denom = torch.sqrt(var_x[:, None] * var_y[None, :])
    ok = denom > 0
    return torch.where(ok, cov / torch.where(ok, denom, 1.0), torch.nan).clamp(-1.0, 1.0)


@dataclass
class HeadMatch:
    """Heads of block ``block_a`` of A matched to heads of block ``block_b`` of B.

    ``similarity [H_A, H_B]``: mean |rho| of subhead vectors, averaged over W_Q, W_K, W_V, W_O;
    ``pairs``: Hungarian matching ``(head of A, head of B)``.
    """

    block_a: int
    block_b: int
    similarity: Tensor
    pairs: list[tuple[int, int]]


@dataclass
class AlignmentResult:
    """Block-by-block similarity of two models in vocabulary space (and on raw coordinates).

    ``similarity[group] [L_A, L_B]``: mean |rho| per block; ``'mean'`` averages the groups.
    ``raw_similarity``: the same on raw coordinates, ``None`` when ``d_A != d_B``.
    ``block_matching[group]``: Hungarian pairs ``(block of A, block of B)``.
    """

    groups: list[str]
    similarity: dict[str, Tensor]
    raw_similarity: dict[str, Tensor] | None
    block_matching: dict[str, list[tuple[int, int]]]
    raw_block_matching: dict[str, list[tuple[int, int]]] | None
    head_matching: list[HeadMatch] = field(default_factory=list)
    options: dict[str, object] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """One row per (group, block of A, block of B): columns ``group``, ``block_a``,
        ``block_b``, ``similarity`` and ``raw_similarity`` (absent when ``d_A != d_B``)."""
        return per_block_frame(
            "group", {"similarity": self.similarity, "raw_similarity": self.raw_similarity}
        )


def hungarian(similarity: Tensor) -> list[tuple[int, int]]:
    """Pairs ``(row, col)`` maximising the summed similarity (rectangular allowed; NaN -> 0)."""
    cost = torch.nan_to_num(similarity.double(), nan=0.0).cpu().numpy()
    rows, cols = linear_sum_assignment(cost, maximize=True)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True)]


def _subsample(n: int, limit: int | None, generator: torch.Generator) -> Tensor:
    if limit is None or n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:limit].sort().values


def _mean_abs(rho: Tensor) -> float:
    return float(torch.nanmean(rho.abs()).item()) if rho.numel() else float("nan")


def align_models(
    cw_A: CanonicalWeights,
    cw_B: CanonicalWeights,
    *,
    groups: Sequence[str] = PARAMETER_GROUPS,
    per_block: int | None = 256,
    seed: int = 0,
    embedding: Embedding = "out",
    match_heads: bool = True,
) -> AlignmentResult:
    """Similarity matrices, block matching and head matching of two models ([DAR] 5.1).

    ``per_block``: at most this many vectors per (block, group) are drawn, seeded by ``seed``
    (``None`` = all). Head matching always uses every subhead vector of the matched blocks.
    """
    for group in groups:
        group_vectors(cw_A.layers[0], group)  # validates the name
    E_A, E_B = vocabulary_matrix(cw_A, embedding), vocabulary_matrix(cw_B, embedding)
    moments = vocabulary_moments(E_A, E_B)
    same_width = E_A.shape[1] == E_B.shape[1]
    gen_A = torch.Generator().manual_seed(seed)
    gen_B = torch.Generator().manual_seed(seed + 1)
    similarity: dict[str, Tensor] = {}
    raw: dict[str, Tensor] = {}
    for group in groups:
        xs = [_sampled(lw, group, per_block, gen_A) for lw in cw_A.layers]
        ys = [_sampled(lw, group, per_block, gen_B) for lw in cw_B.layers]
        similarity[group] = _block_means(xs, ys, lambda x, y: vocabulary_pearson(x, y, moments))
        if same_width:
            raw[group] = _block_means(xs, ys, raw_pearson)
    similarity["mean"] = torch.stack([similarity[g] for g in groups]).mean(0)
    matching = {g: hungarian(s) for g, s in similarity.items()}
    raw_matching = None
    if same_width:
        raw["mean"] = torch.stack([raw[g] for g in groups]).mean(0)
        raw_matching = {g: hungarian(s) for g, s in raw.items()}
    heads = []
    if match_heads:
        heads = [
            match_heads_of_blocks(cw_A.layers[a], cw_B.layers[b], moments, a, b)
            for a, b in matching["mean"]
        ]
    options: dict[str, object] = {
        "per_block": per_block,
        "seed": seed,
        "embedding": embedding,
        "statistic": "mean |rho|",
    }
    return AlignmentResult(
        groups=list(groups),
        similarity=similarity,
        raw_similarity=raw if same_width else None,
        block_matching=matching,
        raw_block_matching=raw_matching,
        head_matching=heads,
        options=options,
    )


def _sampled(lw: LayerWeights, group: str, limit: int | None, gen: torch.Generator) -> Tensor:
    vectors = group_vectors(lw, group)
    return vectors[_subsample(vectors.shape[0], limit, gen).to(vectors.device)]


def _block_means(xs: list[Tensor], ys: list[Tensor], pearson) -> Tensor:  # type: ignore[no-untyped-def]
    out = torch.empty(len(xs), len(ys), dtype=torch.float64)
    for a, x in enumerate(xs):
        rho = pearson(x, torch.cat(ys))  # [n_a, sum n_b]
        for b, part in enumerate(rho.split([y.shape[0] for y in ys], dim=1)):
            out[a, b] = _mean_abs(part)
    return out


def match_heads_of_blocks(
    lw_A: LayerWeights, lw_B: LayerWeights, moments: VocabularyMoments, block_a: int, block_b: int
) -> HeadMatch:
    """Head-by-head similarity of two blocks and its Hungarian matching."""
    H_A, H_B = lw_A.W_Q.shape[0], lw_B.W_Q.shape[0]
    sims = []
    for group in HEAD_GROUPS:
        rho = vocabulary_pearson(group_vectors(lw_A, group), group_vectors(lw_B, group), moments)
        rho = rho.abs().reshape(H_A, rho.shape[0] // H_A, H_B, rho.shape[1] // H_B)
        sims.append(torch.nanmean(rho.permute(0, 2, 1, 3).reshape(H_A, H_B, -1), dim=-1))
    similarity = torch.stack(sims).mean(0)
    return HeadMatch(block_a, block_b, similarity, hungarian(similarity))


def check_shared_vocabulary(lm_A: LoadedModel, lm_B: LoadedModel, purpose: str) -> None:
    """Raise a one-line TgeomError unless the two models have the same tokens in the same order."""
    V_A, V_B = lm_A.summary.vocab_size, lm_B.summary.vocab_size
    if V_A != V_B:
        raise TgeomError(
            f"{purpose} needs models that share a vocabulary, but {lm_A.source} has {V_A} "
            f"tokens and {lm_B.source} has {V_B}: pick two models with the same tokenizer."
        )
    tokens_A, tokens_B = _tokens_by_id(lm_A), _tokens_by_id(lm_B)
    for index in range(V_A):
        a, b = tokens_A.get(index), tokens_B.get(index)
        if a != b:
            raise TgeomError(
                f"{purpose} needs models that share a vocabulary, but token {index} is {a!r} in "
                f"{lm_A.source} and {b!r} in {lm_B.source}: pick two models with the same "
                "tokenizer."
            )


def _tokens_by_id(lm: LoadedModel) -> dict[int, str]:
    get_vocab = getattr(lm.tokenizer, "get_vocab", None)
    if get_vocab is not None:
        return {int(i): str(t) for t, i in get_vocab().items()}
    return dict(enumerate(lm.vocab_strings))
