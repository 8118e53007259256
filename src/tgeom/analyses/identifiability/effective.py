"""Attention null spaces and effective attention [BRU] (SPEC section 5).

For one sequence of ``n`` real tokens, layer ``l`` and head ``h``: ``T = V W_O[h]`` (``[n, d]``,
``V = X W_V + b_V`` the head's value vectors, bias included). Attention ``A [n, n]`` is
identifiable only when the left null space of ``T`` is trivial; its dimension is
``n - rank(T)`` (float64, relative tolerance 1e-10), non-trivial whenever ``n > d_head``.
Effective attention ``A_eff = A - A N N^T`` (N an orthonormal basis of that null space) gives the
same head output (``A_eff T = A T``) and equals ``A`` when the null space is trivial.

Every head of every layer of a batch is computed at once, each sequence cut to its own length
(padding never enters ``T``). Effective attention can be negative and need not sum to 1: the
token-type summaries report both the signed mean and the mean of absolute values.
"""

from __future__ import annotations

import string
import unicodedata
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tgeom.capture import capture
from tgeom.linalg.nullspace import null_space_projectors
from tgeom.runtime import Runtime

TOKEN_TYPES = ("cls/bos", "sep/eos", "punctuation", "other")


@dataclass
class SequenceAttention:
    """One sequence: ``raw, effective [L, H, n, n]`` (float64), ``null_dim, rank [L, H]``."""

    token_ids: list[int]
    raw: Tensor
    effective: Tensor
    null_dim: Tensor
    rank: Tensor


def real_lengths(token_ids: Tensor, attention_mask: Tensor | None) -> list[int]:
    if attention_mask is None:
        return [int(token_ids.shape[1])] * int(token_ids.shape[0])
    return [int(n) for n in attention_mask.sum(1).tolist()]


def effective_attention_batch(
    lm: Any, token_ids: Tensor, attention_mask: Tensor | None = None, *, need_attention: bool = True
) -> list[SequenceAttention]:
    """Raw and effective attention of every layer and head for each sequence of a batch
    (``token_ids [B, T]``, right padding marked by ``attention_mask``)."""
    cw = lm.weights()
    W_O = torch.stack([lw.W_O for lw in cw.layers]).double()  # [L, H, dh, d]
    captured = capture(lm, token_ids, attention_mask, attentions=need_attention, values=True)
    assert captured.values is not None
    out = []
    for b, n in enumerate(real_lengths(token_ids, attention_mask)):
        V = captured.values[:, b, :, :n].double()  # [L, H, n, dh]
        T = V @ W_O.to(V.device)  # [L, H, n, d]
        projector, rank = null_space_projectors(T)
        if need_attention:
            assert captured.attentions is not None
            A = captured.attentions[:, b, :, :n, :n].double()
            A_eff = A - A @ projector
        else:
            A = A_eff = torch.empty(0)
        out.append(
            SequenceAttention(
                token_ids[b, :n].tolist(), A.cpu(), A_eff.cpu(), (n - rank).cpu(), rank.cpu()
            )
        )
    return out


def token_type(token: str, token_id: int, lm: Any) -> str:
    tok = lm.tokenizer
    if token_id in {tok.cls_token_id, tok.bos_token_id} - {None}:
        return "cls/bos"
    if token_id in {tok.sep_token_id, tok.eos_token_id} - {None}:
        return "sep/eos"
    core = token.strip().removeprefix("##")
    if core and all(
        c in string.punctuation or unicodedata.category(c).startswith("P") for c in core
    ):
        return "punctuation"
    return "other"


def pearson(x: Tensor, y: Tensor) -> float:
    x, y = x.reshape(-1).double(), y.reshape(-1).double()
    xc, yc = x - x.mean(), y - y.mean()
    denominator = float(xc.norm() * yc.norm())
    return float(xc @ yc) / denominator if denominator > 0 else float("nan")


