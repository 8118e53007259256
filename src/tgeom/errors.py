"""User-facing errors.

Every problem caused by the user's input (a model that does not exist, an empty corpus, a layer
out of range...) is raised as a :class:`TgeomError` whose message is one line saying what is wrong
and how to fix it. The CLI prints it and exits with code 2; nothing else is caught, so a bug
still shows its traceback.
"""

from __future__ import annotations


class TgeomError(Exception):
    """A bad input, with a one-line message naming the problem and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


def check_index(name: str, value: int, size: int) -> int:
    """Return ``value`` if ``0 <= value < size``, else raise a TgeomError naming the valid range."""
    if not 0 <= value < size:
        raise TgeomError(f"{name} {value} is out of range: valid {name}s are 0..{size - 1}.")
    return value
