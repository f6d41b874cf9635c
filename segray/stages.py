"""The Ray Data stages of a bulk job that touch storage, and the driver's scene assembler.

Rows travel between stages as numpy columns; pixels, masks and logits as ``pack``-ed bytes with
their shape and dtype, so rows of any size and type share a block. Each stage turns every failure
on one input into that row's ``error`` and goes on: a bad tile never stops the job.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from segray import imagery, inference, storage
from segray.imagery import Tile, TileError
from segray.manifest import footprints_uri, uncertainty_uri
from segray.tiling import SceneStitcher, Window, open_scene, read_window, scene_windows

# --- tiles ------------------------------------------------------------------------------------


def pack(array: np.ndarray) -> tuple[bytes, list[int], str]:
    """An array as ``(bytes, shape, dtype)``: rows of mixed shapes and types share one column."""
    array = np.ascontiguousarray(array)
    return array.tobytes(), list(array.shape), array.dtype.name


def unpack(data: bytes, shape: Iterable[int], dtype: str) -> np.ndarray:
    """The array :func:`pack` stored."""
    return np.frombuffer(data, dtype=dtype).reshape(tuple(int(s) for s in shape))


_NO_TRANSFORM = [math.nan] * 6


def read_tiles(
    batch: dict[str, np.ndarray], endpoint: str | None, threads: int, bands: tuple | None
) -> dict[str, np.ndarray]:
    """Ray Data task: read and decode tiles; a tile that fails becomes a row with its error."""

    def one(uri: str) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            tile = imagery.decode(storage.read_bytes(uri, endpoint=endpoint), uri, bands=bands)
        except (TileError, storage.StorageError) as exc:
            return _failed(str(exc), time.perf_counter() - start)
        except Exception as exc:  # a reader bug must not end the job: the row says what happened
            return _failed(f"{uri}: {type(exc).__name__}: {exc}", time.perf_counter() - start)
        pixels, shape, dtype = pack(tile.array)
        t = tile.transform
        return {
            "error": "",
            "seconds": time.perf_counter() - start,
            "pixels": pixels,
            "shape": shape,
            "dtype": dtype,
            "format": tile.format,
            "crs": tile.crs or "",
            "transform": list(t)[:6] if t is not None else _NO_TRANSFORM,
        }

    with ThreadPoolExecutor(max(1, threads)) as pool:
        rows = list(pool.map(one, batch["input_uri"]))
    return {**batch, **_columns(rows)}


def _failed(reason: str, seconds: float) -> dict[str, Any]:
    row = {"error": reason, "seconds": seconds, "pixels": b"", "shape": [0, 0, 0], "dtype": "uint8"}
    return {**row, "format": "", "crs": "", "transform": _NO_TRANSFORM}


def _columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if key in ("pixels", "error", "format", "crs", "dtype"):
            column = np.empty(len(values), dtype=object)
            column[:] = values
            out[key] = column
        else:
            out[key] = np.asarray(values)
    return out


def write_masks(
    batch: dict[str, np.ndarray],
    endpoint: str | None,
    threads: int,
    footprints: dict[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Ray Data task: encode each mask like its tile and write it whole, with the files beside it
    (an ``uncertainty`` column, GeoJSON ``footprints`` of the ``labels`` column); returns manifest
    rows."""

    def one(i: int) -> tuple[str, str, float, dict[str, str]]:
        if batch["error"][i]:
            return "error", str(batch["error"][i]), 0.0, {}
        start = time.perf_counter()
        uri = str(batch["output_uri"][i])
        try:
            shape = batch["shape"][i][:2]
            side = {k: unpack(batch[k][i], shape, "uint8") for k in SIDE_COLUMNS if k in batch}
            mask = unpack(batch["pixels"][i], shape, batch["dtype"][i])
            uris = write_outputs(uri, mask, _tile_of(batch, i), endpoint, footprints, **side)
        except Exception as exc:  # storage or encoder failure: this tile's error, not the job's
            return "error", f"{uri}: cannot write mask: {exc}", time.perf_counter() - start, {}
        return "ok", "", time.perf_counter() - start, uris

    with ThreadPoolExecutor(max(1, threads)) as pool:
        rows = list(pool.map(one, range(len(batch["input_uri"]))))
    return {
        "input_uri": batch["input_uri"],
        "status": np.asarray([r[0] for r in rows], dtype=object),
        "error": np.asarray([r[1] for r in rows], dtype=object),
        **{
            k: np.asarray([r[3].get(k, "") for r in rows], dtype=object)
            for k in ("output_uri", "uncertainty_uri", "footprints_uri")
        },
        "class_fractions": batch["class_fractions"],
        "seconds": np.asarray(batch["seconds"], np.float64) + [r[2] for r in rows],
    }


