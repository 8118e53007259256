"""Hidden states, attention probabilities and per-head values from real forward passes.

``hidden[0]`` is the input of the first block (the embedding output) and ``hidden[l]`` the output
of block ``l - 1`` (blocks are 0-based: block ``b`` reads ``hidden[b]`` and writes
``hidden[b + 1]``): the residual stream *before* the final norm for every architecture (SPEC section
0). They are taken with hooks on the blocks rather than from ``output_hidden_states``, because
Hugging Face applies the final norm to the last entry for some models.

Precision: a model loaded in bfloat16 / float16 runs its forward in that dtype, but every tensor
handed on (hidden states, values, attention probabilities) is float32, so what folds them (long
sums, Gram matrices, SVDs) never computes in the low precision; a hidden state that overflowed
to inf or NaN in the low precision stops the run in one line naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tgeom.errors import TgeomError
from tgeom.linalg.precision import LOW_PRECISION
from tgeom.models.load import LoadedModel
from tgeom.runtime import Runtime, dtype_name


@dataclass
class Captured:
    """What one batch of forward passes produced (float32, on the model's device).

    ``hidden [L+1, B, T, d]`` indexed by hidden state; ``attentions [L, B, H, T, T] | None`` and
    ``values`` indexed by block;
    ``values [L, B, H, T, d_head] | None`` (``x W_V + b_V`` with ``x`` the attention input,
    KV heads expanded to query heads).
    """

    hidden: Tensor
    attentions: Tensor | None = None
    values: Tensor | None = None


def _first_tensor(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output[0]


def _float32(t: Tensor) -> Tensor:
    """``t`` (detached) in float32 when the forward ran in bfloat16 / float16, else as it is."""
    t = t.detach()
    return t.float() if t.dtype in LOW_PRECISION else t


def _checked_hidden(index: int, h: Tensor) -> Tensor:
    """``hidden[index]`` in float32; one line when the low-precision forward overflowed."""
    if h.dtype in LOW_PRECISION and not bool(torch.isfinite(h).all()):
        raise TgeomError(
            f"hidden state {index} holds inf or NaN: the forward overflowed in "
            f"{dtype_name(h.dtype)}; pass --dtype bfloat16 or float32."
        )
    return _float32(h)


@torch.no_grad()
def stream_hidden(
    lm: LoadedModel,
    input_ids: Tensor,
    fold: Callable[[int, Tensor], None],
    attention_mask: Tensor | None = None,
    *,
    attentions: bool = False,
    values: Callable[[int, Tensor], None] | None = None,
    attention_weights: Callable[[int, Tensor], None] | None = None,
) -> Any:
    """Run ``lm`` on ``input_ids [B, T]`` and hand each ``hidden[l] [B, T, d]`` (float32, also
    for a bfloat16 / float16 model; float64 only for a float64 model; ``l = 0..L``) to
    ``fold(l, hidden_l)`` as soon as it exists (block ``l - 1`` writes it). Each lies on the
    device of the block that wrote it (under ``device_map="auto"`` not always the model's): a
    fold moves it to its own accumulator's device.

    Nothing is kept: a running statistic folds each hidden state while it is still in cache and
    the allocator can reuse its memory. ``attention_mask [B, T]`` is 1 for real tokens (right
    padding). ``values(l, V)``, when given, receives block ``l``'s value vectors ``V [B, H, T,
    d_head]`` (``x W_V + b_V``, KV heads expanded to query heads) as the model computes them;
    ``attention_weights(l, A)`` block ``l``'s attention probabilities ``A [B, H, T, T]`` as soon
    as they exist (with ``attentions=True``), after ``values(l, ...)``.
    Runs the model's body only (no output head, no logits); returns its Hugging Face output
    (with ``.attentions`` when ``attentions``).
    """
    device = lm.device
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    blocks = list(lm.blocks())

    def block_input(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        fold(0, _checked_hidden(0, args[0] if args else kwargs["hidden_states"]))

    def block_output(index: int) -> Any:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            fold(index + 1, _checked_hidden(index + 1, _first_tensor(output)))

        return hook

    handles = [blocks[0].register_forward_pre_hook(block_input, with_kwargs=True)]
    handles += [block.register_forward_hook(block_output(i)) for i, block in enumerate(blocks)]
    if values is not None:
        handles += [_value_hook(lm, i, block, values) for i, block in enumerate(blocks)]
    if attention_weights is not None:
        handles += [
            _weights_hook(lm, i, block, attention_weights) for i, block in enumerate(blocks)
        ]
    try:
        return lm.body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_attentions=attentions,
            use_cache=False,
        )
    finally:
        for handle in handles:
            handle.remove()


def _value_hook(
    lm: LoadedModel, index: int, block: Any, sink: Callable[[int, Tensor], None]
) -> Any:
    """Hook the module computing block ``index``'s values; hand ``V [B, H, T, dh]`` to ``sink``."""
    module, heads = lm.adapter.value_projection(block, lm.summary)

    def hook(_module: Any, _args: Any, output: Any) -> None:
        sink(index, _float32(heads(_first_tensor(output))))

    return module.register_forward_hook(hook)


def _weights_hook(
    lm: LoadedModel, index: int, block: Any, sink: Callable[[int, Tensor], None]
) -> Any:
    """Hook block ``index``'s attention module; hand its probabilities ``[B, H, T, T]`` to
    ``sink`` (Hugging Face attention modules return ``(output, weights)``)."""

    def hook(_module: Any, _args: Any, output: Any) -> None:
        if output[1] is not None:
            sink(index, _float32(output[1]))

    return lm.adapter.attention_module(block).register_forward_hook(hook)


@torch.no_grad()
def capture(
    lm: LoadedModel,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    attentions: bool = False,
    values: bool = False,
) -> Captured:
    """Run ``lm`` on ``input_ids [B, T]`` (int64) and capture the residual stream, on the
    model's (input) device whichever devices its blocks run on.

    ``attention_mask [B, T]`` is 1 for real tokens (right padding).
    """
    hidden: list[Tensor | None] = [None] * (int(lm.summary.n_layers) + 1)
    per_layer: list[Tensor | None] = [None] * int(lm.summary.n_layers)
    device = lm.device

    def keep(layer: int, h: Tensor) -> None:
        hidden[layer] = h.to(device)

    def keep_values(layer: int, v: Tensor) -> None:
        per_layer[layer] = v.to(device)

    sink = keep_values if values else None
    output = stream_hidden(lm, input_ids, keep, attention_mask, attentions=attentions, values=sink)
    stacked = torch.stack([h for h in hidden if h is not None])
    probs = torch.stack([_float32(a).to(device) for a in output.attentions]) if attentions else None
    return Captured(
        hidden=stacked,
        attentions=probs,
        values=torch.stack([v for v in per_layer if v is not None]) if values else None,
    )


def iter_captures(
    lm: LoadedModel,
    token_ids: Tensor,
    runtime: Runtime,
    attention_mask: Tensor | None = None,
    **capture_kwargs: Any,
) -> Iterator[tuple[int, Captured]]:
    """Yield ``(start, Captured)`` for each batch ``token_ids[start : start + batch_size]``."""
    for start in range(0, token_ids.shape[0], runtime.batch_size):
        stop = start + runtime.batch_size
        mask = attention_mask[start:stop] if attention_mask is not None else None
        yield start, capture(lm, token_ids[start:stop], mask, **capture_kwargs)