@dataclass
class EffectiveAttentionResult:
    """Effective attention over a set of sequences, with its summaries."""

    sequences: list[SequenceAttention]
    tokens: list[list[str]]
    types: list[list[str]]
    d_head: int
    causal: bool

    @property
    def lengths(self) -> list[int]:
        return [len(s.token_ids) for s in self.sequences]

    def pearson(self) -> Tensor:
        """Pearson(raw, effective) ``[S, L, H]`` over each sequence's allowed entries."""
        out = []
        for seq in self.sequences:
            n = seq.raw.shape[-1]
            allowed = torch.ones(n, n, dtype=torch.bool)
            if self.causal:
                allowed = allowed.tril()
            L, H = seq.raw.shape[:2]
            out.append(
                torch.tensor(
                    [
                        [
                            pearson(seq.raw[layer, h][allowed], seq.effective[layer, h][allowed])
                            for h in range(H)
                        ]
                        for layer in range(L)
                    ]
                )
            )
        return torch.stack(out)

    def token_type_attention(self) -> dict[str, Tensor]:
        """Mean over sequences and queries of the attention given to each token type,
        ``[L, H, 4]`` for raw/effective, signed (sum of weights) and absolute (sum of |weights|)."""
        L, H = self.sequences[0].raw.shape[:2]
        names = ("raw_signed", "raw_abs", "effective_signed", "effective_abs")
        sums = {k: torch.zeros(L, H, len(TOKEN_TYPES), dtype=torch.float64) for k in names}
        count = 0
        for seq, types in zip(self.sequences, self.types, strict=True):
            onehot = torch.tensor(
                [[t == k for k in TOKEN_TYPES] for t in types], dtype=torch.float64
            )
            for name, matrix in (("raw", seq.raw), ("effective", seq.effective)):
                sums[f"{name}_signed"] = sums[f"{name}_signed"] + (matrix @ onehot).sum(-2)
                sums[f"{name}_abs"] = sums[f"{name}_abs"] + (matrix.abs() @ onehot).sum(-2)
            count += len(types)
        return {k: v / max(count, 1) for k, v in sums.items()}

    def to_json(self, matrices_of: int | None = 0) -> dict[str, Any]:
        """Summaries, plus per-head raw/effective matrices of sequence ``matrices_of``."""
        r = self.pearson()
        types = self.token_type_attention()
        L, H = r.shape[1:]
        data: dict[str, Any] = {
            "d_head": self.d_head,
            "lengths": self.lengths,
            "token_types": list(TOKEN_TYPES),
            "pearson_by_layer": [
                {
                    "layer": layer,
                    "mean": float(r[:, layer].nanmean()),
                    "by_sequence": r[:, layer].nanmean(1),
                }
                for layer in range(L)
            ],
            "token_type_attention": {
                k: [
                    {
                        "layer": layer,
                        "head": h,
                        **dict(zip(TOKEN_TYPES, v[layer, h].tolist(), strict=True)),
                    }
                    for layer in range(L)
                    for h in range(H)
                ]
                for k, v in types.items()
            },
            "summary_note": "signed = mean summed weight per query; abs = mean summed |weight|",
        }
        if matrices_of is not None:
            seq = self.sequences[matrices_of]
            data["tokens"] = self.tokens[matrices_of]
            data["heads"] = [
                {
                    "layer": layer,
                    "head": h,
                    "raw": seq.raw[layer, h],
                    "effective": seq.effective[layer, h],
                    "null_dim": int(seq.null_dim[layer, h]),
                }
                for layer in range(L)
                for h in range(H)
            ]
        return data


def effective_attention(
    lm: Any,
    token_ids: Tensor,
    attention_mask: Tensor | None = None,
    runtime: Runtime | None = None,
) -> EffectiveAttentionResult:
    """Raw vs effective attention for every sequence of ``token_ids [B, T]`` (batched)."""
    runtime = runtime or Runtime.auto()
    sequences: list[SequenceAttention] = []
    for start in range(0, token_ids.shape[0], runtime.batch_size):
        stop = start + runtime.batch_size
        mask = attention_mask[start:stop] if attention_mask is not None else None
        sequences += effective_attention_batch(lm, token_ids[start:stop], mask)
    tokens = [lm.token_strings(s.token_ids) for s in sequences]
    types = [
        [token_type(t, i, lm) for t, i in zip(toks, s.token_ids, strict=True)]
        for toks, s in zip(tokens, sequences, strict=True)
    ]
    return EffectiveAttentionResult(
        sequences, tokens, types, lm.summary.d_head, bool(lm.summary.is_causal)
    )


@dataclass
class NullSpaceResult:
    """``null_dim [S, L, H]`` and the sequence lengths ``[S]``."""

    null_dim: Tensor
    lengths: list[int]
    d_head: int

    def to_json(self) -> dict[str, Any]:
        _, L, H = self.null_dim.shape
        by_length: dict[int, list[int]] = {}
        for s, n in enumerate(self.lengths):
            by_length.setdefault(n, []).append(s)
        return {
            "d_head": self.d_head,
            "lengths": self.lengths,
            "layers": [
                {
                    "layer": layer,
                    "head": h,
                    "mean_null_dim": float(self.null_dim[:, layer, h].double().mean()),
                    "by_length": [
                        {
                            "length": n,
                            "mean_null_dim": float(self.null_dim[idx, layer, h].double().mean()),
                        }
                        for n, idx in sorted(by_length.items())
                    ],
                }
                for layer in range(L)
                for h in range(H)
            ],
            "expected_generic": "max(0, length - d_head)",
        }


def null_space_dims(
    lm: Any,
    token_ids: Tensor,
    attention_mask: Tensor | None = None,
    runtime: Runtime | None = None,
) -> NullSpaceResult:
    """Null-space dimension of every head for every sequence (no attention needed)."""
    runtime = runtime or Runtime.auto()
    dims, lengths = [], []
    for start in range(0, token_ids.shape[0], runtime.batch_size):
        stop = start + runtime.batch_size
        mask = attention_mask[start:stop] if attention_mask is not None else None
        for seq in effective_attention_batch(lm, token_ids[start:stop], mask, need_attention=False):
            dims.append(seq.null_dim)
            lengths.append(len(seq.token_ids))
    return NullSpaceResult(torch.stack(dims), lengths, lm.summary.d_head)
