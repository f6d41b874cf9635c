"""Smooth random fields for synthetic imagery: multi-octave value noise from a numpy generator,
so that a seed gives the same field at any size."""

from __future__ import annotations

import numpy as np


def value_noise(rng: np.random.Generator, h: int, w: int, cell: float, octaves: int) -> np.ndarray:
    """Multi-octave value noise in [0, 1]; ``cell`` is the coarsest feature size in pixels."""
    total = np.zeros((h, w), np.float32)
    for octave in range(octaves):
        total += 0.5**octave * _value_layer(rng, h, w, max(cell / 2**octave, 1.0))
    return total / (2 - 0.5 ** (octaves - 1))


def _value_layer(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Random values on a grid of ``cell`` px, smoothly interpolated (separably) to (h, w)."""
    rows, row_t = _grid_coordinates(rng, h, cell)
    cols, col_t = _grid_coordinates(rng, w, cell)
    grid = rng.random((rows[-1] + 2, cols[-1] + 2), dtype=np.float32)
    row_t, col_t = row_t[:, None], col_t[None, :]
    across = grid[rows] * (1 - row_t) + grid[rows + 1] * row_t
    return across[:, cols] * (1 - col_t) + across[:, cols + 1] * col_t


def _grid_coordinates(rng: np.random.Generator, n: int, cell: float) -> tuple[np.ndarray, ...]:
    """Grid index left of each pixel and the smoothstep weight of the next one."""
    position = (np.arange(n, dtype=np.float32) + rng.uniform(0, cell)) / np.float32(cell)
    index = position.astype(np.int64)
    t = position - index
    return index, t * t * (3 - 2 * t)
