"""Pieces shared by the adapters: base model, unembedding, activations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from transformers.activations import ACT2FN

ValueHeads = Callable[[Tensor], Tensor]
"""Maps the output of a block's value-producing module to ``V [B, H, T, d_head]``."""


def base_model(hf: Any) -> Any:
    """The bare transformer under any task head (``GPT2LMHeadModel`` -> ``GPT2Model``)."""
    return getattr(hf, "base_model", hf)


def unembedding(hf: Any, W_E: Tensor) -> tuple[Tensor, Tensor | None, bool]:
    """``(W_U [V, d], b_U [V] | None, has_lm_head)``; encoders without an LM head read with W_E.

    Only the final linear map is used: an MLM head's dense+norm transform is not part of W_U.
    """
    get = getattr(hf, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is None or getattr(head, "weight", None) is None:
        return W_E, None, False
    bias = getattr(head, "bias", None)
    return head.weight.detach(), bias.detach() if bias is not None else None, True


def activation(name: str) -> Callable[[Tensor], Tensor]:
    return ACT2FN[name]


def is_tied(W_E: Tensor, W_U: Tensor) -> bool:
    return W_E.data_ptr() == W_U.data_ptr() or (
        W_E.shape == W_U.shape and bool(torch.equal(W_E, W_U))
    )


def detached(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.detach()
