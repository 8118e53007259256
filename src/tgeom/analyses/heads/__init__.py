"""The head atlas: every head read through the three papers at once (SPEC section 7).

:func:`heads` builds it (:mod:`~tgeom.analyses.heads.atlas`: heads.csv's rows and the layer
atlas, :class:`HeadsResult`); :mod:`~tgeom.analyses.heads.corpus_pass` is its one forward pass
per batch; :mod:`~tgeom.analyses.heads.layer_atlas` reads each layer's topic and positional
directions in tokens.
:mod:`~tgeom.analyses.heads.spectral`: ``ov_copying`` and ``qk_same_token`` from the heads'
``[d_head, d_head]`` circuit products (:func:`spectral_scores`);
:mod:`~tgeom.analyses.heads.behaviour`: ``prev_token``, ``first_token``, ``entropy`` and
``induction`` from the model's attention probabilities, as float64 accumulators
(:class:`TextBehaviour`, :class:`InductionScores`).
"""

from tgeom.analyses.heads.atlas import HeadsResult, heads
from tgeom.analyses.heads.behaviour import (
    InductionBatch,
    InductionScores,
    TextBehaviour,
    induction_batch,
    induction_scores,
    text_behaviour,
)
from tgeom.analyses.heads.spectral import SpectralScores, spectral_scores

__all__ = [
    "HeadsResult",
    "InductionBatch",
    "InductionScores",
    "SpectralScores",
    "TextBehaviour",
    "heads",
    "induction_batch",
    "induction_scores",
    "spectral_scores",
    "text_behaviour",
]