#: Predictor columns of uint8 arrays of the mask's shape, written beside it.
SIDE_COLUMNS = ("uncertainty", "labels")


def write_outputs(
    uri: str,
    mask: np.ndarray,
    like: Tile,
    endpoint: str | None,
    footprints: dict[str, Any] | None = None,
    *,
    uncertainty: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> dict[str, str]:
    """Write a mask at ``uri``, encoded like its tile, and the files beside it: the
    ``uncertainty`` map, and the ``footprints`` class's polygons from the class-id ``labels``.
    The mask goes last. Returns their manifest URIs (``output_uri`` and so on)."""
    uris = {}
    if uncertainty is not None:
        uris["uncertainty_uri"] = uncertainty_uri(uri)
        data = encode_like(uncertainty, like, uris["uncertainty_uri"])
        storage.write_bytes(uris["uncertainty_uri"], data, endpoint=endpoint)
    if footprints is not None and labels is not None:
        uris["footprints_uri"] = footprints_uri(uri)
        doc = inference.footprint_doc(
            labels, like, footprints["class_index"], footprints.get("name")
        )
        storage.write_bytes(uris["footprints_uri"], json.dumps(doc).encode(), endpoint=endpoint)
    storage.write_bytes(uri, encode_like(mask, like, uri), endpoint=endpoint)
    return {"output_uri": uri, **uris}


def _tile_of(batch: dict[str, np.ndarray], i: int) -> Tile:
    from affine import Affine

    t = batch["transform"][i]
    transform = None if np.isnan(t).any() else Affine(*[float(v) for v in t])
    crs = str(batch["crs"][i]) or None
    return Tile(
        array=np.empty((0, 0, 1)), format=str(batch["format"][i]), crs=crs, transform=transform
    )


def encode_like(mask: np.ndarray, like: Tile, uri: str) -> bytes:
    """Mask bytes in the format its URI names: ``.tif`` a GeoTIFF with ``like``'s georeference."""
    data, ext = imagery.encode_mask(mask, like=like)
    if uri.endswith(ext):
        return data
    if uri.endswith(".tif"):  # a TIFF name holding another format: keep the name's promise
        return imagery.encode_geotiff(imagery.as_mask(mask), like.crs, like.transform)
    return imagery.encode_png(imagery.as_mask(mask))


# --- scenes -----------------------------------------------------------------------------------

#: Largest scene accepted: its uint8 mask is held whole by the driver while it is stitched.
MAX_SCENE_PIXELS = 1 << 30


def expand_scene(
    row: dict[str, Any],
    window: tuple[int, int],
    overlap: int,
    bands: Sequence[int] | None = None,
    endpoint: str | None = None,
) -> list[dict[str, Any]]:
    """Ray Data ``flat_map``: one row per window of a scene, from its header alone.

    A scene that cannot be opened, or has unusable bands or pixel type, gives one error row.
    """
    uri = str(row["input_uri"])
    try:
        with open_scene(uri, endpoint=endpoint) as ds:
            _check_scene(ds, uri, bands)
            height, width = ds.height, ds.width
            crs = ds.crs.to_string() if ds.crs else ""
            transform = [math.nan] * 6 if ds.transform.is_identity else list(ds.transform)[:6]
    except TileError as exc:
        return [_window_row(row, Window(0, 0, 0, 0), str(exc))]
    except Exception as exc:  # unreadable header: this scene's error, not the job's
        return [_window_row(row, Window(0, 0, 0, 0), f"{uri}: cannot open scene: {exc}")]
    windows = scene_windows(height, width, window, overlap)
    scene = {"scene_shape": [height, width], "crs": crs, "transform": transform}
    return [_window_row(row, w, "", n_windows=len(windows), **scene) for w in windows]


def _window_row(row: dict[str, Any], win: Window, error: str, **scene: Any) -> dict[str, Any]:
    out = {
        "input_uri": row["input_uri"],
        "output_uri": row["output_uri"],
        "error": error,
        "window": [win.row, win.col, win.height, win.width],
        "n_windows": 1,
        "scene_shape": [0, 0],
        "crs": "",
        "transform": [math.nan] * 6,
    }
    return {**out, **scene}


def _check_scene(ds: Any, uri: str, bands: Sequence[int] | None) -> None:
    if ds.width * ds.height > MAX_SCENE_PIXELS:
        raise TileError(uri, f"scene too large: {ds.width}x{ds.height} > {MAX_SCENE_PIXELS} pixels")
    if not 1 <= ds.count <= imagery.MAX_BANDS:
        raise TileError(uri, f"unsupported band count {ds.count} (1..{imagery.MAX_BANDS})")
    if ds.dtypes[0] not in imagery.SUPPORTED_DTYPES:
        supported = imagery.SUPPORTED_DTYPES
        raise TileError(uri, f"unsupported pixel type {ds.dtypes[0]}; supported: {supported}")
    if bands and not all(1 <= b <= ds.count for b in bands):
        raise TileError(uri, f"band selection {tuple(bands)} invalid for a {ds.count}-band image")


def read_windows(
    batch: dict[str, np.ndarray], bands: Sequence[int] | None = None, endpoint: str | None = None
) -> dict[str, np.ndarray]:
    """Ray Data task: windowed reads of a batch of window rows, opening each scene once."""
    n = len(batch["input_uri"])
    errors = [str(e) for e in batch["error"]]
    packed: list[tuple[bytes, list[int], str]] = [(b"", [0, 0, 0], "uint8")] * n
    seconds = np.zeros(n)
    for uri in dict.fromkeys(str(u) for u in batch["input_uri"]):
        rows = [i for i in range(n) if batch["input_uri"][i] == uri and not errors[i]]
        if not rows:
            continue
        start = time.perf_counter()
        try:
            with open_scene(uri, endpoint=endpoint) as ds:
                for i in rows:
                    packed[i] = pack(read_window(ds, Window(*map(int, batch["window"][i])), bands))
        except Exception as exc:  # a broken block fails this scene, not the job
            for i in rows:
                errors[i] = f"{uri}: cannot read window {list(batch['window'][i])}: {exc}"
        seconds[rows] = (time.perf_counter() - start) / len(rows)
    pixels = np.empty(n, dtype=object)
    pixels[:] = [p[0] for p in packed]
    return {
        **batch,
        "error": np.asarray(errors, dtype=object),
        "seconds": seconds,
        "pixels": pixels,
        "shape": np.asarray([p[1] for p in packed]),
        "dtype": np.asarray([p[2] for p in packed], dtype=object),
    }


class SceneAssembler:
    """On the driver: stitches window logits into scene masks and writes each scene once whole.

    Holds, per scene in flight, its :class:`SceneStitcher` bands and its uint8 mask (H x W bytes),
    and as much again for each of the class-id labels (``footprints`` of a class, when the mask is
    not the class-id mask already) and the ``uncertainty`` map (the logits' last channel then).
    """

    def __init__(
        self,
        card: Any,
        geometry: tuple[int, int, str],
        render: dict[str, Any],
        *,
        endpoint: str | None = None,
        uncertainty: bool = False,
        footprints: dict[str, Any] | None = None,
    ) -> None:
        self.card, self.geometry, self.render, self.endpoint = card, geometry, render, endpoint
        self.uncertainty, self.footprints = uncertainty, footprints
        self._scenes: dict[str, dict[str, Any]] = {}

    def add_batch(self, batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """Take a batch of predicted windows; returns manifest rows of the scenes now finished."""
        finished = []
        for i, uri in enumerate(batch["input_uri"]):
            scene = self._scene(str(uri), batch, i)
            self._add_window(scene, batch, i)
            if scene["seen"] == scene["n_windows"]:
                finished.append(self._finish(self._scenes.pop(str(uri))))
        return finished

    def _scene(self, uri: str, batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
        if uri not in self._scenes:
            self._scenes[uri] = {
                "input_uri": uri,
                "output_uri": str(batch["output_uri"][i]),
                "n_windows": int(batch["n_windows"][i]),
                "seen": 0,
                "error": "",
                "seconds": 0.0,
                "crs": str(batch["crs"][i]) or None,
                "transform": [float(v) for v in batch["transform"][i]],
                "shape": tuple(int(v) for v in batch["scene_shape"][i]),
                "stitcher": None,
                "arrays": {},
            }
        return self._scenes[uri]

    def _add_window(self, scene: dict[str, Any], batch: dict[str, np.ndarray], i: int) -> None:
        scene["seen"] += 1
        scene["seconds"] += float(batch["seconds"][i])
        if scene["error"] or batch["error"][i]:
            scene["error"] = scene["error"] or str(batch["error"][i])
            scene["stitcher"], scene["arrays"] = None, {}  # give the memory back at once
            return
        if scene["stitcher"] is None:
            scene["stitcher"] = SceneStitcher(*scene["shape"], *self.geometry)
            scene["arrays"] = self._arrays(scene["shape"])
            scene["counts"] = np.zeros(self.card.num_classes, np.int64)
        logits = unpack(batch["pixels"][i], batch["shape"][i], batch["dtype"][i])
        for top, band in scene["stitcher"].add(Window(*map(int, batch["window"][i])), logits):
            self._render_band(scene, top, band)

    def _arrays(self, shape: tuple[int, int]) -> dict[str, np.ndarray]:
        arrays = {"mask": np.zeros(shape, np.uint8)}
        if self.footprints is not None:
            plain = self.render["output"] == "classes"
            arrays["labels"] = arrays["mask"] if plain else np.zeros(shape, np.uint8)
        if self.uncertainty:
            arrays["uncertainty"] = np.zeros(shape, np.uint8)
        return arrays

    def _render_band(self, scene: dict[str, Any], top: int, band: np.ndarray) -> None:
        rows, arrays, k = slice(top, top + band.shape[0]), scene["arrays"], self.card.num_classes
        if self.uncertainty:
            band, entropy = band[..., :-1], band[..., -1]
            arrays["uncertainty"][rows] = inference.render_uncertainty(entropy)
        mask, labels = inference.render_outputs(band[None], self.card, **self.render)
        scene["counts"] += np.bincount(labels.ravel(), minlength=k)[:k]
        arrays["mask"][rows] = mask[0]
        if "labels" in arrays:
            arrays["labels"][rows] = labels[0]

    def _finish(self, scene: dict[str, Any]) -> dict[str, Any]:
        from affine import Affine

        row = {"input_uri": scene["input_uri"], "seconds": scene["seconds"]}
        if scene["error"]:
            return {**row, "status": "error", "error": scene["error"]}
        start = time.perf_counter()
        t = scene["transform"]
        transform = None if any(math.isnan(v) for v in t) else Affine(*t)
        like = Tile(np.empty((0, 0, 1)), scene["input_uri"], "tiff", scene["crs"], transform)
        arrays = scene["arrays"]
        side = {k: arrays[k] for k in SIDE_COLUMNS if k in arrays}
        try:
            uris = write_outputs(
                scene["output_uri"], arrays["mask"], like, self.endpoint, self.footprints, **side
            )
        except Exception as exc:  # storage or encoder failure: this scene's error, not the job's
            return {**row, "status": "error", "error": f"cannot write scene mask: {exc}"}
        row["seconds"] += time.perf_counter() - start
        fractions = scene["counts"] / max(1, arrays["mask"].size)
        return {**row, "status": "ok", "class_fractions": fractions, **uris}
