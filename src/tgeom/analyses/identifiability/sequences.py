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
