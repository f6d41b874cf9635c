"""Where training chips of large scenes come from: validation held out by whole scenes
(``val_split="scenes"``) or by square blocks of every scene (``"blocks"``), a fixed grid of
validation chips over what is held out, and training chips drawn at random clear of it, so no
validation pixel is ever trained on. Only scene headers and label geometry are used here; the
pixels are read by :func:`segray.datasets.chips.read_chip`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from segray.datasets.scene import Chip, ChipScene
from segray.errors import DatasetError

if TYPE_CHECKING:
    from segray.datasets.labels import DatasetSpec


@dataclass
class ChipSplit:
    """The scenes, the held-out rectangles per scene (col, row, width, height), the validation
    chips (a fixed grid over them) and the scenes training draws from."""

    scenes: list[ChipScene]
    size: int
    held_out: dict[int, list[tuple[int, int, int, int]]]
    val_chips: list[Chip]
    train_scenes: list[int]

    def allowed(self, chip: Chip) -> bool:
        """Whether a training chip keeps clear of every held-out rectangle of its scene."""
        s = self.size
        for col, row, w, h in self.held_out.get(chip.scene, ()):
            if (
                chip.col < col + w
                and col < chip.col + s
                and chip.row < row + h
                and row < chip.row + s
            ):
                return False
        return True


def split(scenes: list[ChipScene], spec: DatasetSpec) -> ChipSplit:
    """Hold out whole scenes or blocks of every scene (seeded) and lay the validation grid."""
    size = spec.size[0] if spec.size else 0
    rng = np.random.default_rng(spec.seed)
    held: dict[int, list[tuple[int, int, int, int]]] = {}
    if spec.val_fraction <= 0:
        return ChipSplit(scenes, size, {}, [], list(range(len(scenes))))
    if spec.val_split == "scenes":
        if len(scenes) < 2:
            raise DatasetError(
                "--val-split scenes needs two scenes or more; use --val-split blocks"
            )
        n = min(max(1, round(len(scenes) * spec.val_fraction)), len(scenes) - 1)
        for i in sorted(rng.permutation(len(scenes))[:n].tolist()):
            held[i] = [(0, 0, scenes[i].width, scenes[i].height)]
        train = [i for i in range(len(scenes)) if i not in held]
    else:
        block = spec.block_size or 4 * size
        block = max(size, block - block % size)
        cells = [
            (i, col, row, min(block, s.width - col), min(block, s.height - row))
            for i, s in enumerate(scenes)
            for row in range(0, s.height - size + 1, block)
            for col in range(0, s.width - size + 1, block)
        ]
        if len(cells) < 2:
            raise DatasetError(
                f"scenes hold {len(cells)} block(s) of {block} px; lower --block-size"
            )
        n = min(max(1, round(len(cells) * spec.val_fraction)), len(cells) - 1)
        for j in sorted(rng.permutation(len(cells))[:n].tolist()):
            i, *rect = cells[j]
            held.setdefault(i, []).append(tuple(rect))
        train = list(range(len(scenes)))
    val = [
        Chip(i, c, r)
        for i, rects in sorted(held.items())
        for col, row, w, h in rects
        for r in _grid(row, h, size)
        for c in _grid(col, w, size)
    ]
    return ChipSplit(scenes, size, held, val, train)


def scene_grid(scenes: list[ChipScene], size: int) -> list[Chip]:
    """Chips of ``size`` covering every scene whole, row by row (the last ones flush)."""
    return [
        Chip(i, c, r)
        for i, s in enumerate(scenes)
        for r in _grid(0, s.height, size)
        for c in _grid(0, s.width, size)
    ]


def _grid(start: int, length: int, size: int) -> list[int]:
    """Chip origins covering [start, start + length) without leaving it (the last one flush)."""
    if length < size:
        return []
    origins = list(range(start, start + length - size + 1, size))
    if origins[-1] + size < start + length:
        origins.append(start + length - size)
    return origins


def draw(plan: ChipSplit, rng: np.random.Generator, positive_fraction: float) -> Chip:
    """One training chip: a scene by its area, a window clear of held-out blocks; with
    ``positive_fraction`` odds, a window around a point of a random labelled feature."""
    scenes, size = plan.scenes, plan.size
    areas = np.array([scenes[i].width * scenes[i].height for i in plan.train_scenes], float)
    chip = Chip(0, 0, 0)
    for _ in range(200):
        i = plan.train_scenes[int(rng.choice(len(areas), p=areas / areas.sum()))]
        scene = scenes[i]
        col, row = _origin(scene, size, rng, positive_fraction)
        chip = Chip(i, col, row)
        if plan.allowed(chip):
            return chip
    raise DatasetError("no training chip keeps clear of the held-out blocks; lower --val-fraction")


def _origin(
    scene: ChipScene, size: int, rng: np.random.Generator, positive: float
) -> tuple[int, int]:
    hi_col, hi_row = scene.width - size, scene.height - size
    vector = scene.vector
    if vector is not None and len(vector) and rng.random() < positive:
        minx, miny, maxx, maxy = vector.boxes[int(rng.integers(len(vector)))]
        x, y = rng.uniform(minx, max(maxx, minx + 1)), rng.uniform(miny, max(maxy, miny + 1))
        col, row = int(x) - int(rng.integers(size)), int(y) - int(rng.integers(size))
        return int(np.clip(col, 0, hi_col)), int(np.clip(row, 0, hi_row))
    return int(rng.integers(hi_col + 1)), int(rng.integers(hi_row + 1))
