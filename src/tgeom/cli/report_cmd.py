"""``tgeom report``: one command from model to a self-contained HTML atlas."""

from __future__ import annotations
