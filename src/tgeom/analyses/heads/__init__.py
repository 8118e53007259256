"""The head atlas: every head read through the three papers at once (SPEC section 7).

:mod:`~tgeom.analyses.heads.spectral`: ``ov_copying`` and ``qk_same_token`` from the heads'
``[d_head, d_head]`` circuit products (:func:`spectral_scores`);
:mod:`~tgeom.analyses.heads.behaviour`: ``prev_token``, ``first_token``, ``entropy`` and
``induction`` from the model's attention probabilities, as float64 accumulators
(:class:`TextBehaviour`, :class:`InductionScores`).
"""

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
    "InductionBatch",
    "InductionScores",
    "SpectralScores",
    "TextBehaviour",
    "induction_batch",
    "induction_scores",
    "spectral_scores",
    "text_behaviour",
]
