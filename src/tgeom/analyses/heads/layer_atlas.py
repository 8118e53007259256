"""The layer atlas (SPEC section 7): per layer, what each topic's context direction and the top
positional directions promote, read in tokens.

For block ``b`` (0-based) we read its output, hidden state ``b + 1``, decomposed over the corpus
as [SZ] does (:class:`~tgeom.analyses.geometry.stats.GeometryStats`): a topic's context vector is
the mean of ``ctx_c`` over its windows, and the positional directions are the top right singular
vectors of ``P = [pos_t]`` (T' x d). A direction ``v`` is read through the final norm and the
unembedding as the logit lens reads a hidden state, with the norm made linear as in the QK split
(``gamma * center(v) / s``, ``s`` the corpus RMS of that hidden state; the norm's bias is a
constant, the same for every direction, and is left out): ``scores = lin(v) @ W_U^T``. A
singular vector's sign is arbitrary, so both ``+v`` and ``-v`` are read (``plus``: the sign
that makes its largest coordinate positive). Models without a final
norm (post-LN encoders) read ``v @ W_U^T``; without an LM head, ``W_E`` stands in (as the lens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tgeom.analyses.embedding.projection import embedding_name, project_vector
from tgeom.analyses.geometry.attention import linearised_norm
from tgeom.analyses.geometry.stats import GeometryStats
from tgeom.models.weights import CanonicalWeights

READING = (
    "direction v of hidden state b+1 read as (gamma * center(v) / s) @ W_U^T: the final norm made "
    "linear with s the corpus RMS of that hidden state (its bias, a constant, left out)"
)


def layer_atlas(
    stats: GeometryStats,
    cw: CanonicalWeights,
    blocks: Sequence[int],
    *,
    k: int = 10,
    mask: Tensor | None = None,
    vocab: Sequence[str] | None = None,
    n_positional: int = 2,
    with_topics: bool = True,
) -> list[dict[str, Any]]:
    """One entry per block of ``blocks``: ``topics`` (per topic, its number of windows, the
    norm of its mean context vector and the ``k`` tokens it promotes most), and ``positional``
    (the top ``n_positional`` directions of ``P``: their share of ``||P||_F^2`` and the ``k``
    tokens at each end). ``mask [V]`` bool limits the tokens read (e.g. special tokens off).
    ``with_topics`` False leaves the topics out (a corpus of one topic: its mean context vector
    is zero by construction)."""
    E = cw.W_U.double()
    topic_ids = stats.topic_ids
    topics = stats.topics
    n = stats.n_windows * stats.n_positions
    out = []
    for block in blocks:
        hidden = block + 1
        dec = stats.decomposition(hidden)
        rms = float((stats.sumsq[hidden].sum() / n / stats.d_model) ** 0.5)
        lin = linearised_norm(cw.final_norm, rms)

        vectors: list[Tensor] = []  # every direction of this layer, read in one product
        names: list[str] = []
        if with_topics:
            for index, name in enumerate(topics):
                chosen = topic_ids == index
                if bool(chosen.any()):
                    vectors.append(dec.ctx[chosen].mean(0))
                    names.append(name)
        _, s, Vh = torch.linalg.svd(dec.pos, full_matrices=False)
        # a fixed sign (its largest coordinate positive), so "plus" names the same end each run
        Vh = Vh * torch.sign(Vh.gather(1, Vh.abs().argmax(1, keepdim=True)))
        n_pos = min(n_positional, int(s.numel()))
        vectors += list(Vh[:n_pos])
        read = lin(torch.stack(vectors))
        top = project_vector(read, E, k, mask=mask, vocab=vocab)
        bottom = project_vector(read[len(names) :], E, k, mask=mask, bottom=True, vocab=vocab)
        entry: dict[str, Any] = {"layer": block, "hidden": hidden, "topics": []}
        for i, name in enumerate(names):
            entry["topics"].append(
                {
                    "topic": name,
                    "n_windows": int((topic_ids == topics.index(name)).sum()),
                    "norm": float(vectors[i].norm()),
                    "promotes": top.records(i),
                }
            )
        energy = float((s**2).sum()) or 1.0
        entry["positional"] = [
            {
                "direction": j,
                "share": float(s[j] ** 2) / energy,
                "plus": top.records(len(names) + j),
                # the bottom of v is the top of -v: its scores are those of -v
                "minus": [{**r, "score": -r["score"]} for r in bottom.records(j)],
            }
            for j in range(n_pos)
        ]
        out.append(entry)
    return out


def reading_note(cw: CanonicalWeights) -> str:
    """How the directions were read, for results.json (which matrix, which norm)."""
    matrix = embedding_name(cw, "out")
    norm = "no final norm (read raw)" if cw.final_norm is None else READING
    return f"{norm}; vocabulary matrix {matrix}"
