"""Colours for categories (topics, runs): distinct for any number of them."""

from __future__ import annotations

import itertools

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import hsv_to_rgb

# Candidates beyond tab10: 36 hues x 3 saturations x 3 values, none near white or grey.
_CANDIDATES = hsv_to_rgb(
    np.array(
        list(itertools.product(np.arange(36) / 36, (0.45, 0.7, 1.0), (0.45, 0.7, 0.95))),
        dtype=float,
    )
)


def distinct_colors(n: int) -> list[tuple[float, float, float]]:
    """``n`` RGB colours, pairwise distinct: tab10's ten first, then each next colour the
    candidate farthest (Euclidean RGB) from every colour already chosen (greedy max-min). Up to
    40 colours stay as far apart as tab10's closest pair (0.26); past 334 they repeat."""
    tab10 = colormaps["tab10"](np.arange(10))[: max(n, 0), :3]
    chosen = [(float(r), float(g), float(b)) for r, g, b in tab10]
    picked = np.array(chosen, dtype=float).reshape(-1, 3)
    nearest = np.linalg.norm(_CANDIDATES[:, None] - picked[None], axis=-1).min(1, initial=np.inf)
    while len(chosen) < n:
        best = int(np.argmax(nearest))
        rgb = _CANDIDATES[best]
        chosen.append((float(rgb[0]), float(rgb[1]), float(rgb[2])))
        nearest = np.minimum(nearest, np.linalg.norm(_CANDIDATES - rgb, axis=-1))
    return chosen
