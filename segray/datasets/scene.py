"""A labelled scene's header and a chip of it: the value types of the ``scenes`` layout, in a
module of their own so that :mod:`segray.datasets.chips` (reading) and
:mod:`segray.datasets.sampling` (choosing) take them without importing each other."""

from __future__ import annotations

from dataclasses import dataclass, field

from segray.io import vectors


@dataclass(frozen=True)
class Chip:
    """A window of scene ``scene`` (index), ``size`` square, at (col, row)."""

    scene: int
    col: int
    row: int
    weight: float = 1.0


@dataclass(frozen=True)
class ChipScene:
    """A scene's header and where its labels are (``labels``: a raster's URI, or ``vector``)."""

    id: str
    image: str
    width: int
    height: int
    crs: str | None
    transform: tuple[float, ...] | None
    labels: str | None = None
    vector: vectors.SceneLabels | None = field(default=None, compare=False)
