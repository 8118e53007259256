"""Helpers that read results.json documents in tests."""

from __future__ import annotations

from typing import Any


def keys_saying_layer(document: Any, where: str = "") -> list[str]:
    """Every key path of a JSON document whose key contains 'layer' (ambiguous: a hidden state
    0..L or a block 0..L-1; results name one or the other)."""
    found = []
    if isinstance(document, dict):
        for key, value in document.items():
            if "layer" in key.lower():
                found.append(f"{where}/{key}")
            found += keys_saying_layer(value, f"{where}/{key}")
    elif isinstance(document, list):
        for index, value in enumerate(document):
            found += keys_saying_layer(value, f"{where}[{index}]")
    return found
