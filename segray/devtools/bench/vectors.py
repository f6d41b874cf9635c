"""``segray bench vectors``: the job's vector layer at 1,000 and 10,000 tiles.

The parts a job's write tasks would leave are made by the same code (:func:`part_bytes` on masks
of blocky regions of three classes, tiles of one grid), timed as the tracing; then
:func:`build_layer` merges them in Ray tasks while the driver's and the workers' resident memory
is sampled. At the smallest size the layer's polygon count is checked against the mosaic of
every tile traced in one piece.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

TILE = 64
CRS = "EPSG:32633"


def tile_labels(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A mosaic of ``rows`` x ``cols`` tiles: regions of 8 px blocks, many across seams."""
    field = np.kron(rng.random((rows * TILE // 8, cols * TILE // 8)), np.ones((8, 8)))
    return ((field > 0.6).astype(np.uint8) + (field > 0.9)).astype(np.uint8)


def make_parts(out: str, n: int, seed: int = 0) -> tuple[list[str], float, np.ndarray, Any]:
    """Parts of ``n`` tiles (a square-ish grid) under ``out``: the mask URIs, the seconds the
    tracing took (this process), the mosaic and its transform."""
    from affine import Affine

    from segray.bulk.config import PredictConfig
    from segray.bulk.sinks import Output
    from segray.bulk.vectors import part_bytes, part_uri
    from segray.io import storage
    from segray.io.imagery import Tile

    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    mosaic = tile_labels(np.random.default_rng(seed), rows, cols)
    confidence = np.full(mosaic.shape, 200, np.uint8)
    origin = Affine(0.5, 0, 500_000, 0, -0.5, 4_000_000)
    config = PredictConfig(model="m", input="i", output=out, vectors=f"{out}/layer.parquet")
    fs = config.fs(out)
    masks, traced = [], 0.0
    for i in range(n):
        r, c = divmod(i, cols)
        window = (slice(r * TILE, (r + 1) * TILE), slice(c * TILE, (c + 1) * TILE))
        transform = origin @ Affine.translation(c * TILE, r * TILE)
        mask = storage.join(out, f"r{r:03d}", f"t_{c:03d}.tif")
        output = Output(
            uri=mask,
            input_uri=mask,
            like=Tile(np.empty((0, 0, 1)), mask, "tiff", CRS, transform),
            shape=(TILE, TILE),
            mask=mosaic[window],
            labels=mosaic[window],
            confidence=confidence[window],
        )
        start = time.perf_counter()
        data = part_bytes(config, output, [1, 2], "run-bench")
        traced += time.perf_counter() - start
        fs.write_bytes(part_uri(config, mask), data)
        masks.append(mask)
    used = mosaic[: rows * TILE, :]
    if n < rows * cols:  # the last row is part full: keep the whole mosaic only where tiles are
        used = used.copy()
        used[(rows - 1) * TILE :, (n - (rows - 1) * cols) * TILE :] = 0
    return masks, traced, used, origin


def bench_vectors(
    sizes: Sequence[int] = (1000, 10_000), echo: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Tracing against merging, and peak RSS, at each tile count; returns the figures."""
    import pyarrow.parquet as pq

    from segray.bulk.config import PredictConfig
    from segray.bulk.vectors import build_layer
    from segray.devtools.bench.harness import RssSampler, rss_bytes
    from segray.io import polygons
    from segray.models.saving import ModelCard
    from segray.runtime import init_ray

    init_ray()
    card = ModelCard(
        name="unet",
        num_classes=3,
        input_shape=(TILE, TILE, 3),
        class_names=["background", "building", "road"],
    )
    results = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="segray-bench-vectors-") as out:
            masks, traced, mosaic, origin = make_parts(out, n)
            config = PredictConfig(
                model="m", input="i", output=out, vectors=os.path.join(out, "layer.parquet")
            )
            base = rss_bytes(os.getpid())
            start = time.perf_counter()
            with RssSampler(0.05) as rss:
                build_layer(config, card, masks, "run-bench")
            merged = time.perf_counter() - start
            layer = pq.read_metadata(config.vectors).num_rows
            whole = None
            if n == min(sizes):
                whole = len(polygons.trace(mosaic, None, origin, [1, 2])["wkb"])
            workers = max(
                (v for k, v in rss.by_title.items() if k.split("::")[-1] in TASKS), default=0
            )
        row = {
            "tiles": n,
            "layer": layer,
            "whole": whole,
            "trace_s": traced,
            "merge_s": merged,
            "driver_mib": (rss.driver - base) / 2**20,
            "worker_mib": workers / 2**20,
        }
        results.append(row)
    echo("tiles   layer polys  = whole   trace s  merge s  merge/trace  driver +MiB  worker MiB")
    for r in results:
        same = "-" if r["whole"] is None else ("yes" if r["whole"] == r["layer"] else r["whole"])
        echo(
            f"{r['tiles']:>6,} {r['layer']:>12,}  {same:>7} {r['trace_s']:>8.1f} "
            f"{r['merge_s']:>8.1f} {r['merge_s'] / r['trace_s']:>11.2f}x "
            f"{r['driver_mib']:>11.0f} {r['worker_mib']:>11.0f}"
        )
    if len(results) > 1:
        a, b = results[0], results[-1]
        echo(
            f"from {a['tiles']:,} to {b['tiles']:,} tiles: driver peak {a['driver_mib']:.0f} → "
            f"{b['driver_mib']:.0f} MiB above its start, workers {a['worker_mib']:.0f} → "
            f"{b['worker_mib']:.0f} MiB"
        )
    return results


#: The layer's Ray tasks, as their workers' process titles name them.
TASKS = ("scan_parts", "pair_bucket", "join_bucket")
