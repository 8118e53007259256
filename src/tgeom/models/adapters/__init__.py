"""One small adapter per architecture family, turning a Hugging Face model into canonical form.

An adapter module defines ``FAMILY``, ``MODEL_TYPES`` (the transformers ``model_type`` values it
handles), ``summarize(hf) -> ArchitectureSummary``, ``extract(hf, summary) -> CanonicalWeights``
(the model-wide tensors, and ``layers`` from :func:`common.layer_sequence`),
``extract_layer(hf, summary, index) -> LayerWeights`` (one block, read when indexed: views of
its parameters where the layout allows) and ``blocks(hf) -> nn.ModuleList`` (the residual blocks,
whose outputs are ``hidden[1..L]``).
Adding an architecture means adding one module here and listing it in :data:`ADAPTERS`
(``docs/adapters.md``).
"""

from __future__ import annotations

from types import ModuleType

from tgeom.errors import TgeomError
from tgeom.models.adapters import (
    bert,
    bloom,
    gemma,
    gpt2,
    gpt_neo,
    gptj,
    llama,
    neox,
    opt,
    phi,
    phi3,
)

ADAPTERS: tuple[ModuleType, ...] = (
    gpt2,
    bert,
    llama,
    neox,
    opt,
    gptj,
    phi,
    gpt_neo,
    phi3,
    gemma,
    bloom,
)


def supported_model_types() -> list[str]:
    return sorted(t for adapter in ADAPTERS for t in adapter.MODEL_TYPES)


def adapter_for(model_type: str) -> ModuleType:
    """The adapter handling ``model_type``, or a one-line error listing the supported ones."""
    for adapter in ADAPTERS:
        if model_type in adapter.MODEL_TYPES:
            return adapter
    raise TgeomError(
        f"unsupported architecture '{model_type}': tgeom supports "
        f"{', '.join(supported_model_types())}; add an adapter in tgeom/models/adapters."
    )
