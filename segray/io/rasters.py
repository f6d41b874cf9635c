"""Rasters by window: a scene opened once (local or s3://, ranged reads), windows of it read
without the rest, the header checks a scene passes before any window is read, and a one-band
raster written a band of rows at a time (:class:`BandWriter`), never whole in memory."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from segray.io import gdal, imagery, storage
from segray.io.files import FileSystem
from segray.io.grids import RasterHeader, Window


@contextlib.contextmanager
def open_scene(
    uri: str, fs: FileSystem | None = None, drivers: Sequence[str] | None = None
) -> Iterator[Any]:
    """Open a scene for windowed reads with rasterio, without reading it whole.

    Local files are opened directly; ``s3://`` objects through a Python opener backed by
    pyarrow's S3 filesystem (the endpoint and credentials of ``fs``, by default the one
    :func:`storage.filesystem` chooses), so GDAL fetches only the header and the blocks a
    window touches, as ranged GETs. ``drivers``: the GDAL drivers allowed to open it (all
    without).
    """
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        fs = fs or storage.filesystem(uri)
        only = (drivers[0] if len(drivers) == 1 else list(drivers)) if drivers else None
        if fs.scheme == "file":
            with gdal.ensured(), rasterio.open(storage.parse(uri).path, driver=only) as ds:
                yield ds
            return
        arrow, path = fs.arrow(uri)

        def opener(name: str, mode: str = "rb") -> Any:
            try:
                return arrow.open_input_file(name)
            except OSError as exc:  # GDAL probes side-car files; "missing" must say so
                raise FileNotFoundError(name) from exc

        with gdal.env(GDAL_PAM_ENABLED="NO"), rasterio.open(path, driver=only, opener=opener) as ds:
            yield ds


def read_window(
    ds: Any, window: Window, bands: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Pixels (h, w, C) of ``window`` from an open rasterio dataset (``bands`` are 1-based), and
    the (h, w) map of those that are data (None: all are; see :func:`imagery.read_valid`)."""
    from rasterio.windows import Window as RioWindow

    rio = RioWindow(window.col, window.row, window.width, window.height)
    indexes = list(bands) if bands else list(range(1, ds.count + 1))
    pixels = np.ascontiguousarray(np.moveaxis(ds.read(indexes, window=rio), 0, -1))
    return pixels, imagery.read_valid(ds, indexes, rio)


#: Largest scene accepted (32,768² pixels): its footprints, when asked for, are vectorised from
#: its class ids read whole (one byte a pixel).
MAX_SCENE_PIXELS = 1 << 30


def check_scene(head: RasterHeader, bands: Sequence[int] | None) -> None:
    """Refuse a scene from its header alone: size, band count, pixel type, band selection."""
    uri = head.uri
    imagery.check_header(uri, head.width, head.height, head.count, head.dtype, MAX_SCENE_PIXELS)
    if bands:
        imagery.check_band_selection(bands, head.count, uri)


class BandWriter:
    """A one-band raster of a known size written a band of rows at a time, in any order, to an
    uncompressed GeoTIFF in a local ``folder``; :meth:`cog` then copies it to a Cloud-Optimized
    GeoTIFF beside it (GDAL reads the source block by block). Memory holds a band, never the
    raster; the folder holds the raster uncompressed (one byte a pixel for a uint8 mask).

    ``colormap`` (RGB per value), ``tags`` and ``nodata`` go into the file as
    :func:`segray.io.imagery.encode_geotiff` puts them into a mask encoded whole.
    """

    def __init__(
        self,
        folder: str,
        name: str,
        shape: tuple[int, int],
        *,
        crs: Any = None,
        transform: Any = None,
        nodata: float | None = None,
        colormap: Sequence[Sequence[int]] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        import warnings

        import rasterio
        from rasterio.errors import NotGeoreferencedWarning

        self.path = os.path.join(folder, f"{name}.tif")
        self.height, self.width = shape
        profile = {"height": self.height, "width": self.width, "count": 1, "dtype": "uint8"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            self._ds = rasterio.open(
                self.path,
                "w",
                driver="GTiff",
                crs=crs,
                transform=transform,
                nodata=nodata,
                **profile,
            )
        if colormap is not None:
            self._ds.write_colormap(1, {i: (*map(int, c[:3]), 255) for i, c in enumerate(colormap)})
        if tags:
            self._ds.update_tags(**tags)

    def write(self, top: int, rows: np.ndarray) -> None:
        """Write ``rows`` (h, width) with its first row at ``top``."""
        from rasterio.windows import Window as RioWindow

        rows = np.asarray(rows, np.uint8)
        fits = rows.ndim == 2 and rows.shape[1] == self.width
        if not (fits and 0 <= top <= self.height - len(rows)):
            raise ValueError(f"rows {rows.shape} at {top} do not fit {self.height}x{self.width}")
        self._ds.write(rows, 1, window=RioWindow(0, top, self.width, len(rows)))

    def close(self) -> None:
        """Flush and close the file (idempotent)."""
        if not self._ds.closed:
            self._ds.close()

    def read(self) -> np.ndarray:
        """The whole raster (h, w): for what needs it whole, such as vectorising."""
        import rasterio

        self.close()
        with rasterio.open(self.path) as ds:
            return ds.read(1)

    def cog(self, compress: str = "deflate") -> str:
        """Copy the raster to a COG beside it (256 px tiles, nearest-resampled overviews, so
        class ids stay ids); returns the COG's path."""
        from rasterio.shutil import copy as copy_dataset

        self.close()
        target = self.path[: -len(".tif")] + ".cog.tif"
        options = {"COMPRESS": compress.upper(), "BLOCKSIZE": 256}
        copy_dataset(self.path, target, driver="COG", OVERVIEW_RESAMPLING="NEAREST", **options)
        return target
