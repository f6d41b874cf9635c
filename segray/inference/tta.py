"""Test-time augmentation: the model sees each window flipped (``flips``: the 4 flips of the
Klein group) or under every symmetry of the square (``d4``: 4 rotations × 2 reflections), each
prediction is turned back, and the class probabilities are averaged.

Satellite imagery has no "up": a building seen rotated is still a building, so averaging over
the symmetries removes the model's orientation bias at the cost of 4 or 8 model calls per window.
:func:`segray.inference.run.infer` applies it, so bulk tiles and scenes, Serve, map tiles and
evaluation all average the same way.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

TTA = Literal["none", "flips", "d4"]
#: Settings' help text for the option, shared by every config that has it.
HELP = (
    "Test-time augmentation: average the class probabilities over the 4 flips (flips) or the 8 "
    "symmetries of the square (d4) of each window; costs 4 or 8 model passes."
)
#: A symmetry of the square: (quarter turns counter-clockwise, then a left-right flip or not).
Symmetry = tuple[int, bool]


def symmetries(mode: str) -> list[Symmetry]:
    """The symmetries ``mode`` averages over, the identity first."""
    if mode == "none":
        return [(0, False)]
    if mode == "flips":  # identity, left-right, up-down (turn by 2 + left-right), both (turn by 2)
        return [(0, False), (0, True), (2, True), (2, False)]
    if mode == "d4":
        return [(k, flip) for flip in (False, True) for k in range(4)]
    raise ValueError(f"tta: expected one of {', '.join(get_args(TTA))}; got {mode!r}")


def apply(x: np.ndarray, s: Symmetry) -> np.ndarray:
    """A batch (B, H, W, C) under the symmetry ``s``."""
    turns, flip = s
    out = np.rot90(x, turns, axes=(1, 2)) if turns else x
    return out[:, :, ::-1] if flip else out


def undo(y: np.ndarray, s: Symmetry) -> np.ndarray:
    """The inverse of :func:`apply`: a prediction of the transformed batch back on the grid of
    the original."""
    turns, flip = s
    out = y[:, :, ::-1] if flip else y
    return np.rot90(out, -turns, axes=(1, 2)) if turns else out


def needs_square(mode: str) -> bool:
    """Whether ``mode`` turns windows by a quarter, which swaps their height and width."""
    return any(turns % 2 for turns, _ in symmetries(mode))
