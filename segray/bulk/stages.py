"""The Ray Data stages of a bulk job that touch storage: read and decode tiles, encode and write
masks with the files beside them (scenes have their own tasks: :mod:`segray.bulk.scenes`).

Each stage takes a batch of rows (see :mod:`segray.bulk.rows`) and the job's config, and turns
every failure on one input into that row's ``error``: a bad tile never stops the job.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from segray import inference
from segray.bulk import catalog
from segray.bulk.config import PredictConfig
from segray.bulk.plan import footprints_uri, uncertainty_uri
from segray.bulk.rows import (
    NO_TRANSFORM,
    SIDE_COLUMNS,
    STOP,
    columns,
    failed_tile,
    objects,
    pack,
    pack_valid,
    tile_of,
    unpack,
)
from segray.errors import OutputFull, SegrayError
from segray.io import gdal, imagery, storage
from segray.io.imagery import Tile

# --- tiles ------------------------------------------------------------------------------------


def io_pool(threads: int) -> ThreadPoolExecutor:
    """This process's I/O threads, kept across tasks (a Ray worker runs many): a thread new to
    GDAL sets up its own environment, which cost more than the decode it served (9.4 vs 1.9 ms
    of CPU per 64 px tile with a fresh pool of 8 per batch). Threads only wait on storage here;
    decoding and encoding stay on the task's own thread, where GIL and GDAL locks cost nothing."""
    pool = _POOLS.get(threads)
    if pool is None:
        pool = _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="segray-io")
    return pool


_POOLS: dict[int, ThreadPoolExecutor] = {}


def read_tiles(batch: dict[str, np.ndarray], config: PredictConfig) -> dict[str, np.ndarray]:
    """Ray Data task: read and decode tiles; a tile that fails becomes a row with its error."""
    endpoint, bands = config.endpoint, config.bands

    def fetch(uri: str) -> tuple[bytes | Exception, float]:
        start = time.perf_counter()
        try:
            return storage.read_bytes(uri, endpoint=endpoint), time.perf_counter() - start
        except Exception as exc:  # reported on the tile's row by decode
            return exc, time.perf_counter() - start

    def decode(uri: str, data: bytes | Exception, seconds: float) -> dict[str, Any]:
        start = time.perf_counter() - seconds
        try:
            if isinstance(data, Exception):
                raise data
            tile = imagery.decode(data, uri, bands=bands)
        except SegrayError as exc:
            return failed_tile(str(exc), time.perf_counter() - start)
        except Exception as exc:  # a reader bug must not end the job: the row says what happened
            return failed_tile(f"{uri}: {type(exc).__name__}: {exc}", time.perf_counter() - start)
        pixels, shape, dtype = pack(tile.array)
        t = tile.transform
        return {
            "error": "",
            "seconds": time.perf_counter() - start,
            "pixels": pixels,
            "shape": shape,
            "dtype": dtype,
            "valid": pack_valid(tile.valid),
            "format": tile.format,
            "crs": tile.crs or "",
            "transform": list(t)[:6] if t is not None else NO_TRANSFORM,
        }

    uris = [str(u) for u in batch["input_uri"]]
    fetched = io_pool(config.io_threads).map(fetch, uris)
    with gdal.env():
        rows = [decode(uri, *got) for uri, got in zip(uris, fetched, strict=True)]
    return {**batch, **columns(rows)}


