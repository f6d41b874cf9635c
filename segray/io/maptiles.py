"""A raster seen as map tiles: z/x/y of a tile matrix set (OGC TMS 2.0, through morecantile) read
through any :class:`~segray.io.readers.RasterReader`, with a margin of pixels around the tile.

:class:`MapTiles` says where a source lies on a tile matrix set (its WGS84 bounds and the zooms
of its resolution, for TileJSON) and reads a tile as a :class:`~segray.io.imagery.Tile` on the
tile's own pixel grid: the source reprojected (nearest neighbour) onto ``size`` x ``size``
pixels plus ``margin`` on every side, no data where the source has none. The tile math is
morecantile's; the reprojection is the reader's :class:`~segray.io.readers.Grid` read (GDAL's
warped VRT).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from segray.errors import ConfigError
from segray.io.imagery import Tile
from segray.io.readers import Grid, RasterReader

DEFAULT_TMS = "WebMercatorQuad"
TILE_SIZE = 256


@functools.cache
def tile_matrix_set(name: str) -> Any:
    """The morecantile tile matrix set called ``name``; a ConfigError lists the known ones."""
    import morecantile

    known = morecantile.tms.list()
    if name not in known:
        raise ConfigError(f"unknown tile matrix set {name!r}; known: {', '.join(known)}")
    return morecantile.tms.get(name)


@dataclass(frozen=True)
class MapInfo:
    """Where a source lies on a tile matrix set."""

    tms: str
    bounds: tuple[float, float, float, float]  # west, south, east, north (WGS84 degrees)
    xy_bounds: tuple[float, float, float, float]  # the same in the tile matrix set's CRS
    minzoom: int
    maxzoom: int

    @property
    def center(self) -> tuple[float, float, int]:
        """Longitude, latitude and the native zoom: where a map opens."""
        west, south, east, north = self.bounds
        return (west + east) / 2, (south + north) / 2, self.maxzoom


class MapTiles:
    """The tiles of one source on one tile matrix set; the reader stays the caller's."""

    def __init__(self, reader: RasterReader, tms: str = DEFAULT_TMS) -> None:
        self.reader, self.tms_name = reader, tms
        self.tms = tile_matrix_set(tms)
        self._info: MapInfo | None = None

    def info(self) -> MapInfo:
        """Bounds and zooms, from the header alone: the native zoom is the one whose resolution
        is closest to the source's reprojected resolution, the smallest the one where the whole
        source fits in about one tile (rio-tiler's rule)."""
        if self._info is None:
            self._info = self._read_info()
        return self._info

    def _read_info(self) -> MapInfo:
        from rasterio.transform import array_bounds
        from rasterio.warp import calculate_default_transform, transform_bounds

        head = self.reader.header()
        if head.crs is None or head.transform is None:
            raise ConfigError(f"{head.uri}: not georeferenced, so it has no place on a map")
        left, bottom, right, top = array_bounds(head.height, head.width, head.transform)
        crs = self.crs_string
        transform, width, height = calculate_default_transform(
            head.crs, crs, head.width, head.height, left, bottom, right, top
        )
        resolution = max(abs(transform.a), abs(transform.e))
        matrix = self.tms.matrix(self.tms.minzoom)
        side = max(matrix.tileWidth, matrix.tileHeight)
        maxzoom = self.tms.zoom_for_res(resolution)
        minzoom = self.tms.zoom_for_res(resolution * max(width, height) / side)
        xy = transform_bounds(head.crs, crs, left, bottom, right, top, densify_pts=21)
        geo = transform_bounds(head.crs, "EPSG:4326", left, bottom, right, top, densify_pts=21)
        return MapInfo(self.tms_name, geo, xy, min(minzoom, maxzoom), maxzoom)

    @functools.cached_property
    def crs_string(self) -> str:
        """The tile matrix set's CRS as rasterio takes it."""
        return self.tms.rasterio_crs.to_string()

    def check(self, z: int, x: int, y: int) -> None:
        """Refuse (ValueError) a z/x/y the tile matrix set does not have."""
        import morecantile

        if not self.tms.minzoom <= z <= self.tms.maxzoom:
            raise ValueError(f"zoom {z} is outside {self.tms.minzoom}..{self.tms.maxzoom}")
        if not self.tms.is_valid(morecantile.Tile(x, y, z)):
            raise ValueError(f"tile {z}/{x}/{y} is not in {self.tms_name}")

    def intersects(self, z: int, x: int, y: int) -> bool:
        """Whether tile z/x/y touches the source at all (no read)."""
        import morecantile

        left, bottom, right, top = self.tms.xy_bounds(morecantile.Tile(x, y, z))
        sl, sb, sr, st = self.info().xy_bounds
        return left < sr and right > sl and bottom < st and top > sb

    def grid(self, z: int, x: int, y: int, size: int = TILE_SIZE, margin: int = 0) -> Grid:
        """The pixel grid of tile z/x/y at ``size`` px, grown by ``margin`` px on every side."""
        import morecantile
        from affine import Affine
        from rasterio.transform import from_bounds

        left, bottom, right, top = self.tms.xy_bounds(morecantile.Tile(x, y, z))
        inner = from_bounds(left, bottom, right, top, size, size)
        outer = inner @ Affine.translation(-margin, -margin)
        return Grid(self.crs_string, outer, size + 2 * margin, size + 2 * margin)

    def read(
        self,
        z: int,
        x: int,
        y: int,
        *,
        size: int = TILE_SIZE,
        margin: int = 0,
        bands: Sequence[int] | None = None,
    ) -> Tile:
        """Tile z/x/y at ``size`` px and ``margin`` px around it, ``(size + 2 margin)²`` pixels:
        the source's pixels where it has data, no data (``valid`` False) elsewhere."""
        from segray.io.rasters import Window

        grid = self.grid(z, x, y, size, margin)
        whole = Window(0, 0, grid.height, grid.width)
        return self.reader.read(whole, bands=bands, grid=grid)

    def tile_at(self, lon: float, lat: float, z: int, size: int = TILE_SIZE) -> tuple:
        """``(x, y, row, col)``: the tile of zoom ``z`` holding a WGS84 point, and the point's
        pixel in it at ``size`` px."""
        tile = self.tms.tile(lon, lat, z)
        left, bottom, right, top = self.tms.xy_bounds(tile)
        px, py = self.tms.xy(lon, lat)
        col = min(size - 1, max(0, math.floor((px - left) / (right - left) * size)))
        row = min(size - 1, max(0, math.floor((top - py) / (top - bottom) * size)))
        return tile.x, tile.y, row, col
