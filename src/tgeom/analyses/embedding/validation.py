"""Validation experiments of reading parameters in embedding space, [DAR] section 4 (SPEC 3).

Each metric has two definitions, recorded as ``definition`` in its result (and ``results.json``):
``'paper'`` (default) is the official code's; ``'tgeom'`` is this library's earlier variant, kept
as a named option.

**R_k** (parameters vs hidden states), ``definition='paper'``. For each of the first
``max_positions`` token positions (windows read row-major) and each block l:

- FFN keys / values: the ``n_neurons`` (5) neurons with the largest *pre-activation*
  ``x @ W_in + b_in`` (``x`` the MLP input; for gated MLPs the key's own score, the up
  projection, before gate and non-linearity); A = the union of the top-k tokens of their keys
  (columns of ``W_in``) projected on ``E``, and separately of their values (rows of ``W_out``).
- W_V / W_O: in the official code a subhead (head h, dimension j) is "active" at a position by
  its entry of the attention's output before ``W_O`` (the input of GPT-2's ``attn.c_proj``):
  ``z[h, j] = sum_t A_h[p, t] (x_t W_V[h] + b_V[h])[j]``. The ``n_neurons`` subheads with the
  largest (signed) ``z`` are chosen; A = the union of the top-k tokens of their ``W_V`` columns,
  and separately of their ``W_O`` rows.
- B = the top-k tokens of the position's hidden state ``hidden[l + 1]`` (block output) read as
  ``final_norm(h) @ E.T`` (no norm where the model has none; no bias). R = |A ∩ B| / k.

Baseline: the same, with the subheads/neurons chosen by the activations of another position
(a seeded derangement of the positions: every position gets a different one). Parameters and
hidden states are projected on ``E = W_U`` (raw; the official code's ``E``), top-k by the signed
score. The official code used k = 50, 5 neurons and the first 1,000 positions (our defaults).

**R_k**, ``definition='tgeom'``: FFN values only; per neuron, the number of shared tokens
``|top_k(v @ E.T) ∩ top_k(lens(h))|`` (0..k, averaged over the selected neurons and positions);
neurons ranked by ``rank_by``: 'contribution' (``|a| * ||v||``, tokens of ``sign(a) v``) or
'activation' (largest ``a``, tokens of ``v``), ``a`` the activation after the non-linearity;
``lens`` = final norm, ``W_U``, ``b_U``. Baseline: each block's neuron ids passed through a
fixed random permutation.

**Sim_k** (related parameter pairs). For every block, the Jaccard overlap of the top-k tokens of
the two halves of related pairs: key/value of one FFN neuron, W_V column / W_O row of one
subhead, W_Q / W_K column of one subhead; baseline: the same vectors with the second half of
each pair shuffled within the block (seeded). ``definition='paper'`` ranks tokens by the
*absolute* projected score ``|x @ E.T|`` (the official code); ``'tgeom'`` by the signed score.

Both stream the corpus batch by batch and keep float64 running sums only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tgeom.analyses.embedding.alignment import Embedding, group_vectors, vocabulary_matrix
from tgeom.capture import iter_captures
from tgeom.errors import TgeomError
from tgeom.linalg.precision import scores_against
from tgeom.models.load import LoadedModel
from tgeom.models.reference import (
    after_attention,
    attention_bias,
    attention_output,
    block_attention,
    logits,
    mlp_activations,
    values,
)
from tgeom.models.weights import CanonicalWeights
from tgeom.results import per_block_frame
from tgeom.runtime import Runtime

if TYPE_CHECKING:
    import pandas as pd

SIM_PAIRS: dict[str, tuple[str, str]] = {
    "ffn_key_value": ("ffn_key", "ffn_value"),
    "W_V_W_O": ("W_V", "W_O"),
    "W_Q_W_K": ("W_Q", "W_K"),
}
RK_GROUPS = ("ffn_key", "ffn_value", "W_V", "W_O")  # the official code's four panels
DEFINITIONS = ("paper", "tgeom")
SCORE_BUDGET = 2**24  # entries of one [rows, V] score block
SIM_FORMULA = {
    "paper": "Jaccard of the top-k tokens ranked by |x @ E.T| (official code)",
    "tgeom": "Jaccard of the top-k tokens ranked by the signed x @ E.T",
}
RK_FORMULA = {
    "paper": "|union of the top-k tokens of the n most active neurons' vectors ∩ top-k tokens "
    "of final_norm(hidden[l+1]) @ E.T| / k (official code)",
    "tgeom": "shared tokens per selected FFN value (0..k), averaged over neurons and positions",
}


def check_definition(definition: str, metric: str) -> str:
    """``definition`` if it is 'paper' or 'tgeom', else a one-line TgeomError."""
    if definition not in DEFINITIONS:
        raise TgeomError(f"unknown {metric} definition '{definition}'; choose paper or tgeom.")
    return definition


def topk_tokens(
    vectors: Tensor,
    E: Tensor,
    k: int,
    *,
    largest: bool = True,
    absolute: bool = False,
    exclude_ids: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(ids [n, k] int64, scores [n, k])``: the top-k tokens of ``vectors [n, d] @ E.T``.

    Rows are processed in blocks of at most ``SCORE_BUDGET`` scores; excluded ids are masked
    before selection. ``largest=False`` gives the bottom-k (most negative first);
    ``absolute=True`` ranks by ``|score|`` (scores returned are then the absolute values).
    """
    V = E.shape[0]
    allowed = V - len(set(exclude_ids or ()))
    if not 1 <= k <= allowed:
        raise TgeomError(f"k = {k} is out of range: valid k are 1..{allowed} for this vocabulary.")
    step = max(1, SCORE_BUDGET // V)
    excluded = torch.as_tensor(list(exclude_ids or ()), dtype=torch.long, device=E.device)
    ids, scores = [], []
    for start in range(0, vectors.shape[0], step):
        block = scores_against(vectors[start : start + step], E)  # float32 or better
        if absolute:
            block = block.abs()
        elif not largest:
            block = -block
        if excluded.numel():
            block[:, excluded] = -torch.inf
        s, i = block.topk(k, dim=-1)
        ids.append(i)
        scores.append(s if largest or absolute else -s)
    if not ids:
        return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
    return torch.cat(ids), torch.cat(scores)


def jaccard(a: Tensor, b: Tensor) -> Tensor:
    """Jaccard overlap ``[n]`` of the id sets in the rows of ``a [n, k]`` and ``b [n, k]``."""
    shared = (a[:, :, None] == b[:, None, :]).any(-1).sum(-1).double()
    return shared / (a.shape[1] + b.shape[1] - shared)


@dataclass
class SimKResult:
    """Sim_k per block: ``similarity[pair][l]`` and ``shuffled[pair][l]`` (mean Jaccard)."""

    k: int
    similarity: dict[str, list[float]]
    shuffled: dict[str, list[float]]
    n_pairs: dict[str, int]
    definition: str = "paper"
    options: dict[str, Any] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """One row per (pair, block): columns ``pair``, ``block``, ``similarity``, ``shuffled``."""
        return per_block_frame("pair", {"similarity": self.similarity, "shuffled": self.shuffled})


def sim_k(
    cw: CanonicalWeights,
    *,
    k: int = 100,
    pairs: Sequence[str] = tuple(SIM_PAIRS),
    definition: str = "paper",
    embedding: Embedding = "out",
    seed: int = 0,
    exclude_ids: Sequence[int] | None = None,
    max_pairs: int | None = None,
) -> SimKResult:
    """Sim_k of related parameter pairs against shuffled pairs, per block ([DAR] 4).

    ``definition``: 'paper' (tokens ranked by ``|x @ E.T|``, the official code) or 'tgeom'
    (signed score). ``max_pairs``: at most this many pairs per block, drawn with ``seed``
    (``None`` = all).
    """
    absolute = check_definition(definition, "Sim_k") == "paper"
    if max_pairs is not None and max_pairs < 1:
        raise TgeomError(f"max-pairs = {max_pairs} must be at least 1 (or None for all pairs).")
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
            ids_x, _ = topk_tokens(x, E, k, absolute=absolute, exclude_ids=exclude_ids)
            ids_y, _ = topk_tokens(y, E, k, absolute=absolute, exclude_ids=exclude_ids)
            perm = torch.randperm(ids_y.shape[0], generator=gen).to(ids_y.device)
            similarity[pair].append(float(jaccard(ids_x, ids_y).mean()))
            shuffled[pair].append(float(jaccard(ids_x, ids_y[perm]).mean()))
            n_pairs[pair] = int(ids_x.shape[0])
    options = {
        "formula": SIM_FORMULA[definition],
        "embedding": embedding,
        "seed": seed,
        "max_pairs": max_pairs,
        "n_excluded": len(set(exclude_ids or ())),
    }
    return SimKResult(k, similarity, shuffled, n_pairs, definition, options)


def mlp_input(cw: CanonicalWeights, block: int, h: Tensor, bias: Tensor) -> Tensor:
    """The MLP's input ``[B, T, d]`` in block ``block`` given its input ``h [B, T, d]``
    (hidden state ``block``).

    Pre-LN: ``ln_mlp(h + attn(ln_attn(h)))`` (the attention's output normed first where the block
    has ``ln_attn_out``: Gemma 2, 3); parallel residual: ``ln_mlp(h)``; post-LN (BERT):
    ``ln_attn(h + attn(h))``; norms on the sublayer outputs (OLMo 2): ``h + ln_attn(attn(h))``,
    as in :func:`tgeom.models.reference.run_block`.
    """
    lw = cw.layers[block]
    s = cw.summary
    if s.norm_placement == "post":
        return lw.ln_attn(h + attention_output(cw, block, h, bias))
    if s.norm_placement == "post_sublayer":
        return h + lw.ln_attn(attention_output(cw, block, h, bias))
    if s.parallel_residual:
        return lw.ln_mlp(h)
    return lw.ln_mlp(after_attention(cw, block, h, bias))


def attention_input(cw: CanonicalWeights, block: int, h: Tensor) -> Tensor:
    """The attention's input ``[B, T, d]`` in block ``block``: ``ln_attn(h)`` for pre-LN models,
    ``h`` itself otherwise, as in :func:`tgeom.models.reference.run_block`."""
    return cw.layers[block].ln_attn(h) if cw.summary.norm_placement == "pre" else h


def pre_activations(cw: CanonicalWeights, block: int, x: Tensor) -> Tensor:
    """Each FFN key's score ``x @ W_in + b_in`` ``[..., d_mlp]`` for MLP input ``x [..., d]``
    (before any gate or non-linearity)."""
    lw = cw.layers[block]
    return x @ lw.W_in + (lw.b_in if lw.b_in is not None else 0.0)


def subhead_activations(cw: CanonicalWeights, block: int, h: Tensor, bias: Tensor) -> Tensor:
    """The attention's output before ``W_O``, ``[B, T, H * d_head]`` for block input
    ``h [B, T, d]``: entry ``h_ * d_head + j`` is ``sum_t A[h_, p, t] v_t[h_, j]`` (values with
    ``b_V``), the row order of :func:`group_vectors` for ``W_V``/``W_O``."""
    x = attention_input(cw, block, h)
    probs = block_attention(cw, block, x, bias)
    z = torch.einsum("bhqk,bhke->bqhe", probs, values(cw.layers[block], x))
    return z.reshape(z.shape[0], z.shape[1], -1)


def other_positions(n: int, seed: int) -> Tensor:
    """A seeded derangement ``[n]`` of ``0..n-1``: entry p is a random position other than p
    (a random cyclic order, each position mapped to its successor). Needs ``n >= 2``."""
    if n < 2:
        raise TgeomError("R_k's baseline needs at least 2 token positions; pass more text.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    other = torch.empty(n, dtype=torch.long)
    other[order] = order.roll(-1)
    return other


@dataclass
class RKResult:
    """R_k per block and parameter group: ``overlap[group][l]`` and its baseline
    ``shuffled[group][l]``. ``definition='paper'``: fractions in [0, 1] for 'ffn_key',
    'ffn_value', 'W_V', 'W_O'; ``'tgeom'``: shared-token counts (0..k) for 'ffn_value'."""

    k: int
    n_neurons: int
    overlap: dict[str, list[float]]
    shuffled: dict[str, list[float]]
    n_positions: int
    definition: str = "paper"
    options: dict[str, Any] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """One row per (parameter group, block): columns ``group``, ``block``, ``overlap``,
        ``shuffled``."""
        return per_block_frame("group", {"overlap": self.overlap, "shuffled": self.shuffled})


def _batches(
    lm: LoadedModel, token_ids: Tensor, runtime: Runtime, max_positions: int | None
) -> Iterator[tuple[Tensor, Tensor, int]]:
    """``(hidden [L+1, B, T, d], attention bias, keep)`` per batch, where the first ``keep``
    positions of the batch (row-major) are among the first ``max_positions`` of the corpus."""
    T = token_ids.shape[1]
    if max_positions is not None:
        token_ids = token_ids[: -(-max_positions // T)]
    left = max_positions if max_positions is not None else token_ids.numel()
    cw = lm.weights()
    for _, cap in iter_captures(lm, token_ids, runtime):
        # Block internals are recomputed from the weights in the model's own precision, as its
        # forward ran (captures come float32); scores and overlaps widen again.
        hidden = cap.hidden.to(cw.W_E.dtype)
        B = hidden.shape[1]
        bias = attention_bias(cw, None, B, T).to(hidden.dtype)
        keep = min(B * T, left)
        left -= keep
        yield hidden, bias, keep


@torch.no_grad()
def r_k(
    lm: LoadedModel,
    token_ids: Tensor,
    runtime: Runtime,
    *,
    k: int = 50,
    n_neurons: int = 5,
    definition: str = "paper",
    max_positions: int | None = 1000,
    rank_by: str | None = None,
    seed: int = 0,
    exclude_ids: Sequence[int] | None = None,
) -> RKResult:
    """R_k of every block on windows ``token_ids [N, T]`` with its baseline ([DAR] 4).

    ``definition``: 'paper' (the official code; module docstring) or 'tgeom'.
    ``max_positions``: the first this many positions (row-major; ``None`` = all).
    ``rank_by`` ('tgeom' only): 'contribution' (default) or 'activation'.
    """
    check_definition(definition, "R_k")
    if rank_by is not None and definition != "tgeom":
        raise TgeomError("rank-by applies to the tgeom definition of R_k only; drop it.")
    rank_by = rank_by or "contribution"
    if rank_by not in ("contribution", "activation"):
        raise TgeomError(f"unknown rank-by '{rank_by}'; choose contribution or activation.")
    cw = lm.weights()
    d_mlp = cw.layers[0].W_out.shape[0]
    if not 1 <= n_neurons <= d_mlp:
        raise TgeomError(f"n-neurons = {n_neurons} is out of range: valid are 1..{d_mlp}.")
    if token_ids.ndim != 2 or token_ids.shape[0] == 0:
        raise TgeomError("R_k needs at least one window of tokens; the corpus gave none.")
    if max_positions is not None and max_positions < 2:
        raise TgeomError(f"max-positions = {max_positions} must be at least 2 (or all).")
    E = vocabulary_matrix(cw, "out")
    allowed = E.shape[0] - len(set(exclude_ids or ()))
    if not 1 <= k <= allowed:
        raise TgeomError(f"k = {k} is out of range: valid k are 1..{allowed} for this vocabulary.")
    batches = _batches(lm, token_ids, runtime, max_positions)
    if definition == "paper":
        return _r_k_paper(cw, E, batches, k, n_neurons, seed, exclude_ids)
    return _r_k_tgeom(cw, E, batches, k, n_neurons, rank_by, seed, exclude_ids)


def _r_k_paper(
    cw: CanonicalWeights,
    E: Tensor,
    batches: Iterator[tuple[Tensor, Tensor, int]],
    k: int,
    n: int,
    seed: int,
    exclude_ids: Sequence[int] | None,
) -> RKResult:
    L = len(cw.layers)
    n_subheads = cw.layers[0].W_O.shape[0] * cw.layers[0].W_O.shape[1]
    if n > n_subheads:
        raise TgeomError(f"n-neurons = {n} is out of range: a block has {n_subheads} subheads.")
    chosen: dict[str, list[list[Tensor]]] = {"ffn": [[] for _ in range(L)]}
    chosen["attn"] = [[] for _ in range(L)]
    lens: list[list[Tensor]] = [[] for _ in range(L)]
    for hidden, bias, keep in batches:
        d = hidden.shape[-1]
        for block in range(L):
            h = hidden[block]
            pre = pre_activations(cw, block, mlp_input(cw, block, h, bias))
            z = subhead_activations(cw, block, h, bias)
            chosen["ffn"][block].append(_largest(pre.reshape(-1, pre.shape[-1])[:keep], n))
            chosen["attn"][block].append(_largest(z.reshape(-1, z.shape[-1])[:keep], n))
            out = hidden[block + 1].reshape(-1, d)[:keep]
            normed = cw.final_norm(out) if cw.final_norm is not None else out
            lens[block].append(topk_tokens(normed, E, k, exclude_ids=exclude_ids)[0])
    n_positions = sum(int(t.shape[0]) for t in lens[0])
    other = other_positions(n_positions, seed).to(E.device)
    overlap: dict[str, list[float]] = {g: [] for g in RK_GROUPS}
    shuffled: dict[str, list[float]] = {g: [] for g in RK_GROUPS}
    for block, lw in enumerate(cw.layers):
        B_ids = torch.cat(lens[block])  # [P, k]
        for group in RK_GROUPS:
            sel = torch.cat(chosen["ffn" if group.startswith("ffn") else "attn"][block])
            tokens = _vector_tokens(group_vectors(lw, group), sel, E, k, exclude_ids)
            overlap[group].append(float(_recall(tokens, B_ids, k).mean()))
            shuffled[group].append(float(_recall(tokens[other], B_ids, k).mean()))
    options = {
        "formula": RK_FORMULA["paper"],
        "selection": "keys/values: largest x @ W_in + b_in; W_V/W_O: largest entries of the "
        "attention output before W_O (sum_t A v_t)",
        "baseline": "neurons chosen at another position (seeded derangement)",
        "hidden": "final_norm(hidden[l+1]) @ E.T (no bias)",
        "parameters": "projected raw on W_U, top-k by signed score",
        "seed": seed,
        "n_excluded": len(set(exclude_ids or ())),
    }
    return RKResult(k, n, overlap, shuffled, n_positions, "paper", options)


def _largest(x: Tensor, n: int) -> Tensor:
    """Indices ``[P, n]`` of the n largest entries of each row of ``x [P, m]``, exact ties to
    the smaller index (grouped-query heads share values, so their subheads tie exactly)."""
    return x.sort(dim=-1, descending=True, stable=True).indices[:, :n]


def _vector_tokens(
    vectors: Tensor, chosen: Tensor, E: Tensor, k: int, exclude_ids: Sequence[int] | None
) -> Tensor:
    """``[P, n, k]`` top-k token ids of ``vectors[chosen]`` (``chosen [P, n]``), computed once
    per distinct vector."""
    distinct, where = torch.unique(chosen, return_inverse=True)
    ids, _ = topk_tokens(vectors[distinct.to(vectors.device)], E, k, exclude_ids=exclude_ids)
    return ids[where]


def _recall(tokens: Tensor, lens: Tensor, k: int, block: int = 1024) -> Tensor:
    """``|union(tokens[p]) ∩ lens[p]| / k`` per position ``[P]`` (float64), for
    ``tokens [P, n, k]`` and ``lens [P, k]`` (distinct ids per row)."""
    P = lens.shape[0]
    flat = tokens.reshape(P, -1)
    out = []
    for s in range(0, P, block):
        hits = (lens[s : s + block, :, None] == flat[s : s + block, None, :]).any(-1)
        out.append(hits.sum(-1).double() / k)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


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


def _r_k_tgeom(
    cw: CanonicalWeights,
    E: Tensor,
    batches: Iterator[tuple[Tensor, Tensor, int]],
    k: int,
    n_neurons: int,
    rank_by: str,
    seed: int,
    exclude_ids: Sequence[int] | None,
) -> RKResult:
    L, d_mlp = len(cw.layers), cw.layers[0].W_out.shape[0]
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(d_mlp, generator=gen).to(E.device) for _ in range(L)]
    cache = [_NeuronTokens(lw.W_out, E, k, exclude_ids) for lw in cw.layers]
    totals = torch.zeros(2, L, dtype=torch.float64)
    n_positions = 0
    for hidden, bias, keep in batches:
        n_positions += keep
        for block in range(L):
            acts = mlp_activations(cw, block, mlp_input(cw, block, hidden[block], bias))
            acts = acts.reshape(-1, d_mlp)[:keep]
            lens = logits(cw, hidden[block + 1].reshape(-1, hidden.shape[-1])[:keep])
            if exclude_ids:
                lens[:, list(exclude_ids)] = -torch.inf
            in_lens = torch.zeros_like(lens, dtype=torch.bool)
            in_lens.scatter_(1, lens.topk(k, dim=-1).indices, True)
            if rank_by == "contribution":
                size = acts.abs() * cw.layers[block].W_out.norm(dim=-1)
                neurons = size.topk(n_neurons, dim=-1).indices  # [P, n]
                negative = acts.gather(1, neurons) < 0
            else:
                neurons = acts.topk(n_neurons, dim=-1).indices
                negative = torch.zeros_like(neurons, dtype=torch.bool)
            for row, chosen in enumerate((neurons, perms[block][neurons])):
                ids = cache[block].get(chosen, negative).reshape(keep, -1)
                totals[row, block] += float(in_lens.gather(1, ids).double().sum()) / n_neurons
    mean = (totals / max(1, n_positions)).tolist()
    options = {
        "formula": RK_FORMULA["tgeom"],
        "rank_by": rank_by,
        "baseline": "neuron ids through a fixed random permutation per block",
        "seed": seed,
        "hidden": "logit lens of hidden[l+1] (final norm, W_U, b_U)",
        "parameters": "rows of W_out projected raw on W_U",
        "n_excluded": len(set(exclude_ids or ())),
    }
    return RKResult(
        k,
        n_neurons,
        {"ffn_value": mean[0]},
        {"ffn_value": mean[1]},
        n_positions,
        "tgeom",
        options,
    )
