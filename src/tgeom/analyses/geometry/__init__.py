"""Hidden-state geometry: streaming position/context decomposition and its measurements [SZ].

SPEC section 4. :func:`collect_statistics` runs the model once over a corpus and keeps float64
running sums (:class:`GeometryStats`, saved/loaded with safetensors + JSON); :func:`measure`
turns them into per-hidden-state numbers and figure arrays (:class:`GeometryResult`).
"""

from tgeom.analyses.geometry.collect import collect_statistics
from tgeom.analyses.geometry.measure import GeometryResult, measure
from tgeom.analyses.geometry.stats import Decomposition, GeometryStats

__all__ = ["Decomposition", "GeometryResult", "GeometryStats", "collect_statistics", "measure"]
