"""Validation experiments of reading parameters in embedding space, [DAR] section 4 (SPEC 3).

**R_k** (parameters vs hidden states). At every token position of a corpus and every layer l,
the FFN neurons most active on that position are compared with the position's hidden state:
the overlap ``|top_k(v @ E.T) ∩ top_k(lens(h))|`` between the top-k tokens of each selected
neuron's value vector ``v`` (row of ``W_out``, projected raw) and the top-k tokens of the logit
lens of ``hidden[l + 1]`` (the block's output: final norm, then ``W_U``). Our choice, stated in
the results: by default a neuron's activity is its contribution size ``|a| * ||v||`` and its
tokens are those of ``sign(a) * v`` (the direction it actually writes; 'contribution'); the
paper-like alternative ranks by the signed activation ``a`` and reads ``v`` itself
('activation'). Baseline: the same, with each layer's neuron ids passed through a fixed random
permutation (the same number of equally active-looking but unrelated parameters).

**Sim_k** (related parameter pairs). For every layer, the Jaccard overlap of the top-k tokens of
the two halves of related pairs: key/value of one FFN neuron, W_V column / W_O row of one
subhead, W_Q / W_K column of one subhead; baseline: the same vectors with the second half of
each pair shuffled within the layer (seeded).

Both stream the corpus batch by batch and keep float64 running sums only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tgeom.analyses.embedding.alignment import Embedding, group_vectors, vocabulary_matrix
from tgeom.capture import iter_captures
from tgeom.errors import TgeomError
from tgeom.models.load import LoadedModel
from tgeom.models.reference import attention_bias, attention_output, logits, mlp_activations
from tgeom.models.weights import CanonicalWeights
from tgeom.runtime import Runtime

SIM_PAIRS: dict[str, tuple[str, str]] = {
    "ffn_key_value": ("ffn_key", "ffn_value"),
    "W_V_W_O": ("W_V", "W_O"),
    "W_Q_W_K": ("W_Q", "W_K"),
}
SCORE_BUDGET = 2**24  # entries of one [rows, V] score block


def topk_tokens(
    vectors: Tensor,
    E: Tensor,
    k: int,
    *,
    largest: bool = True,
    exclude_ids: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(ids [n, k] int64, scores [n, k])``: the top-k tokens of ``vectors [n, d] @ E.T``.

    Rows are processed in blocks of at most ``SCORE_BUDGET`` scores; excluded ids are masked
    before selection. ``largest=False`` gives the bottom-k (most negative first).
    """
    V = E.shape[0]
    allowed = V - len(set(exclude_ids or ()))
    if not 1 <= k <= allowed:
        raise TgeomError(f"k = {k} is out of range: valid k are 1..{allowed} for this vocabulary.")
    vectors = vectors.to(E.device, E.dtype)
    step = max(1, SCORE_BUDGET // V)
    excluded = torch.as_tensor(list(exclude_ids or ()), dtype=torch.long, device=E.device)
    ids, scores = [], []
    for start in range(0, vectors.shape[0], step):
        block = vectors[start : start + step] @ E.T
        if not largest:
            block = -block
        if excluded.numel():
            block[:, excluded] = -torch.inf
        s, i = block.topk(k, dim=-1)
        ids.append(i)
        scores.append(s if largest else -s)
    if not ids:
        return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
    return torch.cat(ids), torch.cat(scores)


def jaccard(a: Tensor, b: Tensor) -> Tensor:
    """Jaccard overlap ``[n]`` of the id sets in the rows of ``a [n, k]`` and ``b [n, k]``."""
    shared = (a[:, :, None] == b[:, None, :]).any(-1).sum(-1).double()
    return shared / (a.shape[1] + b.shape[1] - shared)


@dataclass
class SimKResult:
    """Sim_k per layer: ``similarity[pair][l]`` and ``shuffled[pair][l]`` (mean Jaccard)."""

    k: int
    similarity: dict[str, list[float]]
    shuffled: dict[str, list[float]]
    n_pairs: dict[str, int]
    options: dict[str, Any] = field(default_factory=dict)


def sim_k(
    cw: CanonicalWeights,
    *,
    k: int = 100,
    pairs: Sequence[str] = tuple(SIM_PAIRS),
    embedding: Embedding = "out",
    seed: int = 0,
    exclude_ids: Sequence[int] | None = None,
    max_pairs: int | None = None,
) -> SimKResult:
    """Sim_k of related parameter pairs against shuffled pairs, per layer ([DAR] 4).

    ``max_pairs``: at most this many pairs per layer, drawn with ``seed`` (``None`` = all).
    """
    E = vocabulary_matrix(cw, embedding)
    gen = torch.Generator().manual_seed(seed)
    similarity: dict[str, list[float]] = {}
    shuffled: dict[str, list[float]] = {}
    n_pairs: dict[str, int] = {}
    for pair in pairs:
        if pair not in SIM_PAIRS:
            raise TgeomError(f"unknown pair '{pair}'; choose from {', '.join(SIM_PAIRS)}.")
        first, second = SIM_PAIRS[pair]
        similarity[pair], shuffled[pair] = [], []
        for lw in cw.layers:
            x, y = group_vectors(lw, first), group_vectors(lw, second)
            if max_pairs is not None and x.shape[0] > max_pairs:
                keep = torch.randperm(x.shape[0], generator=gen)[:max_pairs].sort().values
                x, y = x[keep.to(x.device)], y[keep.to(y.device)]
            ids_x, _ = topk_tokens(x, E, k, exclude_ids=exclude_ids)
            ids_y, _ = topk_tokens(y, E, k, exclude_ids=exclude_ids)
            perm = torch.randperm(ids_y.shape[0], generator=gen).to(ids_y.device)
            similarity[pair].append(float(jaccard(ids_x, ids_y).mean()))
            shuffled[pair].append(float(jaccard(ids_x, ids_y[perm]).mean()))
            n_pairs[pair] = int(ids_x.shape[0])
    options = {
        "embedding": embedding,
        "seed": seed,
        "max_pairs": max_pairs,
        "n_excluded": len(set(exclude_ids or ())),
    }
    return SimKResult(k, similarity, shuffled, n_pairs, options)


def mlp_input(cw: CanonicalWeights, layer: int, h: Tensor, bias: Tensor) -> Tensor:
    """The MLP's input ``[B, T, d]`` in block ``layer`` given the block input ``h [B, T, d]``.

    Pre-LN: ``ln_mlp(h + attn(ln_attn(h)))``; parallel residual: ``ln_mlp(h)``; post-LN (BERT):
    ``ln_attn(h + attn(h))``, as in :func:`tgeom.models.reference.run_block`.
    """
    lw = cw.layers[layer]
    s = cw.summary
    if s.norm_placement == "post":
        return lw.ln_attn(h + attention_output(cw, layer, h, bias))
    if s.parallel_residual:
        return lw.ln_mlp(h)
    return lw.ln_mlp(h + attention_output(cw, layer, lw.ln_attn(h), bias))


@dataclass
class RKResult:
    """R_k per layer: mean overlap (number of shared tokens, 0..k) of the top-k tokens of the
    most active neurons and of the hidden state, and the shuffled-neuron baseline."""

    k: int
    n_neurons: int
    overlap: list[float]
    shuffled: list[float]
    n_positions: int
    options: dict[str, Any] = field(default_factory=dict)


class _NeuronTokens:
    """Lazily computed top-k token ids of ``sign * W_out[i]`` for the neurons that are needed."""

    def __init__(self, W_out: Tensor, E: Tensor, k: int, exclude_ids: Sequence[int] | None):
        self.W_out, self.E, self.k, self.exclude = W_out, E, k, exclude_ids
        n = W_out.shape[0]
        self.ids = torch.full((2, n, k), -1, dtype=torch.long, device=E.device)
        self.done = torch.zeros(2, n, dtype=torch.bool, device=E.device)

    def get(self, neurons: Tensor, negative: Tensor) -> Tensor:
        """``[..., k]`` token ids for ``neurons [...]`` read with sign -1 where ``negative``."""
        side = negative.long()
        for s in (0, 1):
            need = torch.unique(neurons[(side == s) & ~self.done[s][neurons]])
            if need.numel():
                ids, _ = topk_tokens(
                    self.W_out[need], self.E, self.k, largest=s == 0, exclude_ids=self.exclude
                )
                self.ids[s, need], self.done[s, need] = ids, True
        return self.ids[side, neurons]


@torch.no_grad()
def r_k(
    lm: LoadedModel,
    token_ids: Tensor,
    runtime: Runtime,
    *,
    k: int = 50,
    n_neurons: int = 10,
    rank_by: str = "contribution",
    seed: int = 0,
    exclude_ids: Sequence[int] | None = None,
) -> RKResult:
    """R_k of every layer on windows ``token_ids [N, T]`` with its shuffled baseline ([DAR] 4).

    ``rank_by``: 'contribution' (``|a| * ||v||``, tokens of ``sign(a) v``; default) or
    'activation' (largest ``a``, tokens of ``v``). Parameters use ``W_U`` (raw, no norm).
    """
    if rank_by not in ("contribution", "activation"):
        raise TgeomError(f"unknown rank-by '{rank_by}'; choose contribution or activation.")
    cw = lm.weights()
    L, d_mlp = len(cw.layers), cw.layers[0].W_out.shape[0]
    if not 1 <= n_neurons <= d_mlp:
        raise TgeomError(f"n-neurons = {n_neurons} is out of range: valid are 1..{d_mlp}.")
    if token_ids.ndim != 2 or token_ids.shape[0] == 0:
        raise TgeomError("R_k needs at least one window of tokens; the corpus gave none.")
    E = vocabulary_matrix(cw, "out")
    allowed = E.shape[0] - len(set(exclude_ids or ()))
    if not 1 <= k <= allowed:
        raise TgeomError(f"k = {k} is out of range: valid k are 1..{allowed} for this vocabulary.")
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(d_mlp, generator=gen).to(E.device) for _ in range(L)]
    cache = [_NeuronTokens(lw.W_out, E, k, exclude_ids) for lw in cw.layers]
    totals = torch.zeros(2, L, dtype=torch.float64)
    n_positions = 0
    for _, cap in iter_captures(lm, token_ids, runtime):
        hidden = cap.hidden  # [L+1, B, T, d]
        B, T = hidden.shape[1:3]
        bias = attention_bias(cw, None, B, T).to(hidden.dtype)
        n_positions += B * T
        for layer in range(L):
            acts = mlp_activations(cw, layer, mlp_input(cw, layer, hidden[layer], bias))
            acts = acts.reshape(B * T, d_mlp)
            lens = logits(cw, hidden[layer + 1].reshape(B * T, -1))
            if exclude_ids:
                lens[:, list(exclude_ids)] = -torch.inf
            in_lens = torch.zeros_like(lens, dtype=torch.bool)
            in_lens.scatter_(1, lens.topk(k, dim=-1).indices, True)
            if rank_by == "contribution":
                size = acts.abs() * cw.layers[layer].W_out.norm(dim=-1)
                neurons = size.topk(n_neurons, dim=-1).indices  # [P, n]
                negative = acts.gather(1, neurons) < 0
            else:
                neurons = acts.topk(n_neurons, dim=-1).indices
                negative = torch.zeros_like(neurons, dtype=torch.bool)
            for row, chosen in enumerate((neurons, perms[layer][neurons])):
                ids = cache[layer].get(chosen, negative).reshape(B * T, -1)
                totals[row, layer] += float(in_lens.gather(1, ids).double().sum()) / n_neurons
    mean = (totals / max(1, n_positions)).tolist()
    options = {
        "rank_by": rank_by,
        "seed": seed,
        "hidden": "logit lens of hidden[l+1] (final norm, W_U)",
        "parameters": "rows of W_out projected raw on W_U",
        "n_excluded": len(set(exclude_ids or ())),
    }
    return RKResult(k, n_neurons, mean[0], mean[1], n_positions, options)
