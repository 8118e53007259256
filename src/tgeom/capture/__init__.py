"""Batched forward passes yielding hidden states, attentions and per-head values."""

from __future__ import annotations

from tgeom.capture.capture import Captured, capture, iter_captures, stream_hidden

__all__ = ["Captured", "capture", "iter_captures", "stream_hidden"]
