"""Weights and hidden states in embedding (vocabulary) space [DAR] (SPEC section 3).

Modules: ``filters`` (token masks), ``projection`` (vectors, FFN keys/values, subheads),
``lens`` (logit lens), ``interaction`` (exact QK/OV top pairs), ``atlas`` (every head),
``validation``, ``alignment``, ``stitching``, ``finetune``.
"""

from __future__ import annotations

from tgeom.analyses.embedding.atlas import HeadAtlas, head_atlas
from tgeom.analyses.embedding.filters import (
    VocabularySubset,
    corpus_frequent_ids,
    frequent_token_ids,
    token_mask,
    vocabulary_subset,
)
from tgeom.analyses.embedding.interaction import (
    InteractionPairs,
    head_top_pairs,
    ov_top_pairs,
    qk_top_pairs,
)
from tgeom.analyses.embedding.lens import LogitLens, logit_lens
from tgeom.analyses.embedding.projection import (
    VocabProjection,
    neuron_vector,
    project_parameter,
    project_vector,
    subhead_vector,
)

__all__ = [
    "HeadAtlas",
    "InteractionPairs",
    "LogitLens",
    "VocabProjection",
    "VocabularySubset",
    "corpus_frequent_ids",
    "frequent_token_ids",
    "head_atlas",
    "head_top_pairs",
    "logit_lens",
    "neuron_vector",
    "ov_top_pairs",
    "project_parameter",
    "project_vector",
    "qk_top_pairs",
    "subhead_vector",
    "token_mask",
    "vocabulary_subset",
]
