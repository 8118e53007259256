"""tgeom: read a trained transformer geometrically, in the space of its vocabulary.

The public entry points are :func:`load_model` and :func:`load_corpus`; the analyses live in
``tgeom.analyses`` and return plain data; :func:`heads` builds the head atlas (SPEC section 7).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from tgeom.analyses.heads import heads
    from tgeom.corpus import load_corpus
    from tgeom.models import load_model

__all__ = ["__version__", "heads", "load_corpus", "load_model"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import tgeom` stays cheap (torch/transformers load on first use).
    if name == "load_model":
        from tgeom.models import load_model

        return load_model
    if name == "load_corpus":
        from tgeom.corpus import load_corpus

        return load_corpus
    if name == "heads":
        from tgeom.analyses.heads import heads

        return heads
    raise AttributeError(name)
