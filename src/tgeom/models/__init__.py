"""Models: one way to load them (:func:`load_model`) and their canonical weights."""

from __future__ import annotations

from tgeom.models.load import LoadedModel, load_model, load_tokenizer
from tgeom.models.offline import list_offline_models, offline_model_path

__all__ = [
    "LoadedModel",
    "list_offline_models",
    "load_model",
    "load_tokenizer",
    "offline_model_path",
]
