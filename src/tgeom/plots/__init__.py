"""Figures: result in, figure out. Axis labels shared by every module name the two indices.

A *hidden* index (0..L) is a residual-stream state: 0 the embedding output, ``h`` the output of
block ``h - 1``. A *block* index (0..L-1) is a transformer block: block ``b`` reads hidden ``b``
and writes hidden ``b + 1``.
"""

HIDDEN_AXIS = "hidden state (0 = embeddings, h = output of block h-1)"
BLOCK_AXIS = "block (0-based; block b reads hidden b)"
