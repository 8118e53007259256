"""Identifiability [BRU] (SPEC section 5): attention null spaces, effective attention, token
identifiability across layers, hidden token attribution."""

from tgeom.analyses.identifiability.attribution import AttributionResult, token_attribution
from tgeom.analyses.identifiability.effective import (
    EffectiveAttentionResult,
    NullSpaceResult,
    effective_attention,
    null_space_dims,
)
from tgeom.analyses.identifiability.identify import IdentifiabilityResult, token_identifiability

__all__ = [
    "AttributionResult",
    "EffectiveAttentionResult",
    "IdentifiabilityResult",
    "NullSpaceResult",
    "effective_attention",
    "null_space_dims",
    "token_attribution",
    "token_identifiability",
]
