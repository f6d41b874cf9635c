"""The rows a bulk job's Ray Data stages pass along, declared once: their columns, and the packing
of arrays of any shape and type into one column.

A row starts as an :class:`InputRow`; a read stage makes it a :class:`TileRow` (a whole tile) or a
:class:`WindowRow` (one window of a scene); a Predictor adds :class:`PredictedColumns`; a write
stage (or the scene assembler) ends it as a :class:`ResultRow`, the manifest's columns. Ray Data
carries batches of rows as ``{column: numpy array}``; pixels, masks and logits travel
:func:`pack`-ed as bytes with their shape and dtype, so rows of any size and type share a block.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, TypedDict

import numpy as np

from segray.io.imagery import Tile

#: The ``transform`` of a tile or scene without a georeference.
NO_TRANSFORM = [math.nan] * 6


class InputRow(TypedDict):
    """One input and where its mask goes."""

    input_uri: str
    output_uri: str
    source: str  # JSON of the STAC item the input comes from ({"href", "id", "datetime"}), or ""


class PixelColumns(TypedDict):
    """An array packed by :func:`pack`, the time spent on the row so far, and its error."""

    error: str  # "" when fine; else the reason, and the row goes on to the manifest as such
    seconds: float
    pixels: bytes
    shape: list[int]
    dtype: str
    valid: bytes  # bool (H, W) of the pixels that are data; b"": every pixel is


class TileRow(InputRow, PixelColumns):
    """A decoded tile and its georeference (``crs`` "" and ``transform`` NO_TRANSFORM: none)."""

    format: str
    crs: str
    transform: list[float]


class WindowRow(InputRow, PixelColumns):
    """One window of a scene: where it lies, how many the scene has, the scene's georeference."""

    window: list[int]  # row, col, height, width
    n_windows: int
    scene_shape: list[int]
    crs: str
    transform: list[float]


class PredictedColumns(TypedDict, total=False):
    """What a Predictor adds: ``pixels`` now hold the mask (tiles) or logits (windows)."""

    class_fractions: list[float]
    uncertainty: bytes  # uint8, the mask's shape (with mc_samples)
    labels: bytes  # uint8 class ids, the mask's shape (with footprints or vectors)
    confidence: bytes  # uint8 probability of each pixel's class, 0..254 (with vectors)


class ResultRow(TypedDict, total=False):
    """A manifest row (see :func:`segray.bulk.manifest.schema`), and ``stop``: why the job must
    stop after this row (the output can take no more writes), never written to the manifest.
    Besides the mask's ``output_uri``, a row names the file of each sink that writes one beside
    the mask, in that sink's column (:func:`segray.bulk.sinks.file_columns`)."""

    input_uri: str
    status: str
    error: str
    output_uri: str
    class_fractions: list[float]
    seconds: float
    stop: str


#: The column of a result row that stops the job (see :class:`ResultRow`).
STOP = "stop"
#: Predicted columns of uint8 arrays of the mask's shape, written beside it.
SIDE_COLUMNS = ("uncertainty", "labels", "confidence")


def pack(array: np.ndarray) -> tuple[bytes, list[int], str]:
    """An array as ``(bytes, shape, dtype)``: rows of mixed shapes and types share one column."""
    array = np.ascontiguousarray(array)
    return array.tobytes(), list(array.shape), array.dtype.name


def unpack(data: bytes, shape: Iterable[int], dtype: str) -> np.ndarray:
    """The array :func:`pack` stored."""
    return np.frombuffer(data, dtype=dtype).reshape(tuple(int(s) for s in shape))


def pack_valid(valid: np.ndarray | None) -> bytes:
    """A ``valid`` column value: the bool map's bytes, or b"" when every pixel is data."""
    return b"" if valid is None or valid.all() else np.ascontiguousarray(valid, bool).tobytes()


def unpack_valid(data: bytes, shape: Iterable[int]) -> np.ndarray | None:
    """The map :func:`pack_valid` stored, (H, W) of an array of ``shape``; None: all valid."""
    return unpack(data, list(shape)[:2], "bool") if data else None


def objects(values: Sequence[Any]) -> np.ndarray:
    """A numpy object column of ``values`` (bytes or strings of any length)."""
    column = np.empty(len(values), dtype=object)
    column[:] = list(values)
    return column


def columns(rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows as a Ray Data batch ``{column: array}``: bytes and strings (of any length) as
    numpy object arrays, numbers and lists of them as numeric arrays."""
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        text = any(isinstance(v, (str, bytes)) or v is None for v in values)
        out[key] = objects(values) if text else np.asarray(values)
    return out


def tile_columns(tile: Tile, seconds: float = 0.0) -> dict[str, Any]:
    """The columns of a decoded tile or window (:class:`TileRow`): its pixels packed, the map of
    those that are data, its format and georeference (``crs`` "", ``transform`` NO_TRANSFORM:
    none). :func:`pixels_of` is the way back."""
    pixels, shape, dtype = pack(tile.array)
    t = tile.transform
    return {
        "error": "",
        "seconds": seconds,
        "pixels": pixels,
        "shape": shape,
        "dtype": dtype,
        "valid": pack_valid(tile.valid),
        "format": tile.format or "",
        "crs": tile.crs or "",
        "transform": list(t)[:6] if t is not None else NO_TRANSFORM,
    }


def pixels_of(batch: dict[str, np.ndarray], i: int) -> Tile:
    """Row ``i`` of a batch as the :class:`Tile` its columns hold (:func:`tile_columns`): its
    pixels, the map of those that are data and, where the row has them, its georeference."""
    shape = batch["shape"][i]
    array = unpack(batch["pixels"][i], shape, batch["dtype"][i])
    crs, transform = None, None
    if "crs" in batch:
        crs, transform = georeference(str(batch["crs"][i]), batch["transform"][i])
    fmt = str(batch["format"][i]) if "format" in batch else "tiff"
    valid = unpack_valid(batch["valid"][i], shape)
    source = str(batch["input_uri"][i])
    return Tile(array, source, fmt or "tiff", crs=crs, transform=transform, valid=valid)


def failed_tile(reason: str, seconds: float) -> dict[str, Any]:
    """The read columns of a tile that could not be read or decoded."""
    return {
        "error": reason,
        "seconds": seconds,
        "pixels": b"",
        "shape": [0, 0, 0],
        "dtype": "uint8",
        "valid": b"",
        "format": "",
        "crs": "",
        "transform": NO_TRANSFORM,
    }


def georeference(crs: str, transform: Sequence[float]) -> tuple[str | None, Any]:
    """``(crs, Affine)`` from a row's columns; None where the row has none."""
    from affine import Affine

    values = [float(v) for v in transform]
    return (crs or None), (None if any(math.isnan(v) for v in values) else Affine(*values))


def tile_of(batch: dict[str, np.ndarray], i: int) -> Tile:
    """An empty :class:`Tile` that carries row ``i``'s format and georeference, for encoders."""
    crs, transform = georeference(str(batch["crs"][i]), batch["transform"][i])
    return Tile(np.empty((0, 0, 1)), format=str(batch["format"][i]), crs=crs, transform=transform)
