"""Identifiability [BRU] (SPEC section 5): attention null spaces, effective attention, token
identifiability across hidden states, hidden token attribution."""

from tgeom.analyses.identifiability.attribution import AttributionResult, token_attribution
from tgeom.analyses.identifiability.effective import (
    EffectiveAttentionResult,
    PearsonTable,
    effective_attention,
)
from tgeom.analyses.identifiability.identify import IdentifiabilityResult, token_identifiability
from tgeom.analyses.identifiability.nullspace_dims import NullSpaceResult, null_space_dims

__all__ = [
    "AttributionResult",
    "EffectiveAttentionResult",
    "IdentifiabilityResult",
    "NullSpaceResult",
    "PearsonTable",
    "effective_attention",
    "null_space_dims",
    "token_attribution",
    "token_identifiability",
]
