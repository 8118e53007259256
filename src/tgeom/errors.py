"""User-facing errors.

Every problem caused by the user's input (a model that does not exist, an empty corpus, a layer
out of range...) is raised as a :class:`TgeomError` whose message is one line saying what is wrong
and how to fix it. The CLI prints it and exits with code 2; nothing else is caught, so a bug
still shows its traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


class TgeomError(Exception):
    """A bad input, with a one-line message naming the problem and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


def check_index(name: str, value: int, size: int) -> int:
    """Return ``value`` if ``0 <= value < size``, else raise a TgeomError naming the valid range."""
    if not 0 <= value < size:
        raise TgeomError(f"{name} {value} is out of range: valid {name}s are 0..{size - 1}.")
    return value


def check_finite(name: str, tensor: Tensor) -> Tensor:
    """Return ``tensor`` if every entry is finite, else raise a TgeomError naming it and the
    index of its first NaN or inf. One float64 sum in the common, finite case (NaN and inf
    propagate through it); an overflowing sum of finite entries falls through to the exact
    entrywise check."""
    import torch

    if tensor.numel() == 0 or bool(torch.isfinite(tensor.sum(dtype=torch.float64))):
        return tensor  # NaN and inf reach the sum; a float64 sum of finite entries stays finite
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise TgeomError(
            f"{name} contains NaN or inf (first at index {where}); the model's weights or "
            "activations overflowed or are corrupt: check them or load another checkpoint."
        )
    return tensor
