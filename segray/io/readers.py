"""One interface for reading rasters, whatever holds them (after rio-tiler's ``BaseReader``).

A :class:`RasterReader` gives its :meth:`~RasterReader.header` (size, bands, pixel type,
georeference, nodata) and :meth:`~RasterReader.read`s a :class:`~segray.io.imagery.Tile`: the
whole raster or a window of it, with a ``margin`` of pixels around the window (boundless: beyond
the raster's edge they are no data), optionally onto a target :class:`Grid` (reprojected, in the
grid's pixels). The tile carries the pixels, the map of those that are data, and the window's
own georeference. Implementations: :class:`TileReader` (encoded bytes: PNG, JPEG, GeoTIFF),
:class:`SceneReader` (a GeoTIFF/COG read window by window; ranged reads on S3) and
:class:`StacItemReader` (an asset of a STAC item). Every caller gets its reader from
:func:`open_reader`: a Zarr or XYZ reader is one more class and one more branch there.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from segray.errors import TileError
from segray.io import gdal, imagery
from segray.io.grids import Grid, RasterHeader, Window
from segray.io.imagery import Tile

if TYPE_CHECKING:
    from segray.io.files import FileSystem
    from segray.io.stac import StacInput


def open_reader(
    source: str | bytes | StacInput,
    fs: FileSystem | None = None,
    *,
    uri: str | None = None,
    asset: str | None = None,
    drivers: Sequence[str] | None = None,
    max_pixels: int = imagery.MAX_PIXELS,
) -> RasterReader:
    """The reader of ``source``: encoded bytes (a fetched tile, a request body; ``uri`` names
    them in errors, ``max_pixels`` bounds their decode), a STAC item (its ``asset``), or the
    URI of a scene read window by window through ``fs`` (``drivers``: the GDAL drivers that may
    open it)."""
    if isinstance(source, bytes | bytearray | memoryview):
        return TileReader(bytes(source), uri or "<bytes>", max_pixels)
    if isinstance(source, str):
        return SceneReader(source, fs, drivers)
    return StacItemReader(source, asset, fs)


class RasterReader(ABC):
    """A raster to read from; a context manager that closes what it opened."""

    uri: str

    @abstractmethod
    def header(self) -> RasterHeader:
        """Size, bands, pixel type, georeference and nodata, from the header alone."""

    @abstractmethod
    def read(
        self,
        window: Window | None = None,
        *,
        bands: Sequence[int] | None = None,
        margin: int = 0,
        grid: Grid | None = None,
        fill: float | None = None,
    ) -> Tile:
        """The pixels of ``window`` (all of them without one) and ``margin`` pixels around it,
        in the 1-based ``bands`` (all without them); with ``grid``, the raster reprojected onto
        it (nearest neighbour: class ids stay ids) and ``window`` in its pixels. Pixels beyond
        the raster are ``fill`` (else the file's nodata, else 0) and not data in ``valid``."""

    def close(self) -> None:
        """Release what the reader holds (idempotent)."""
        return None

    def __enter__(self) -> RasterReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _DatasetReads(RasterReader):
    """Reads shared by readers backed by an open rasterio dataset (:meth:`dataset`)."""

    format = "tiff"

    @abstractmethod
    def dataset(self) -> Any:
        """The open rasterio dataset."""

    def header(self) -> RasterHeader:
        ds = self.dataset()
        crs = ds.crs.to_string() if ds.crs else None
        transform = None if ds.transform.is_identity else ds.transform
        return RasterHeader(
            self.uri,
            self.format,
            ds.width,
            ds.height,
            ds.count,
            ds.dtypes[0],
            crs,
            transform,
            ds.nodata,
        )

    def read(
        self,
        window: Window | None = None,
        *,
        bands: Sequence[int] | None = None,
        margin: int = 0,
        grid: Grid | None = None,
        fill: float | None = None,
    ) -> Tile:
        ds = self.dataset()
        indexes = list(bands) if bands else list(range(1, ds.count + 1))
        with contextlib.ExitStack() as stack:
            src = ds if grid is None else stack.enter_context(_warped(ds, grid, fill))
            return _read_dataset(src, self.uri, indexes, window, margin, fill, ds.nodata)


def _warped(ds: Any, grid: Grid, fill: float | None) -> Any:
    from rasterio.crs import CRS
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    nodata = fill if fill is not None else ds.nodata
    # without a nodata value, an alpha band marks what lies outside the source as no data
    return WarpedVRT(
        ds,
        crs=CRS.from_user_input(grid.crs),
        transform=grid.transform,
        width=grid.width,
        height=grid.height,
        resampling=Resampling.nearest,
        nodata=nodata,
        add_alpha=nodata is None,
    )


def _read_dataset(
    src: Any,
    uri: str,
    indexes: list[int],
    window: Window | None,
    margin: int,
    fill: float | None,
    nodata: float | None,
) -> Tile:
    """A window (plus margin) of an open dataset or VRT as a Tile with its own georeference;
    the part beyond the raster is read as nothing and filled."""
    from affine import Affine

    from segray.io.rasters import read_window

    row, col = (window.row, window.col) if window else (0, 0)
    height, width = (window.height, window.width) if window else (src.height, src.width)
    top, left = row - margin, col - margin
    shape = (height + 2 * margin, width + 2 * margin)
    rows = (max(top, 0), min(top + shape[0], src.height))
    cols = (max(left, 0), min(left + shape[1], src.width))
    inner = Window(rows[0], cols[0], max(rows[1] - rows[0], 0), max(cols[1] - cols[0], 0))
    if (inner.height, inner.width) == shape:
        array, valid = read_window(src, inner, indexes)
    else:
        value = fill if fill is not None else (src.nodata if src.nodata is not None else 0)
        array = np.full((*shape, len(indexes)), value, dtype=src.dtypes[0])
        valid = np.zeros(shape, bool)
        if inner.width and inner.height:
            at = (slice(rows[0] - top, rows[1] - top), slice(cols[0] - left, cols[1] - left))
            array[at], inside = read_window(src, inner, indexes)
            valid[at] = True if inside is None else inside
    crs = src.crs.to_string() if src.crs else None
    transform = None if src.transform.is_identity else src.transform @ Affine.translation(left, top)
    meta = {"nodata": nodata}
    return Tile(array, uri, "tiff", crs=crs, transform=transform, meta=meta, valid=valid)


class SceneReader(_DatasetReads):
    """A GeoTIFF or COG opened once and read window by window, never whole: locally, or on S3
    by ranged reads through ``fs`` (see :func:`segray.io.rasters.open_scene`). ``drivers``
    limits the GDAL drivers that may open it (a source named by a client: no VRT pointing
    anywhere)."""

    def __init__(
        self, uri: str, fs: FileSystem | None = None, drivers: Sequence[str] | None = None
    ) -> None:
        self.uri, self.fs, self.drivers = uri, fs, drivers
        self._stack = contextlib.ExitStack()
        self._ds: Any = None

    def dataset(self) -> Any:
        if self._ds is None:
            from segray.io.rasters import open_scene

            self._ds = self._stack.enter_context(open_scene(self.uri, self.fs, self.drivers))
        return self._ds

    def close(self) -> None:
        self._stack.close()
        self._ds = None


class TileReader(_DatasetReads):
    """A whole image held as encoded bytes (a tile fetched from storage, a request body): read
    whole by the one decode (:func:`segray.io.imagery.decode`); a TIFF is also read by window,
    margin or grid from memory. Bytes that are no image raise the decode's
    :class:`~segray.errors.TileError`."""

    def __init__(
        self, data: bytes, uri: str = "<bytes>", max_pixels: int = imagery.MAX_PIXELS
    ) -> None:
        self.data, self.uri, self.max_pixels = data, uri, max_pixels
        self._stack = contextlib.ExitStack()
        self._ds: Any = None

    def header(self) -> RasterHeader:
        if not self.data or imagery.sniff(self.data) != "tiff":
            head = imagery.header(self.data, self.uri)
            size = (head.width, head.height, head.count, head.dtype)
            return RasterHeader(self.uri, head.format, *size)
        return super().header()

    def read(
        self,
        window: Window | None = None,
        *,
        bands: Sequence[int] | None = None,
        margin: int = 0,
        grid: Grid | None = None,
        fill: float | None = None,
    ) -> Tile:
        with gdal.ensured():
            return self._read(window, bands, margin, grid, fill)

    def _read(
        self,
        window: Window | None,
        bands: Sequence[int] | None,
        margin: int,
        grid: Grid | None,
        fill: float | None,
    ) -> Tile:
        whole = window is None and not margin and grid is None
        if whole or imagery.sniff(self.data) != "tiff":
            tile = imagery.decode(self.data, self.uri, bands=bands, max_pixels=self.max_pixels)
            if grid is not None:
                raise TileError(self.uri, "a grid read needs a georeferenced TIFF", "format")
            return tile if whole else _window_of(tile, window, margin)
        try:
            return super().read(window, bands=bands, margin=margin, grid=grid, fill=fill)
        except TileError:
            raise
        except Exception as exc:
            raise TileError(self.uri, f"corrupt or truncated TIFF: {exc}", "corrupt") from exc

    def dataset(self) -> Any:
        if self._ds is None:
            import warnings

            import rasterio
            from rasterio.errors import NotGeoreferencedWarning

            memory = rasterio.MemoryFile(self.data)
            try:
                with warnings.catch_warnings(), gdal.ensured():
                    warnings.simplefilter("ignore", NotGeoreferencedWarning)
                    self._ds = memory.open()
            except Exception as exc:
                memory.close()
                reason = f"corrupt or truncated image: {exc}"
                raise TileError(self.uri, reason, "corrupt") from exc
            self._stack.callback(memory.close)
            self._stack.callback(self._ds.close)
        return self._ds

    def close(self) -> None:
        self._stack.close()
        self._ds = None


def _window_of(tile: Tile, window: Window | None, margin: int) -> Tile:
    """A window plus margin of a decoded image without georeference (PNG, JPEG): zeros and not
    data beyond its edge."""
    h, w = tile.array.shape[:2]
    row, col = (window.row, window.col) if window else (0, 0)
    height, width = (window.height, window.width) if window else (h, w)
    top, left = row - margin, col - margin
    shape = (height + 2 * margin, width + 2 * margin)
    rows = slice(max(top, 0), min(top + shape[0], h))
    cols = slice(max(left, 0), min(left + shape[1], w))
    at = (slice(rows.start - top, rows.stop - top), slice(cols.start - left, cols.stop - left))
    out = np.zeros((*shape, tile.array.shape[2]), tile.array.dtype)
    valid = np.zeros(shape, bool)
    out[at] = tile.array[rows, cols]
    valid[at] = True if tile.valid is None else tile.valid[rows, cols]
    valid_or_none = None if valid.all() else valid
    return Tile(out, tile.source, tile.format, meta=dict(tile.meta), valid=valid_or_none)


class StacItemReader(RasterReader):
    """An asset of a STAC item (``asset`` key, or the item's one raster asset), read as a scene;
    errors name the item."""

    def __init__(self, item: StacInput, asset: str | None = None, fs: FileSystem | None = None):
        self.item = item
        self.uri = item.asset(asset)
        self._scene = SceneReader(self.uri, fs)

    def header(self) -> RasterHeader:
        return self._scene.header()

    def read(
        self,
        window: Window | None = None,
        *,
        bands: Sequence[int] | None = None,
        margin: int = 0,
        grid: Grid | None = None,
        fill: float | None = None,
    ) -> Tile:
        return self._scene.read(window, bands=bands, margin=margin, grid=grid, fill=fill)

    def close(self) -> None:
        self._scene.close()
