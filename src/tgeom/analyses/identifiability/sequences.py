"""Sequence batches for the identifiability analyses [BRU]."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def varied_length_batch(lm: Any, windows: Tensor) -> tuple[Tensor, Tensor]:
    """Prefixes of the windows with lengths spread from 8 to T, wrapped in the tokenizer's
    special tokens ([CLS] ... [SEP] for encoders, BOS for decoders), right padded:
    ``ids, mask [N, T']``.
    Null dimension and Pearson are read against length, and attention to special tokens shows."""
    N, T = windows.shape
    lengths = torch.linspace(min(8, T), T, steps=N).round().long().tolist()
    tok = lm.tokenizer
    start = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    end = tok.sep_token_id if not lm.summary.is_causal else None
    rows = [
        [start] * (start is not None) + w[:n].tolist() + [end] * (end is not None)
        for w, n in zip(windows, lengths, strict=True)
    ]
    width = min(max(len(r) for r in rows), lm.summary.n_ctx)
    ids = torch.zeros(N, width, dtype=torch.long)
    mask = torch.zeros(N, width, dtype=torch.long)
    for i, row in enumerate(rows):
        row = row[:width]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def null_space_warnings(
    lengths: list[int], d_head: int, windows: tuple[int, ...] = ()
) -> list[str]:
    """``[one line]`` when no sequence has more tokens than ``d_head``, else one line when some
    sliding-window layers (``windows``: keys per query, 0 = global) see no more than ``d_head``
    keys, else ``[]``.

    A head's left null space is ``d_s - rank(V W_O[h])`` with ``rank <= min(d_s, d_head)``: it
    is non-trivial whenever ``d_s > d_head`` and, for ``d_s <= d_head``, only when value vectors
    coincide (SPEC 5). With every sequence that short, effective attention is raw attention
    and Pearson(raw, effective) is 1 by construction, not by finding."""
    if not lengths:
        return []
    if max(lengths) > d_head:
        narrow = [layer for layer, w in enumerate(windows) if 0 < w <= d_head]
        if not narrow:
            return []
        widest = max(windows[layer] for layer in narrow)
        return [
            f"layers {', '.join(map(str, narrow))} see windows of at most {widest} keys, not "
            f"more than d_head = {d_head}: no null space is possible in them (beyond repeated "
            "value vectors), so their effective attention is raw attention and Pearson(raw, "
            "effective) is 1 by construction"
        ]
    what = f"the sequence has {lengths[0]}" if len(lengths) == 1 else "every sequence has at most"
    longest = "" if len(lengths) == 1 else f" {max(lengths)}"
    return [
        f"{what}{longest} tokens, not more than d_head = {d_head}: no null space is possible "
        "(beyond repeated value vectors), so effective attention is raw attention and "
        f"Pearson(raw, effective) is 1; pass more than {d_head} tokens"
    ]
