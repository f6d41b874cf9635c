"""The value types of reading rasters, in a module of their own so that readers and rasters
both take them without importing each other: a :class:`Window` of a scene in pixels, a target
:class:`Grid` to read onto, and the :class:`RasterHeader` a raster gives before any pixel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from affine import Affine


@dataclass(frozen=True)
class Window:
    """A rectangle of a scene in pixels: top row, left column, height and width."""

    row: int
    col: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(rows, cols)`` slices of this window in the scene array."""
        return slice(self.row, self.row + self.height), slice(self.col, self.col + self.width)


@dataclass(frozen=True)
class Grid:
    """A target pixel grid: ``width`` x ``height`` pixels placed by ``transform`` in ``crs``."""

    crs: str
    transform: Affine
    width: int
    height: int


@dataclass(frozen=True)
class RasterHeader:
    """What a raster says about itself before any pixel is read."""

    uri: str
    format: str
    width: int
    height: int
    count: int
    dtype: str
    crs: str | None = None
    transform: Affine | None = None
    nodata: float | None = None
