"""Rasters read by window: a scene opened once (local or s3://, ranged reads), windows of it read
without the rest, and the header checks a scene passes before any window is read."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segray.io import imagery, storage


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


@contextlib.contextmanager
def open_scene(uri: str, *, endpoint: str | None = None) -> Iterator[Any]:
    """Open a scene for windowed reads with rasterio, without reading it whole.

    Local files are opened directly; ``s3://`` objects through a Python opener backed by
    pyarrow's S3 filesystem (the credentials and endpoint of :mod:`segray.io.storage`), so GDAL
    fetches only the header and the blocks a window touches, as ranged GETs.
    """
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        if not storage.is_s3(uri):
            with rasterio.open(storage.parse(uri).path) as ds:
                yield ds
            return
        fs, path = storage.pyarrow_filesystem(uri, endpoint=endpoint)

        def opener(name: str, mode: str = "rb") -> Any:
            try:
                return fs.open_input_file(name)
            except OSError as exc:  # GDAL probes side-car files; "missing" must say so
                raise FileNotFoundError(name) from exc

        with rasterio.Env(GDAL_PAM_ENABLED="NO"), rasterio.open(path, opener=opener) as ds:
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


#: Largest scene accepted: its uint8 mask is held whole by the driver while it is stitched.
MAX_SCENE_PIXELS = 1 << 30


def check_scene(ds: Any, uri: str, bands: Sequence[int] | None) -> None:
    """Refuse a scene from its header alone: size, band count, pixel type, band selection."""
    imagery.check_header(uri, ds.width, ds.height, ds.count, ds.dtypes[0], MAX_SCENE_PIXELS)
    if bands:
        imagery.check_band_selection(bands, ds.count, uri)
