"""The Ray Data stages of a bulk job that touch storage: read and decode tiles, encode and write
masks with the files beside them (scenes have their own tasks: :mod:`segray.bulk.scenes`).

Each stage takes a batch of rows (see :mod:`segray.bulk.rows`) and the job's config, and turns
every failure on one input into that row's ``error``: a bad tile never stops the job.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from segray.bulk.config import PredictConfig
from segray.bulk.rows import (
    SIDE_COLUMNS,
    STOP,
    columns,
    failed_tile,
    objects,
    tile_columns,
    tile_of,
    unpack,
)
from segray.bulk.sinks import File, Output, Sink, file_columns, files_of, write_files
from segray.errors import OutputFull, SegrayError
from segray.io import gdal
from segray.io.readers import open_reader

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
    bands = config.bands

    def fetch(uri: str) -> tuple[bytes | Exception, float]:
        start = time.perf_counter()
        try:
            return config.fs(uri).read_bytes(uri), time.perf_counter() - start
        except Exception as exc:  # reported on the tile's row by decode
            return exc, time.perf_counter() - start

    def decode(uri: str, data: bytes | Exception, seconds: float) -> dict[str, Any]:
        start = time.perf_counter() - seconds
        try:
            if isinstance(data, Exception):
                raise data
            tile = open_reader(data, uri=uri).read(bands=bands)
        except SegrayError as exc:
            return failed_tile(str(exc), time.perf_counter() - start)
        except Exception as exc:  # a reader bug must not end the job: the row says what happened
            return failed_tile(f"{uri}: {type(exc).__name__}: {exc}", time.perf_counter() - start)
        return tile_columns(tile, time.perf_counter() - start)

    uris = [str(u) for u in batch["input_uri"]]
    fetched = io_pool(config.io_threads).map(fetch, uris)
    with gdal.env():
        rows = [decode(uri, *got) for uri, got in zip(uris, fetched, strict=True)]
    return {**batch, **columns(rows)}


def write_masks(
    batch: dict[str, np.ndarray], config: PredictConfig, sinks: Sequence[Sink]
) -> dict[str, np.ndarray]:
    """Ray Data task: the files of each row's mask through the job's ``sinks`` (the mask's own
    last), each written whole; returns manifest rows."""
    out = config.fs(config.output)

    def encode(i: int) -> tuple[list[File], dict[str, str]] | str:
        if batch["error"][i]:
            return str(batch["error"][i])
        uri = str(batch["output_uri"][i])
        try:
            return files_of(sinks, output_of(batch, i))
        except Exception as exc:  # an encoder failure: this tile's error, not the job's
            return f"{uri}: cannot write mask: {exc}"

    def write(i: int, encoded: Any, seconds: float) -> tuple[str, str, float, dict[str, str]]:
        if isinstance(encoded, str):
            return "error", encoded, seconds if not batch["error"][i] else 0.0, {}
        start = time.perf_counter() - seconds
        files, uris = encoded
        try:
            write_files(out, files)  # the mask last: once it exists, so does all beside it
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
        **{k: objects([r[3].get(k, "") for r in rows]) for k in (*file_columns(), STOP)},
        "class_fractions": batch["class_fractions"],
        "seconds": np.asarray(batch["seconds"], np.float64) + [r[2] for r in rows],
    }


def output_of(batch: dict[str, np.ndarray], i: int) -> Output:
    """Row ``i`` of a predicted batch as the sinks see it."""
    shape = batch["shape"][i][:2]
    side = {k: unpack(batch[k][i], shape, "uint8") for k in SIDE_COLUMNS if k in batch}
    source = str(batch["source"][i]) if "source" in batch else ""
    return Output(
        uri=str(batch["output_uri"][i]),
        input_uri=str(batch["input_uri"][i]),
        like=tile_of(batch, i),
        shape=(int(shape[0]), int(shape[1])),
        mask=unpack(batch["pixels"][i], shape, batch["dtype"][i]),
        uncertainty=side.get("uncertainty"),
        labels=side.get("labels"),
        confidence=side.get("confidence"),
        source=json.loads(source or "null"),
    )