def write_masks(
    batch: dict[str, np.ndarray],
    config: PredictConfig,
    footprints: dict[str, Any] | None = None,
    legend: dict[str, Any] | None = None,
    stac_item: dict[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Ray Data task: encode each mask like its tile and write it whole, with the files beside it
    (an ``uncertainty`` column, GeoJSON ``footprints`` of the ``labels`` column, the STAC item
    with ``stac_item``: :func:`segray.bulk.catalog.item_options`); returns manifest rows."""
    endpoint = config.endpoint

    def encode(i: int) -> tuple[list[tuple[str, bytes]], dict[str, str]] | str:
        if batch["error"][i]:
            return str(batch["error"][i])
        uri = str(batch["output_uri"][i])
        try:
            shape = batch["shape"][i][:2]
            side = {k: unpack(batch[k][i], shape, "uint8") for k in SIDE_COLUMNS if k in batch}
            mask = unpack(batch["pixels"][i], shape, batch["dtype"][i])
            item = None
            if stac_item is not None:
                source = str(batch["source"][i]) if "source" in batch else ""
                item = (str(batch["input_uri"][i]), json.loads(source or "null"), stac_item)
            like = tile_of(batch, i)
            return encode_outputs(uri, mask, like, footprints, legend, item=item, **side)
        except Exception as exc:  # an encoder failure: this tile's error, not the job's
            return f"{uri}: cannot write mask: {exc}"

    def write(i: int, encoded: Any, seconds: float) -> tuple[str, str, float, dict[str, str]]:
        if isinstance(encoded, str):
            return "error", encoded, seconds if not batch["error"][i] else 0.0, {}
        start = time.perf_counter() - seconds
        files, uris = encoded
        try:
            for uri, data in files:  # the mask last: once it exists, so does all beside it
                storage.write_bytes(uri, data, endpoint=endpoint)
        except OutputFull as exc:  # no later write can succeed: the driver stops the job
            return "error", str(exc), time.perf_counter() - start, {STOP: str(exc)}
        except Exception as exc:  # storage failure: this tile's error, not the job's
            reason = f"{files[-1][0]}: cannot write mask: {exc}"
            return "error", reason, time.perf_counter() - start, {}
        return "ok", "", time.perf_counter() - start, uris

    n = len(batch["input_uri"])
    encoded = []
    with gdal.env():
        for i in range(n):
            start = time.perf_counter()
            encoded.append((i, encode(i), time.perf_counter() - start))
    rows = list(io_pool(config.io_threads).map(lambda job: write(*job), encoded))
    return {
        "input_uri": batch["input_uri"],
        "status": objects([r[0] for r in rows]),
        "error": objects([r[1] for r in rows]),
        **{
            k: objects([r[3].get(k, "") for r in rows])
            for k in ("output_uri", "uncertainty_uri", "footprints_uri", "item_uri", STOP)
        },
        "class_fractions": batch["class_fractions"],
        "seconds": np.asarray(batch["seconds"], np.float64) + [r[2] for r in rows],
    }


def write_outputs(
    uri: str,
    mask: np.ndarray,
    like: Tile,
    endpoint: str | None,
    footprints: dict[str, Any] | None = None,
    legend: dict[str, Any] | None = None,
    *,
    uncertainty: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> dict[str, str]:
    """Write a mask at ``uri``, encoded like its tile, and the files beside it (see
    :func:`encode_outputs`), the mask last. Returns their manifest URIs."""
    files, uris = encode_outputs(
        uri, mask, like, footprints, legend, uncertainty=uncertainty, labels=labels
    )
    for name, data in files:
        storage.write_bytes(name, data, endpoint=endpoint)
    return uris


def encode_outputs(
    uri: str,
    mask: np.ndarray,
    like: Tile,
    footprints: dict[str, Any] | None = None,
    legend: dict[str, Any] | None = None,
    *,
    uncertainty: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    item: tuple[str, dict[str, str] | None, dict[str, Any]] | None = None,
) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """``([(uri, bytes), …], manifest URIs)``: a mask for ``uri``, encoded like its tile, and the
    files beside it: the ``uncertainty`` map, the ``footprints`` class's polygons from the
    class-id ``labels``, and with ``item`` (input URI, STAC source or None, item options) the
    mask's STAC item. The mask comes last, to be written last."""
    files, uris = [], {}
    if uncertainty is not None:
        uris["uncertainty_uri"] = uncertainty_uri(uri)
        tags = {"tags": inference.UNCERTAINTY_TAGS}
        data = encode_like(uncertainty, like, uris["uncertainty_uri"], tags)
        files.append((uris["uncertainty_uri"], data))
    if footprints is not None and labels is not None:
        uris["footprints_uri"] = footprints_uri(uri)
        doc = inference.footprint_doc(labels, like, **footprints)
        files.append((uris["footprints_uri"], json.dumps(doc).encode()))
    if item is not None:
        shape = (int(mask.shape[0]), int(mask.shape[1]))
        name, doc = catalog.item_file(uri, like.crs, like.transform, shape, *item)
        uris["item_uri"] = name
        files.append((name, doc))
    files.append((uri, encode_like(mask, like, uri, legend)))
    return files, {"output_uri": uri, **uris}


def encode_like(
    mask: np.ndarray, like: Tile, uri: str, legend: dict[str, Any] | None = None
) -> bytes:
    """Mask bytes in the format its URI names: ``.tif`` a GeoTIFF with ``like``'s georeference;
    ``legend`` (:func:`segray.inference.mask_legend`) gives its colour table and metadata."""
    data, ext = imagery.encode_mask(mask, like=like, **(legend or {}))
    if uri.endswith(ext):
        return data
    if uri.endswith(".tif"):  # a TIFF name holding another format: keep the name's promise
        return imagery.encode_geotiff(
            imagery.as_mask(mask), like.crs, like.transform, nodata=imagery.MASK_NODATA
        )
    return imagery.encode_png(imagery.as_mask(mask))
